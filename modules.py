"""The towers: a timm image encoder, a Hugging Face text encoder, and the projection head on each."""

import copy
import difflib
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

from packing import packed_forward
from utils import hub_error, model_type_of


def hub_repos(image_model: str, image_pretrained: bool, text_model: str, text_pretrained: bool,
              tokenizer: str) -> list[str]:
    """The Hugging Face Hub repositories a run loads from (weights, tokenizer), for one message naming them all:
    a model that cannot load names only itself."""
    repos = [getattr(timm.models.get_pretrained_cfg(image_model), "hf_hub_id", "") or image_model] \
        if image_pretrained and timm.is_model(image_model) else []
    for name in ([text_model] if text_pretrained else []) + ([tokenizer or text_model] if tokenizer != "local" else []):
        if not Path(name).is_dir() and name not in repos:  # a local folder needs no download
            repos.append(name)
    return repos


class ImageEncoder(nn.Module):
    """Any timm model, classifier removed: (B, 3, H, W) -> (B, num_features) pooled features."""

    def __init__(self, name: str, pretrained: bool, image_size: int):
        super().__init__()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
            close = f"close ones: {close}" if close else "see timm.list_models() for them all"
            raise ValueError(f"--image-model {name!r} is not a timm model name; {close}")
        try:
            try:  # ViT-style models take the resolution at build time; convolutional ones refuse the keyword
                self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size)
            except TypeError:
                self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except (OSError, RuntimeError) as e:
            if not pretrained:
                raise
            repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", "") or ""
            raise hub_error(name, "timm image weights", "--no-image-pretrained (random initialisation)", e,
                            repo) from None
        # pooled width: num_features, unless the model has a layer after pooling (MobileNetV3, GhostNet, ...)
        self.out_dim = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self._check_size(name, image_size)
        self.data_config = timm.data.resolve_model_data_config(self.model)  # mean, std, crop_pct of its weights

    @torch.no_grad()
    def _check_size(self, name: str, image_size: int) -> None:
        """One tiny forward pass now, so a resolution the model can't take fails before any data work."""
        was_training = self.model.training
        try:
            out = self.model.eval()(torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, AssertionError, ValueError) as e:
            native = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size", (0,))[-1]
            hint = f"; it was made for {native} px, so try --image-size {native}" if native != image_size else ""
            raise ValueError(f"--image-size {image_size} does not fit --image-model {name} "
                             f"({str(e) or type(e).__name__ + ' in the model'}){hint}") from None
        finally:
            self.model.train(was_training)
        if out.shape != (1, self.out_dim):
            raise ValueError(f"--image-model {name} gives features of shape {tuple(out.shape[1:])} at "
                             f"--image-size {image_size}, not a pooled vector")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def build_text_config(name: str, pretrained: bool, layers: int, width: int, heads: int, vocab_size: int,
                      max_length: int, pad_id: int | None = None):
    """The transformers config of the text tower: a Hub model's own (pretrained), or, for random init, a model
    type's defaults ("distilbert") or a Hub model's architecture with the requested depth/width/heads and the
    tokenizer's vocabulary and padding id."""
    if not pretrained and name in CONFIG_MAPPING:
        config = AutoConfig.for_model(name)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            hint = (f"--no-text-pretrained --text-model {model_type_of(name)} (random init, no download)" if pretrained
                    else f"--text-model {model_type_of(name)}: with --no-text-pretrained, a model type builds its "
                    f"architecture with no download")
            raise hub_error(name, "text model", hint, e, local_flag="--text-model") from None
    if pretrained:
        return config
    try:
        return _resized(config, layers, width, heads, vocab_size, max_length, pad_id)
    except (AttributeError, NotImplementedError, TypeError) as e:  # architectures whose configs nest or refuse these
        raise ValueError(f"--text-model {name} cannot be built with random weights here ({type(e).__name__}: {e}); "
                         f"use a pretrained model of it (a Hub name or folder, with --text-pretrained) or another "
                         f"architecture") from None


