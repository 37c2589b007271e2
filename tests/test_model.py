"""What training may and may not change: frozen towers stay put, frozen batch-norm statistics stay put, and every
trainable weight takes part."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig

from checkpoint import load_model, load_weights, save_checkpoint
from clip import MAX_LOGIT_SCALE, CLIPModel, clip_loss
from config import Config
from conftest import tiny_config
from distributed import Dist
from modules import ImageEncoder, ProjectionHead, build_text_config
from engine import make_optimizer, train_step
from tokenizer import train_wordpiece


def tiny_model(**overrides) -> tuple[CLIPModel, Config]:
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    return CLIPModel(cfg, 500), cfg


def train_steps(model: CLIPModel, cfg: Config, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    model.train()
    for _ in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=g) * 3 + 1  # far from the initial statistics (0, 1)
        ids = torch.randint(5, 500, (8, 16), generator=g)
        clip_loss(*model(images, ids, torch.ones_like(ids))).backward()
        optimizer.step()
        optimizer.zero_grad()


def batch_norm_buffers(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def test_frozen_batch_norm_statistics_stay_while_everything_else_learns():
    model, cfg = tiny_model(image_freeze_bn_stats=True)
    assert model.training and not model.image_encoder.model.bn1.training  # so from construction on
    before = copy.deepcopy(model.state_dict())
    stats = batch_norm_buffers(model.image_encoder)
    assert len(stats) > 10
    train_steps(model, cfg)
    after = model.state_dict()
    assert all(torch.equal(after[f"image_encoder.{k}"], v) for k, v in stats.items())
    scales = [k for k in before if k.startswith("image_encoder.") and k.endswith(".weight") and ".bn" in k]
    assert scales and all(not torch.equal(after[k], before[k]) for k in scales)  # the norms' scales still learn
    # in training mode the tower now computes what it computes in eval mode
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        in_training = model.train().image_encoder(x)
        in_eval = model.eval().image_encoder(x)
    torch.testing.assert_close(in_training, in_eval)


def test_without_the_flag_training_updates_the_statistics():
    model, cfg = tiny_model()
    stats = batch_norm_buffers(model.image_encoder)
    train_steps(model, cfg)
    after = model.state_dict()
    changed = [k for k, v in stats.items() if not torch.equal(after[f"image_encoder.{k}"], v)]
    assert len(changed) == len(stats)


def test_a_frozen_tower_does_not_change_at_all_and_its_head_still_learns():
    model, cfg = tiny_model(image_trainable=False)
    before = copy.deepcopy(model.state_dict())
    train_steps(model, cfg)
    after = model.state_dict()
    tower = [k for k in before if k.startswith("image_encoder.")]
    assert tower and all(torch.equal(after[k], before[k]) for k in tower)  # weights and batch-norm statistics
    assert not torch.equal(after["image_projection.proj.weight"], before["image_projection.proj.weight"])
    assert not torch.equal(after["text_encoder.model.embeddings.word_embeddings.weight"],
                           before["text_encoder.model.embeddings.word_embeddings.weight"])


def test_freezing_batch_norm_statistics_of_a_tower_without_any_is_an_error():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 has no batch norms"):
        tiny_model(image_model="vit_tiny_patch16_224", image_freeze_bn_stats=True)


def test_the_temperature_stops_at_the_cap_and_can_come_back_down():
    """The logit scale is capped at 100 on the parameter itself. Capped only where it is used, a parameter past the
    cap gets no gradient and Adam's momentum carries it ever higher."""
    model, cfg = tiny_model(lr_head=1.0)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    images, ids = torch.randn(8, 3, 32, 32, generator=g), torch.randint(5, 500, (8, 16), generator=g)

    def step():
        train_step(model, model, optimizer, scaler, images, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                   cfg, Dist(), torch.device("cpu"), torch.float32, 1.0)

    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE - 0.1)
    push_up = model.logit_scale.register_hook(lambda grad: torch.full_like(grad, -1e-3))
    step()  # Adam moves it by about the learning rate (1.0): far past the cap
    push_up.remove()
    assert model.scale().item() == pytest.approx(100)  # as in the CLIP paper
    for _ in range(3):  # an untrained model's confident mistakes: the loss wants a lower scale
        step()
    assert model.logit_scale.item() < MAX_LOGIT_SCALE - 0.5


@pytest.mark.parametrize("learn", [True, False])
def test_the_temperature_starts_at_its_flag_and_moves_only_when_learned(learn):
    model, cfg = tiny_model(init_temperature=0.05, learn_temperature=learn)
    assert model.scale().item() == pytest.approx(1 / 0.05)
    train_steps(model, cfg, steps=1)
    assert (model.scale().item() != pytest.approx(1 / 0.05)) == learn


