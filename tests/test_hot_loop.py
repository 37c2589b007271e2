"""The training step's device work never waits on the host, and the shortcuts that make it so change no number."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from clip import CLIPModel, clip_loss
from conftest import tiny_config
from dataset import on_device
from distributed import Dist
from engine import make_optimizer, train_step
from images import Pixels
from modules import TextEncoder
from packing import token_index

# the ops that copy a device value to the host: .item(), bool(tensor), nonzero with its data-dependent size
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.nonzero.default}


class HostReads(TorchDispatchMode):
    """Records every op that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


PIXELS = Pixels(32, 36, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), channels_last=True)


def squares_and_boxes():
    """Four cached 36 px squares and crop boxes, as the data loader hands them over."""
    squares = torch.randint(0, 256, (4, 36, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return squares, torch.tensor([[0, 0, 36, 36], [2, 3, 30, 33], [0, 1, 35, 34], [4, 4, 32, 32]])


def padded_tokens(batch=4, length=16, vocab=500):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 9:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask


def packed_index(mask):
    return torch.from_numpy(token_index(mask.numpy()))[0]


@pytest.mark.parametrize("packed", [False, True])
def test_forward_and_backward_of_a_training_step_never_read_a_device_value_on_the_host(packed):
    """With transformers' 2-D mask path this finds its `mask.all()` check: one sync per eager step."""
    cfg = tiny_config()
    model = CLIPModel(cfg, 500).train()
    squares, boxes = squares_and_boxes()
    ids, mask = padded_tokens()
    index = packed_index(mask) if packed else None
    with HostReads() as reads:
        images = PIXELS(squares, boxes, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_emb, text_emb, scale = model(images, ids, mask, index)
        loss = clip_loss(image_emb, text_emb, scale)
        loss.backward()
    assert reads.ops == []
    assert all(p.grad is not None for p in model.text_encoder.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu-check runs it)")
def test_a_whole_training_step_on_a_gpu_never_waits_for_it():
    """The same on a GPU, optimizer and gradient clipping included: CUDA's sync debug mode turns any sync into an
    error."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = tiny_config()
    model = CLIPModel(cfg, 500).to(device).to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    squares, boxes = (t.pin_memory() for t in squares_and_boxes())
    ids, mask = padded_tokens()
    text = {"input_ids": ids, "attention_mask": mask, "token_index": packed_index(mask)[None]}
    text = {k: v.pin_memory() for k, v in text.items()}

    def step():
        images = PIXELS(squares, boxes, device)
        return train_step(model, model, optimizer, scaler, images,
                          {k: v.to(device, non_blocking=True) for k, v in text.items()}, cfg, Dist(), device, dtype,
                          0.5)

    step()  # the first step creates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu-check runs it)")
def test_batches_copied_ahead_on_their_own_stream_arrive_whole_in_order_without_a_sync():
    """on_device copies the next batch while work on the compute stream runs. Each batch's sum is queued at once:
    without the wait for its copy it would read a half-copied batch (64 MB takes milliseconds to copy); without
    record_stream a later copy could reuse its memory while the matmuls queued before the sum still run. Nothing may
    wait on the host."""
    device = torch.device("cuda")
    batches = [{"pixels": torch.full((64, 1024, 1024), i + 1, dtype=torch.uint8).pin_memory(),  # 64 MB, never 0
                "boxes": torch.tensor([[i, 0, 64, 64]]).pin_memory()} for i in range(6)]
    busy = torch.randn(2048, 2048, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = []
        for batch in on_device(batches, device):
            assert all(v.device.type == "cuda" for v in batch.values())
            sums.append(torch.stack([batch["pixels"].sum(dtype=torch.int64), batch["boxes"][0, 0]]))
            for _ in range(4):  # a step's worth of kernels, during which the next copy runs
                busy = busy @ busy / 2048
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.stack(sums).tolist() == [[(i + 1) * 64 * 1024 * 1024, i] for i in range(6)]


def test_the_ready_made_attention_mask_gives_what_transformers_gives_for_the_plain_mask():
    for model_type in ("distilbert", "bert", "roberta"):
        if model_type == "distilbert":
            config = AutoConfig.for_model(model_type, n_layers=2, dim=64, n_heads=2, hidden_dim=128, vocab_size=500)
        else:
            config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                          intermediate_size=128, vocab_size=500)
        torch.manual_seed(0)
        encoder = TextEncoder(model_type, False, "mean", 500, config).eval()
        assert encoder.sdpa
        ids, mask = padded_tokens()
        with torch.no_grad():
            ours = encoder(ids, mask)
            hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state  # transformers' own path
            reference = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            unmasked = encoder.model(input_ids=ids).last_hidden_state.mean(1)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours[0], unmasked[0], atol=1e-3)  # the mask really is applied


def test_a_text_architecture_without_sdpa_builds_with_its_own_attention_and_honours_padding():
    model = CLIPModel(tiny_config(text_model="deberta-v2"), 500).eval()
    assert not model.text_encoder.sdpa
    ids, mask = padded_tokens()
    other = torch.where(mask.bool(), ids, torch.randint_like(ids, 5, 500))  # different tokens behind the padding
    with torch.no_grad():
        out = model.encode_text(ids, mask)
        assert out.shape == (4, 32) and torch.isfinite(out).all()
        torch.testing.assert_close(model.encode_text(other, mask), out)