def _resized(config, layers: int, width: int, heads: int, vocab_size: int, max_length: int, pad_id: int | None):
    """build_text_config's random-init part: the requested depth/width/heads, the tokenizer's vocabulary and ids."""
    if width and getattr(config, "embedding_size", None) == config.hidden_size:
        config.embedding_size = width  # architectures whose embeddings match their width (SqueezeBERT requires it)
    overrides = {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads}
    if heads and getattr(config, "num_key_value_heads", None):
        overrides["num_key_value_heads"] = heads  # grouped-query attention (Llama-style) keeps one key per head
    if heads and getattr(config, "decoder_attention_heads", None):
        overrides["decoder_attention_heads"] = heads  # BART-style: the decoder is built (then dropped) at this width
    if width and getattr(config, "word_embed_proj_dim", None):
        overrides["word_embed_proj_dim"] = width  # OPT projects its output to this width
    for key, value in overrides.items():
        if value:
            setattr(config, key, value)  # attribute_map turns these into e.g. DistilBERT's n_layers, dim, n_heads
    if width:
        # feed-forward width: BERT-style, DistilBERT-style, T5-style, BART-style
        for key in ("intermediate_size", "hidden_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim"):
            if hasattr(config, key):
                setattr(config, key, 4 * width)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"--text-width {config.hidden_size} must be divisible by --text-heads "
                         f"{config.num_attention_heads}")
    if hasattr(config, "d_kv"):  # T5's width per head, otherwise independent of the model's width
        config.d_kv = config.hidden_size // config.num_attention_heads
    if len(getattr(config, "layer_types", None) or ()) not in (0, config.num_hidden_layers):
        # per-layer attention kinds (ModernBERT, Gemma): derived again for the new depth, as the config would
        config = type(config).from_dict({**config.to_dict(), "layer_types": None})
    config.vocab_size = vocab_size
    if pad_id is not None or (config.pad_token_id or 0) >= vocab_size:
        config.pad_token_id = pad_id or 0  # the tokenizer's, not the architecture's default (ModernBERT's is 50283)
    for key in ("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= vocab_size:
            setattr(config, key, None)  # ids in the architecture's own vocabulary, none of this tokenizer's
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0), max_length)
    return config