def test_both_towers_give_unit_length_embeddings():
    """Cosine scores, and a temperature that means the same for every batch, need unit vectors: the heads end in a
    layer norm, whose outputs are far longer."""
    model, _ = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 16), generator=g)
    with torch.no_grad():
        image, text, _ = model.eval()(torch.randn(4, 3, 32, 32, generator=g), ids, torch.ones_like(ids))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("text_model", ["distilbert", "bert", "roberta", "squeezebert", "albert", "modernbert", "t5",
                                        "bart"])
def test_every_trainable_weight_gets_a_gradient_as_ddp_requires(text_model):
    """DDP stops at the second step when a trainable weight got no gradient, e.g. BERT's own pooler, which nothing
    uses. (SqueezeBERT and ALBERT call their pooler whatever it is, ALBERT takes tanh of its output: the stand-in
    must be callable and return a tensor.)"""
    model = CLIPModel(tiny_config(text_model=text_model), 500).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 16), generator=g)
    clip_loss(*model(torch.randn(4, 3, 32, 32, generator=g), ids, torch.ones_like(ids))).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def tiny_hub_folder(kind: str, folder) -> str:
    """A small pretrained-style folder (as `hf download` leaves one) of an architecture of unusual shape."""
    from transformers import FunnelConfig, FunnelModel, OPTConfig, OPTModel, T5GemmaConfig, T5GemmaModel
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig
    torch.manual_seed(0)
    if kind == "opt":  # a decoder-only model with a `decoder` attribute, output projected to word_embed_proj_dim
        model = OPTModel(OPTConfig(hidden_size=64, word_embed_proj_dim=32, ffn_dim=128, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=500, max_position_embeddings=64))
    elif kind == "funnel":  # an encoder whose second half is called its decoder
        model = FunnelModel(FunnelConfig(d_model=64, n_head=2, d_head=32, d_inner=128, block_sizes=[1, 1],
                                         num_decoder_layers=1, vocab_size=500))
    else:  # an encoder-decoder whose encoder has a config class of its own
        half = T5GemmaModuleConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=32, vocab_size=500)
        model = T5GemmaModel(T5GemmaConfig(encoder=half, decoder=half, vocab_size=500))
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind, tower, width", [("opt", "OPTModel", 32), ("funnel", "FunnelModel", 64),
                                                ("t5gemma", "T5GemmaEncoder", 64)])
def test_towers_of_unusual_shape_pool_their_output_width_and_reload(kind, tower, width, tmp_path):
    """OPT and Funnel have a `decoder` but are no encoder-decoders: they stay whole. OPT's output is narrower than
    its hidden size. T5Gemma's encoder has a config AutoModel cannot build alone: the checkpoint keeps the whole's."""
    cfg = tiny_config(text_model=tiny_hub_folder(kind, tmp_path / kind), text_pretrained=True, text_pooling="mean")
    model = CLIPModel(cfg, 500).eval()
    assert type(model.text_encoder.model).__name__ == tower and model.text_encoder.out_dim == width
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.encode_text(ids, torch.ones_like(ids))
    save_checkpoint(tmp_path / "run", ["best"], model, cfg, train_wordpiece(["a red circle"] * 3, 100), {"step": 1}, {})
    again, _, _ = load_model(tmp_path / "run" / "best")
    with torch.no_grad():
        torch.testing.assert_close(again.eval().encode_text(ids, torch.ones_like(ids)), before)


@pytest.mark.parametrize("text_model, heads_key", [("bart", "decoder_attention_heads"), ("t5", "num_heads")])
def test_an_encoder_decoders_dropped_decoder_is_built_with_one_layer_and_the_requested_heads(text_model, heads_key,
                                                                                          tmp_path):
    """BART's decoder used to keep 16 heads, which a width of 72 does not divide; T5's, the encoder's depth."""
    cfg = tiny_config(text_model=text_model, text_width=72, text_heads=4, text_layers=3, text_pooling="mean")
    model = CLIPModel(cfg, 500, pad_id=0)
    config = model.text_encoder.config
    assert getattr(config, heads_key) == 4 and model.text_encoder.out_dim == 72
    assert (getattr(config, "decoder_layers", None) or config.num_decoder_layers) == 1
    assert (getattr(config, "encoder_layers", None) or config.num_layers) == 3
    save_checkpoint(tmp_path, ["best"], model, cfg, train_wordpiece(["a red circle"] * 3, 100), {"step": 1}, {})
    assert load_model(tmp_path / "best")[0].text_encoder.config.to_dict() == config.to_dict()


