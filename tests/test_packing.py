"""The padding-free text tower computes what the padded one computes, with less work, and its host-side index lists
exactly the real tokens."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from dataset import Split, TrainBatches, text_batch
from modules import TextEncoder
from packing import token_index

VOCAB = 500


def encoder(model_type: str, pooling: str) -> TextEncoder:
    if model_type == "distilbert":
        config = AutoConfig.for_model(model_type, n_layers=2, dim=64, n_heads=2, hidden_dim=128, vocab_size=VOCAB)
    else:
        config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                      intermediate_size=128, vocab_size=VOCAB)
    torch.manual_seed(0)
    return TextEncoder(model_type, False, pooling, VOCAB, config).eval()  # eval: no dropout, so both paths compare


def captions(lengths, width=16):
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(5, VOCAB, (len(lengths), width), generator=g) * mask, mask


def index_of(mask, chunks=1, capacity=0):
    return torch.from_numpy(token_index(mask.numpy(), chunks, capacity))


@pytest.mark.parametrize("model_type", ["distilbert", "bert"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_packed_tower_gives_the_padded_towers_embeddings_and_gradients(model_type, pooling):
    model = encoder(model_type, pooling)
    assert model.packed is not None
    ids, mask = captions([3, 16, 7, 1, 12, 5])  # a full row, a one-token row
    index = index_of(mask, capacity=60)[0]  # 44 real tokens and 20 spare slots, whose results are never read
    padded = model(ids, mask)
    packed = model(ids, mask, index)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    weights = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(padded.square().sum(), weights, allow_unused=True)
    grads = torch.autograd.grad(packed.square().sum(), weights, allow_unused=True)
    checked = 0
    for p, a, b in zip(weights, reference, grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("model_type", ["distilbert", "bert"])
def test_the_packed_tower_drops_out_where_the_padded_one_does(model_type, monkeypatch):
    """Training runs the packed path: it must apply each of the model's dropouts (embeddings, attention weights,
    feed-forward and attention outputs) at the model's rates, as the padded one does. The tests above run in eval
    mode, and the two paths draw different masks (other shapes), so here the dropout calls are compared."""
    model = encoder(model_type, "mean").train()
    ids, mask = captions([3, 16, 7, 1, 12, 5])
    dropout, attention, calls = F.dropout, F.scaled_dot_product_attention, []

    def counted_dropout(x, p=0.5, training=True, inplace=False):
        calls.append(("dropout", p)) if training and p > 0 else None
        return dropout(x, p, training, inplace)

    def counted_attention(*args, dropout_p=0.0, **kwargs):
        calls.append(("attention", dropout_p)) if dropout_p > 0 else None
        return attention(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(F, "dropout", counted_dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_attention)
    model(ids, mask)
    padded, calls[:] = list(calls), []
    model(ids, mask, index_of(mask)[0])
    layers = 2
    assert len(padded) >= 1 + 2 * layers and {p for _, p in padded} == {0.1}  # transformers' default rates
    assert sorted(calls) == sorted(padded)
    calls[:] = []
    model.eval()(ids, mask, index_of(mask)[0])
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu-check runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_tower_matches_the_padded_one_on_a_gpu(dtype):
    """CUDA's attention and indexing kernels, under the training step's autocast."""
    model = encoder("distilbert", "mean").cuda()
    ids, mask = captions([3, 16, 7, 1, 12, 5] * 8)
    index = index_of(mask, capacity=400)[0].cuda()
    ids, mask = ids.cuda(), mask.cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        padded, packed = model(ids, mask), model(ids, mask, index)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(packed.float(), padded.float(), **tol)


def test_packing_skips_the_padding_work():
    """Half the positions are padding: the per-token layers (nearly all of the tower's FLOPs) do half the work."""
    model = encoder("distilbert", "cls")
    ids, mask = captions([4] * 8, width=8)

    def flops(*args):
        with FlopCounterMode(display=False) as counter:
            model(*args).sum().backward()
        return counter.get_total_flops()

    ratio = flops(ids, mask, index_of(mask)[0]) / flops(ids, mask)
    assert 0.45 < ratio < 0.56


def test_an_architecture_without_a_packed_path_runs_padded_with_an_index():
    model = encoder("roberta", "mean")
    assert model.packed is None
    ids, mask = captions([3, 9, 16])
    torch.testing.assert_close(model(ids, mask, index_of(mask)[0]), model(ids, mask))


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_the_index_lists_each_micro_batchs_real_tokens_in_order(chunks):
    _, mask = captions([3, 16, 7, 1, 12, 5, 9])
    index = index_of(mask, chunks)
    parts = mask.tensor_split(chunks)  # as gradient caching splits a batch
    assert index.shape[0] == chunks and index.shape[1] % 8 == 0
    for row, part in zip(index, parts):
        real = torch.nonzero(part.flatten()).flatten()
        assert torch.equal(row[:len(real)], real)
        assert (row[len(real):] == real[0]).all()  # spare slots repeat a real token, so every read is in bounds
    assert index.shape[1] == -(-max(int(p.sum()) for p in parts) // 8) * 8
    assert index_of(mask, chunks, capacity=100).shape == (chunks, 104)


def test_a_compiled_run_gives_every_batch_of_every_epoch_one_index_shape():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 17, 50).astype(np.int32)
    tokens = np.where(np.arange(16)[None, :] < lengths[:, None], 7, 0).astype(np.int32)
    split = Split("train", [f"{i}.jpg" for i in range(50)], np.arange(50), [""] * 50, np.arange(51), tokens,
                  lengths)
    batches = TrainBatches(split, None, 8, 0, 0.9, 0, drop_last=True, fixed_length=16, pack_chunks=2)
    most = batches.fix_token_capacity(epochs=3)
    widths, fullest = set(), 0
    for epoch in range(3):
        for captions_ in batches.plan(epoch):
            text = text_batch(split, captions_, 0, 16, 2, batches.token_capacity)  # as TrainBatches makes it
            widths.add(tuple(text["token_index"].shape))
            fullest = max(fullest, *(int(m.sum()) for m in text["attention_mask"].tensor_split(2)))
    assert widths == {(2, -(-most // 8) * 8)} and most == fullest