class TextEncoder(nn.Module):
    """A Hugging Face encoder: (B, L) token ids + mask -> (B, hidden) pooled by [CLS] or by the masked mean.

    With pretrained=True the Hub weights of `name` are loaded; otherwise `config` (a transformers config) is built
    with random weights: checkpoints rebuild their text tower this way, with no download. Given a `token_index`
    (packing.py), DistilBERT and BERT run their per-token layers on the real tokens only, with the same result.
    """

    def __init__(self, name: str, pretrained: bool, pooling: str, vocab_size: int, config=None):
        super().__init__()
        if config is not None:  # before any download of weights
            check_architecture(name, config, pooling)
        if pretrained:
            try:
                self.model = _with_sdpa(AutoModel.from_pretrained, name)
            except (OSError, ValueError) as e:
                raise hub_error(name, "text model", f"--no-text-pretrained --text-model {model_type_of(name)}", e,
                                local_flag="--text-model") from None
            if self.model.config.vocab_size < vocab_size:
                raise ValueError(f"the tokenizer has {vocab_size} tokens but {name} only {self.model.config.vocab_size}"
                                 f" embeddings; use the model's own tokenizer (--tokenizer '')")
        else:
            self.model = _with_sdpa(AutoModel.from_config, _one_layer_decoder(config))
        self.config = self.model.config  # the whole model's, an encoder-decoder's too: what checkpoints rebuild
        if is_encoder_decoder(self.config) and getattr(self.model, "decoder", None) is not None:
            # an encoder-decoder (T5, BART): its encoder alone is the tower, here and after a reload
            get_encoder = getattr(self.model, "get_encoder", None)
            encoder = get_encoder() if callable(get_encoder) else None
            if encoder is None or not hasattr(encoder, "config") or getattr(encoder, "decoder", None) is not None:
                raise ValueError(f"--text-model {name} is an encoder-decoder ({self.config.model_type}) whose "
                                 f"encoder cannot be taken alone; use an encoder such as bert-base-uncased or t5-base")
            self.model = encoder
        if config is None:
            check_architecture(name, self.model.config, pooling)
        self.causal = is_causal(self.model.config)  # keeps its causal attention (the 2-D mask in `_padded`)
        # PyTorch's fused attention (SDPA) where the architecture has it; its own attention code otherwise
        self.sdpa = self.model.config._attn_implementation == "sdpa"
        self.packed = packed_forward(self.model)  # the padding-free forward, or None (the architecture has none)
        if getattr(self.model, "pooler", None) is not None:
            # BERT-style models' own pooler: unused, as the sentence vector is pooled below. Its weights would get no
            # gradient, which stops DDP after the first step.
            self.model.pooler = NoPooler()
        self.pooling = pooling
        self.out_dim, self.padding_mixes_in = self._probe(name)

    @torch.no_grad()
    def _probe(self, name: str) -> tuple[int, bool]:
        """Two tiny forward passes, of one caption alone and with 5 pads after it. They give the width of the vectors
        it pools (not always the config's hidden_size: OPT projects its output to word_embed_proj_dim), and whether
        padding changes what a caption's own tokens come out as, as in architectures that mix positions outside
        attention (ConvBERT's convolutions, Canine's downsampling, Nystromformer's landmarks): a caption's vector
        then depends on its batch's longest caption. A tower that cannot run fails here, before any data work."""
        was_training = self.model.training
        # caption-like length (Funnel halves it block by block), within the positions the model has
        length = min(16, getattr(self.model.config, "max_position_embeddings", None) or 16)
        n = max(1, length - 5)
        ids = torch.cat([(torch.arange(n) * 7 + 5) % self.model.config.vocab_size,
                         torch.full((length - n,), self.model.config.pad_token_id or 0)])
        mask = (torch.arange(length) < n).long()
        try:
            self.eval()
            alone = self._padded(ids[None, :n], mask[None, :n])
            padded = self._padded(ids[None], mask[None])
        except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError) as e:
            raise ValueError(f"--text-model {name} fails on a test caption ({type(e).__name__}: {e})") from None
        finally:
            self.train(was_training)
        if padded.shape[1] != length:  # an architecture that shortens the sequence: not comparable token by token
            return padded.shape[-1], False
        # fp32 rounding moves outputs by about 1e-6 of their size; the towers flagged move them by 5e-3 to 4
        return padded.shape[-1], not torch.allclose(padded[:, :n], alone, rtol=1e-4, atol=1e-4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids and mask [, (T,) flat positions of the real tokens] -> (B, hidden)."""
        if token_index is not None and self.packed is not None:
            hidden = self.packed(self.model, input_ids, attention_mask, token_index)  # (B, L, H)
        else:
            hidden = self._padded(input_ids, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Given a 2-D mask, transformers first asks the host whether any token is padding (`mask.all()`, a device
        # sync in every eager step); a ready (B, 1, 1, L) boolean mask goes to SDPA as it is, with the same result.
        # (A causal model gets the 2-D mask, to which transformers adds its causal part.)
        mask = attention_mask[:, None, None, :].bool() if self.sdpa and not self.causal else attention_mask
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, H)


class NoPooler(nn.Module):
    """Stands in for a removed pooler: no weights, no work. It hands back its input, which nothing reads (models call
    their pooler unconditionally, ALBERT also applies tanh to what it returns)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def is_causal(config) -> bool:
    """A decoder-only architecture (GPT-2, Llama, ...): each token sees only those before it. (An encoder-decoder's
    encoder, the tower here, sees every token.)"""
    return (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not is_encoder_decoder(config))


def is_encoder_decoder(config) -> bool:
    """T5, BART, ...: also as the config of the encoder alone, which T5 marks as neither decoder nor encoder-decoder."""
    return config.is_encoder_decoder or config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def _one_layer_decoder(config):
    """An encoder-decoder's config with a one-layer decoder, which TextEncoder builds only to drop; others as they
    are. (Random weights only: a pretrained model's checkpoint must load whole.)"""
    if not is_encoder_decoder(config):
        return config
    config = copy.deepcopy(config)
    for key in ("decoder_layers", "num_decoder_layers"):  # BART-style, T5-style
        if getattr(config, key, None):
            setattr(config, key, 1)
    return config


def check_architecture(name: str, config, pooling: str) -> None:
    """Refuse text models this tower cannot pool sensibly."""
    if is_causal(config) and pooling == "cls":
        raise ValueError(f"--text-model {name} is a causal (decoder-only) model, whose first token sees no other, "
                         f"so --text-pooling cls would give every caption the same vector: use --text-pooling mean")


def _with_sdpa(build, arg):
    """build(arg) with PyTorch's fused attention (SDPA); an architecture without that path (e.g. DeBERTa-v2) keeps
    its own attention."""
    try:
        return build(arg, attn_implementation="sdpa")
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        return build(arg, attn_implementation="eager")


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> dropout, with a residual around the second linear, then LayerNorm (the
    tutorial's head): (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.norm(x + projected)