def test_an_architecture_whose_config_refuses_a_new_depth_says_so_naming_the_flag():
    with pytest.raises(ValueError, match="--text-model prophetnet cannot be built with random weights here "
                                         r"\(NotImplementedError: .*use a pretrained model of it"):
        build_text_config("prophetnet", False, 2, 64, 2, 500, 16, 0)


def test_a_max_length_beyond_a_pretrained_models_positions_is_refused_before_its_weights_load(tmp_path,
                                                                                                 monkeypatch):
    """Else the first batch with a long caption fails deep in the embedding lookup (an IndexError), after the run
    folder is written; with --compile (every batch padded to --max-length) the first batch of all."""
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=300, dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                                     max_position_embeddings=24)).save_pretrained(tmp_path / "bert")
    cfg = tiny_config(text_model=str(tmp_path / "bert"), text_pretrained=True, text_layers=0, text_width=0,
                      text_heads=0, max_length=25)
    loaded = []
    monkeypatch.setattr("modules.AutoModel.from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match=r"--max-length 25 is more tokens than --text-model .*bert has positions for "
                                         r"\(24\); use --max-length 24 or less"):
        CLIPModel(cfg, vocab_size=300)
    assert loaded == []
    monkeypatch.undo()
    assert CLIPModel(dataclasses.replace(cfg, max_length=24), vocab_size=300).text_encoder.out_dim == 32


def test_a_checkpoint_saved_with_berts_pooler_still_loads(tmp_path):
    """Text towers drop BERT's unused pooler; a file that still has it loads every other weight, and hands the
    pooler back."""
    torch.manual_seed(0)
    saved = CLIPModel(tiny_config(text_model="bert"), 500)
    pooler = {"text_encoder.model.pooler.dense.weight": torch.randn(64, 64)}
    weights = {**saved.state_dict(), **pooler}
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    model = CLIPModel(tiny_config(text_model="bert"), 500)
    assert not torch.equal(model.image_projection.proj.weight, saved.image_projection.proj.weight)
    assert load_weights(model, tmp_path / "model.safetensors").keys() == pooler.keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "lcnet_035"])
def test_image_models_with_a_layer_after_pooling_project_its_width(name):
    """timm models whose pooled features pass one more layer (MobileNetV3: 288 pooled, 1024 out) take a head of the
    width that comes out."""
    encoder = ImageEncoder(name, pretrained=False, image_size=32)
    assert encoder.out_dim == encoder.model.head_hidden_size != encoder.model.num_features
    model, cfg = tiny_model(image_model=name)
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, cfg.projection_dim)


def test_a_model_that_asserts_its_input_size_is_named_with_the_size_it_was_made_for():
    with pytest.raises(ValueError, match=r"--image-size 64 does not fit --image-model halonet26t "
                                         r"\(AssertionError in the model\); it was made for 256 px, so try "
                                         r"--image-size 256"):
        ImageEncoder("halonet26t", pretrained=False, image_size=64)


def test_a_causal_text_model_keeps_its_causal_attention_and_needs_mean_pooling():
    with pytest.raises(ValueError, match="gpt2 is a causal .* use --text-pooling mean"):
        CLIPModel(tiny_config(text_model="gpt2"), 500)
    tower = CLIPModel(tiny_config(text_model="gpt2", text_pooling="mean"), 500).eval().text_encoder
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 500
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first, changed = tower._padded(ids, mask), tower._padded(later, mask)  # (B, L, H) before pooling
        assert torch.allclose(first[:, :6], changed[:, :6], atol=1e-6)  # later tokens do not reach earlier ones
        assert not torch.allclose(first[:, 6:], changed[:, 6:])
        mask[1, 8:] = 0
        padded = ids.clone()
        padded[1, 8:] = 3
        assert torch.allclose(tower(ids, mask), tower(padded, mask), atol=1e-6)  # padding never counts


@pytest.mark.parametrize("text_model, mixes", [("distilbert", False), ("bert", False), ("gpt2", False),
                                               ("convbert", True), ("nystromformer", True)])
def test_a_text_tower_that_lets_padding_change_its_captions_is_found(text_model, mixes):
    """ConvBERT's convolutions and Nystromformer's reach past the attention mask; train.py says so. What the flag
    means: a caption's vector changes with the padding after it."""
    tower = CLIPModel(tiny_config(text_model=text_model, text_pooling="mean"), 500, pad_id=0).text_encoder.eval()
    assert tower.padding_mixes_in == mixes
    ids = torch.randint(5, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = tower(ids, torch.ones_like(ids))
        padded = tower(torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
                       torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], 1))
    assert torch.allclose(alone, padded, atol=1e-5) != mixes


@pytest.mark.parametrize("text_model", ["modernbert", "roberta"])
def test_a_random_text_tower_pads_with_the_tokenizers_padding_id(text_model):
    """ModernBERT's default padding id (50283) lies outside a small vocabulary; RoBERTa's (1) is [UNK] to the local
    tokenizer, and RoBERTa numbers positions by it."""
    model = CLIPModel(tiny_config(text_model=text_model), 500, pad_id=0)
    assert model.text_encoder.model.config.pad_token_id == 0
    assert model.text_encoder.model.embeddings.tok_embeddings.padding_idx == 0 if text_model == "modernbert" else \
        model.text_encoder.model.embeddings.word_embeddings.padding_idx == 0


@pytest.mark.parametrize("text_model", ["modernbert", "qwen2", "gpt2"])
def test_a_random_text_tower_of_another_depth_rebuilds_from_its_saved_config(text_model):
    """Checkpoints rebuild the text tower from its config's dict (checkpoint.load_model). ModernBERT and Qwen2 list an
    attention kind per layer, which must follow the new depth; token ids of the architecture's own vocabulary must
    not point outside the tokenizer's."""
    config = build_text_config(text_model, False, 2, 64, 2, 500, 16, pad_id=0)
    again = AutoConfig.for_model(**config.to_dict())
    assert len(getattr(again, "layer_types", None) or [None, None]) == again.num_hidden_layers == 2
    ids = [getattr(again, f"{k}_token_id", None) for k in ("pad", "bos", "eos", "cls", "sep")]
    assert all(i is None or 0 <= i < 500 for i in ids)
    model = CLIPModel(tiny_config(text_model=text_model, text_pooling="mean"), 500, text_config=again)
    built = CLIPModel(tiny_config(text_model=text_model, text_pooling="mean"), 500, pad_id=0)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


@pytest.mark.parametrize("text_model", ["t5", "bart"])
def test_an_encoder_decoders_encoder_alone_is_the_text_tower_and_reloads_from_its_checkpoint(text_model, tmp_path):
    """T5's or BART's encoder, without the decoder's weights; it sees every token (padding masked), and a checkpoint
    (which holds the whole model's config) rebuilds the same tower with no download."""
    cfg = tiny_config(text_model=text_model, text_pooling="mean")
    model = CLIPModel(cfg, 500, pad_id=0).eval()
    tower = model.text_encoder
    assert not [n for n in model.state_dict() if "decoder" in n] and not tower.causal
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 500
    padded = ids.clone()
    padded[1, 8:] = 3
    with torch.no_grad():
        assert not torch.allclose(tower._padded(ids, mask)[:, :6], tower._padded(later, mask)[:, :6])  # sees later
        assert torch.allclose(tower(ids, mask), tower(padded, mask), atol=1e-6)  # padding never counts
        before = model.encode_text(ids, mask)
    save_checkpoint(tmp_path, ["best"], model, cfg, train_wordpiece(["a red circle"] * 3, 100), {"step": 1}, {})
    again, _, _ = load_model(tmp_path / "best")
    assert type(again.text_encoder.model) is type(tower.model)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().encode_text(ids, mask), before)


def test_the_projection_head_is_linear_gelu_linear_dropout_plus_residual_then_layernorm():
    """The tutorial's head, checked against its definition in training mode (dropout drawn from the same seed)."""
    head = ProjectionHead(8, 6, dropout=0.5).train()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    got = head(x)
    torch.manual_seed(1)
    projected = head.proj(x)
    expected = head.norm(F.dropout(head.fc(F.gelu(projected)), 0.5, training=True) + projected)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("text_model", ["pegasus", "marian"])
def test_an_encoder_decoder_that_also_has_a_causal_lm_class_gives_a_tower_that_sees_every_token(text_model):
    """Pegasus and Marian are listed among transformers' causal LMs (their decoder alone), but the tower is their
    encoder: --text-pooling cls is allowed, and the first token's vector sees the tokens after it."""
    tower = CLIPModel(tiny_config(text_model=text_model, text_pooling="cls"), 500, pad_id=0).eval().text_encoder
    assert not tower.causal
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 500
    with torch.no_grad():
        assert not torch.allclose(tower(ids, torch.ones_like(ids)), tower(later, torch.ones_like(ids)))

