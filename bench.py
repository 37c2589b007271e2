"""How fast is a training step, and does the input pipeline keep up? Baselines run in the same process, so the
ratios compare like with like.

    python bench.py                     # full sizes on a GPU: resnet50 + DistilBERT-shaped text tower, 224 px
    python bench.py --tiny              # toy sizes on the CPU in 1-2 minutes (the CI smoke test)
    python bench.py --json bench.json   # also write every number
    python bench.py --sweep             # also try variants of the compiled step (minutes each on a GPU)
    python bench.py --sweep-only        # those variants alone
    python bench.py --profile prof/     # also where each of our steps spends its time (tables, Chrome traces)

(a) the popular tutorial's step: fp32, batch 32, its soft-target loss, its AdamW groups, reading the loss back
    every step (its progress bar), under PyTorch's default backend settings, which it leaves alone; once more late in
    the run in strict fp32 (TF32 off for convolutions too, as some setups have it), which is not a baseline
(b) open_clip's CustomTextCLIP step with the closest towers it supports: timm resnet50 + a 6-layer BERT of
    DistilBERT's width, bf16 autocast, its ClipLoss, as its training script runs it; at our synthetic rows' batch and
    at the end-to-end rows' batch (every row's ratio is to open_clip at the row's own batch), and late in the run
    under torch.compile (its opt-in --torchcompile), which is not a baseline
(c) this project's step (bf16, channels_last, fused AdamW, SDPA, padding-free text tower packed to train.py's fixed
    width), eager and under torch.compile, and eager with a padded text tower; with --sweep also the compiled step's
    variants (CUDA graphs, inductor settings, a bigger batch, padded text). Ours, as train.py, adds each loss to a
    window on the device and reads it back every --log-every steps
(d) this project's whole training loop on the built-in set drawn at Flickr's size (500x375 JPEGs): the image cache,
    data-loader workers, copies to the device on a stream of their own, device-side augmentation, the step;
    compiled, then once more with the other side of a new default (CANDIDATES), then eager
(e) the input pipeline alone, in images/s: cache vs decoding JPEGs
(f) evaluation: embed 1,000 images and 5,000 captions and compute recall
(g) checkpoint: how long the loop waits for a save, written in place vs by the background writer
Synthetic batches use random pixels and token ids with caption-like lengths (uniform from a third of the padded
length to all of it: 16-48 tokens, more than Flickr30k's). MFU = model FLOPs (torch's flop counter, forward +
backward, counted on the timed batch) per second / a measured dense bf16 (CPU: fp32) matmul peak. A padding-free text
tower does fewer FLOPs per sample than a padded one on the same batch, so compare rows by samples/s.
"""

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import timm
import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F
from torch._decomp import decomposition_table
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, DistilBertConfig, DistilBertModel

from checkpoint import BackgroundWriter, capture, save_checkpoint
from clip import CLIPModel, clip_loss
from config import Config
from dataset import PREFETCH, TEXT_KEYS, CaptionData, Split, TrainBatches, batch_loader, on_device
from distributed import Dist
from engine import (CUDA_INDUCTOR, MAX_POOL_BACKWARD, compile_model, lower_max_pool_backward, make_optimizer,
                    micro_texts, train_step)
from evaluate import evaluate
from images import JpegSource, Pixels
from modules import ProjectionHead
from packing import token_index
from shapes import make_shapes
from tokenizer import train_wordpiece
from utils import autocast, pick_device, provenance


@dataclass
class Sizes:
    image_model: str
    image_size: int
    text_layers: int
    text_width: int
    text_heads: int
    vocab: int
    tokens: int  # padded caption length of every batch: what train.py --compile pads Flickr captions to
    tutorial_batch: int
    batch: int
    big_batch: int
    steps: int
    warmup: int
    workers: int
    e2e_images: int
    e2e_size: tuple
    eval_images: int


FULL = Sizes("resnet50", 224, 6, 768, 12, 30522, 48, 32, 256, 512, 20, 5, 12, 6144, (500, 375), 1000)
TINY = Sizes("resnet10t", 32, 2, 64, 2, 1000, 16, 8, 16, 16, 3, 1, 2, 120, (125, 94), 40)


def row(section: str, name: str, samples_s: float, flops_per_sample: float, batch: int) -> dict:
    return {"section": section, "name": name, "samples_s": samples_s, "gflop_per_sample": flops_per_sample / 1e9,
            "batch": batch}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step, samples: int, sizes: Sizes, device, warmup: int = 0, steps: int = 0) -> float:
    """samples/s of `step()` after warm-up (which also absorbs compilation); one sync at each end. A row's peak
    memory counts from here (the FLOP count's eager pass before it is left out) to the end of its section."""
    warmup, steps = warmup or sizes.warmup, steps or sizes.steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * samples / (time.perf_counter() - start)


def loader_throughput(step, samples: int, sizes: Sizes, device) -> float:
    """throughput() of steps that draw from a data loader started just before: the batches its workers queue up at
    the start run untimed, and the timing covers twice as many again, so read-ahead is never timed as loading."""
    queued = max(1, sizes.workers) * PREFETCH
    return throughput(step, samples, sizes, device, warmup=queued, steps=max(sizes.steps, 2 * queued))


def synthetic_batch(n: int, sizes: Sizes, tokens: int, device) -> tuple[torch.Tensor, dict]:
    """Random pixels (n, 3, S, S) and a text batch: token ids and mask (n, tokens), and token_index (packing.py)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, sizes.image_size, sizes.image_size, generator=g)
    ids = torch.randint(1000 % sizes.vocab, sizes.vocab, (n, tokens), generator=g)
    lengths = torch.randint(tokens // 3, tokens + 1, (n,), generator=g)  # caption-like padding
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    ids[~mask] = 0
    # packed to the width train.py gives every batch: that of the fullest of a run's batches (here 1,000 drawn alike)
    capacity = int(torch.randint(tokens // 3, tokens + 1, (1000, n), generator=g).sum(1).max())
    text = {"input_ids": ids, "attention_mask": mask,
            "token_index": torch.from_numpy(token_index(mask.numpy(), capacity=capacity))}
    return images.to(device), {k: v.to(device) for k, v in text.items()}


def step_flops(fn) -> float:
    """FLOPs of one call of fn (forward + backward), counted by torch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


# --- (a) the tutorial ---------------------------------------------------------------------------------------------

class TutorialCLIP(torch.nn.Module):
    """The popular tutorial's model: unnormalised projections, temperature 1, soft targets from in-modality
    similarities, fp32 throughout."""

    def __init__(self, sizes: Sizes):
        super().__init__()
        self.image_encoder = timm.create_model(sizes.image_model, pretrained=False, num_classes=0, global_pool="avg")
        self.text_encoder = DistilBertModel(distilbert_config(sizes))
        self.image_projection = ProjectionHead(self.image_encoder.num_features, 256, 0.1)
        self.text_projection = ProjectionHead(sizes.text_width, 256, 0.1)

    def forward(self, images, ids, mask):
        image_emb = self.image_projection(self.image_encoder(images))
        text_emb = self.text_projection(self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
        logits = text_emb @ image_emb.T
        targets = F.softmax((image_emb @ image_emb.T + text_emb @ text_emb.T) / 2, dim=-1)
        texts_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
        images_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
        return ((images_loss + texts_loss) / 2).mean()


def distilbert_config(sizes: Sizes) -> DistilBertConfig:
    return DistilBertConfig(vocab_size=sizes.vocab, n_layers=sizes.text_layers, dim=sizes.text_width,
                            n_heads=sizes.text_heads, hidden_dim=4 * sizes.text_width)


# How each contestant sets up cuDNN and cuBLAS. The tutorial leaves PyTorch's defaults: exact fp32 matmuls (cuDNN's
# convolutions do use TF32 by default) and no autotuning. open_clip's training script (open_clip_train/main.py) and
# train.py turn on TF32 matmuls and cudnn.benchmark.
PYTORCH_DEFAULTS = {"benchmark": False, "matmul_tf32": False, "conv_tf32": True}
TUNED = {"benchmark": True, "matmul_tf32": True, "conv_tf32": True}
# fp32 in the strict sense, TF32 off for convolutions too: one guess at the 545 samples/s (ours measured 782)
STRICT_FP32 = {"benchmark": False, "matmul_tf32": False, "conv_tf32": False}
BACKENDS = {"tutorial": PYTORCH_DEFAULTS, "tutorial_strict_fp32": STRICT_FP32}  # every other section: TUNED
BASELINES = {"tutorial": "tutorial", "open_clip": "open_clip", "open_clip_big": "open_clip"}  # section -> contestant


@contextlib.contextmanager
def cuda_backends(benchmark: bool, matmul_tf32: bool, conv_tf32: bool):
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = flags[0].benchmark, flags[1].allow_tf32, flags[0].allow_tf32
    flags[0].benchmark, flags[1].allow_tf32, flags[0].allow_tf32 = benchmark, matmul_tf32, conv_tf32
    try:
        yield
    finally:
        flags[0].benchmark, flags[1].allow_tf32, flags[0].allow_tf32 = saved


def bench_tutorial(sizes: Sizes, device, label: str = ""):
    model = TutorialCLIP(sizes).to(device).train()
    heads = [*model.image_projection.parameters(), *model.text_projection.parameters()]
    optimizer = torch.optim.AdamW([  # the tutorial's groups: weight decay on the projection heads only
        {"params": model.image_encoder.parameters(), "lr": 1e-4},
        {"params": model.text_encoder.parameters(), "lr": 1e-5},
        {"params": heads, "lr": 1e-3, "weight_decay": 1e-3}], weight_decay=0.0)
    images, text = synthetic_batch(sizes.tutorial_batch, sizes, sizes.tokens, device)
    batch = images, text["input_ids"], text["attention_mask"]

    def step():
        loss = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the tutorial's loss meter reads every step's loss on the host

    flops = step_flops(lambda: model(*batch).backward()) / sizes.tutorial_batch
    rate = throughput(step, sizes.tutorial_batch, sizes, device, steps=5 * sizes.steps)  # steps of ~40 ms on an H100
    return [row("a", f"tutorial, fp32{label}", rate, flops, sizes.tutorial_batch)]


# --- (b) open_clip ------------------------------------------------------------------------------------------------

def bench_open_clip(sizes: Sizes, device, dtype, batch: int, compile_: bool = False):
    """open_clip's step as its training script runs it: bf16 autocast, ClipLoss with cached labels, AdamW, the
    temperature's clamp; with compile_, wrapped in torch.compile as its --torchcompile does."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with tempfile.TemporaryDirectory() as bert_dir:
        BertConfig(vocab_size=sizes.vocab, num_hidden_layers=sizes.text_layers, hidden_size=sizes.text_width,
                   num_attention_heads=sizes.text_heads, intermediate_size=4 * sizes.text_width,
                   pad_token_id=0).save_pretrained(bert_dir)
        model = open_clip.CustomTextCLIP(
            embed_dim=256,
            vision_cfg=CLIPVisionCfg(timm_model_name=sizes.image_model, timm_model_pretrained=False, timm_pool="avg",
                                     timm_proj="linear", image_size=sizes.image_size),
            text_cfg=CLIPTextCfg(hf_model_name=bert_dir, hf_model_pretrained=False, context_length=sizes.tokens,
                                 vocab_size=sizes.vocab)).to(device).train()
    loss_fn = open_clip.ClipLoss(cache_labels=True)  # as open_clip_train's create_loss builds it
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2)
    images, text = synthetic_batch(batch, sizes, sizes.tokens, device)
    run = torch.compile(model) if compile_ else model
    ids = text["input_ids"]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def forward(net=run):
        with autocast:
            image_features, text_features, logit_scale = net(images, ids)
            return loss_fn(image_features, text_features, logit_scale)

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))

    flops = step_flops(lambda: forward(model).backward()) / batch  # counted eagerly
    name = f"open_clip CustomTextCLIP, {str(dtype).split('.')[-1]}, batch {batch}{', compiled' if compile_ else ''}"
    try:
        with compile_settings(AS_TORCH_COMPILES if compile_ else None):  # as torch compiles it for open_clip's users
            rate = throughput(step, batch, sizes, device)
    finally:
        torch._dynamo.reset()
    return [row("b", name, rate, flops, batch)]


# inductor's own defaults for what engine.compile_model sets on CUDA (read before anything here compiles), and the
# settings that compile a model as plain torch.compile does
INDUCTOR_DEFAULTS = {key: getattr(torch._inductor.config, key) for key in CUDA_INDUCTOR}
AS_TORCH_COMPILES = {"max_pool_backward": "decomposed", **INDUCTOR_DEFAULTS}


@contextlib.contextmanager
def compile_settings(inductor: dict | None):
    """torch._inductor.config settings in force while a variant compiles, and one of our own: "max_pool_backward":
    "decomposed" compiles max-pool's backward as torch decomposes it (engine.lower_max_pool_backward)."""
    knobs = dict(inductor or {})
    decomposed = knobs.pop("max_pool_backward", None) == "decomposed"
    before = lower_max_pool_backward(False) if decomposed else None
    try:
        # torch's AOTAutograd cache keys a compile on its graph and settings, not on the decomposition table: left
        # on, the decomposed variant would reuse the lowered compile of the same model (on disk, or from this run)
        with torch._inductor.config.patch(knobs), \
                torch._functorch.config.patch(enable_autograd_cache=not decomposed):
            yield
    finally:
        if decomposed:
            lower_max_pool_backward(before)


# --- (c) this project's step --------------------------------------------------------------------------------------

def our_config(sizes: Sizes, batch: int, compile_: bool, max_length: int, mode: str = "default",
               **overrides) -> Config:
    return Config(**{**dict(image_model=sizes.image_model, image_pretrained=False, image_size=sizes.image_size,
                            text_model="distilbert", text_pretrained=False, text_layers=sizes.text_layers,
                            text_width=sizes.text_width, text_heads=sizes.text_heads, tokenizer="local",
                            max_length=max_length, batch_size=batch, compile=compile_, compile_mode=mode,
                            num_workers=sizes.workers), **overrides})


def our_model(cfg: Config, sizes: Sizes, device, dtype):
    raw = CLIPModel(cfg, sizes.vocab).to(device)
    if cfg.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model = compile_model(raw, cfg.compile_mode, device) if cfg.compile else raw
    return raw, model, optimizer, scaler


def loop_step(model, raw: CLIPModel, optimizer, scaler, cfg: Config, device, dtype):
    """train.py's work per batch once it is loaded: the step, its loss added to a window on the device, and the
    window read back on the host every --log-every steps (the loop's one sync)."""
    window, count = torch.zeros((), device=device), itertools.count(1)

    def step(images: torch.Tensor, text: dict):
        window.add_(train_step(model, raw, optimizer, scaler, images, text, cfg, Dist(), device, dtype, 1.0))
        if next(count) % cfg.log_every == 0:
            window.item()
            window.zero_()

    return step


def our_flops(raw: CLIPModel, images: torch.Tensor, text: dict, device, dtype) -> float:
    """Forward + backward FLOPs per sample of our model on a batch: a packed text tower's work depends on how many
    tokens are real."""
    (ids,), (mask,), (index,) = micro_texts(text, 1)
    with autocast(device, dtype):
        flops = step_flops(lambda: clip_loss(*raw(images, ids, mask, index)).backward())
    raw.zero_grad(set_to_none=True)
    return flops / len(images)


def profile(step, device, out: Path, steps: int = 3) -> str:
    """Where a (warmed-up) step's time goes: the top operators and kernels of a few steps, as a table in out.txt and
    a Chrome trace (ui.perfetto.dev, chrome://tracing) in out.json.gz."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = (time.perf_counter() - start) / steps
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=25)
    if device.type == "cuda":  # under 100%, the GPU waits for the host: fewer launches (CUDA graphs) or a bigger batch
        # kernels only, as torch's own table footer counts: an operator's row repeats the time of the kernels it
        # launched, and a GPU-side annotation (the optimizer step) spans kernels
        kernels = [a for a in averages if a.device_type == DeviceType.CUDA and not a.is_user_annotation]
        busy = sum(a.self_device_time_total for a in kernels) / 1e6 / steps
        table = (f"per step: GPU busy {1e3 * busy:.1f} ms of {1e3 * wall:.1f} ms ({100 * busy / wall:.0f}%, "
                 f"profiler included)\n") + table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(table)
    prof.export_chrome_trace(str(out.with_suffix(".json.gz")))  # gzipped: a GPU trace runs to megabytes
    return table


def bench_ours(sizes: Sizes, device, dtype, batch: int, tokens: int, compile_: bool, mode: str = "default",
               inductor: dict | None = None, overrides: dict | None = None, label: str = "",
               profile_dir: Path | None = None):
    """Our training step on one synthetic batch. The sweep's knobs: `mode`, `inductor` (torch._inductor.config
    settings, in force while it compiles) and `overrides` (Config fields). With profile_dir, also a profile of the
    same step."""
    cfg = our_config(sizes, batch, compile_, tokens, mode, **(overrides or {}))
    raw, model, optimizer, scaler = our_model(cfg, sizes, device, dtype)
    images, text = synthetic_batch(batch, sizes, tokens, device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if not cfg.pack_text:
        del text["token_index"]
    train = loop_step(model, raw, optimizer, scaler, cfg, device, dtype)

    def step():
        train(images, text)

    name = f"ours, {'compiled' if compile_ else 'eager'}, batch {batch}, {tokens} tokens, synthetic{label}"
    flops = our_flops(raw, images, text, device, dtype)
    try:
        with compile_settings(inductor):
            rate = throughput(step, batch, sizes, device)
            if profile_dir is not None:
                profile(step, device, profile_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
    finally:
        torch._dynamo.reset()  # the next variant compiles afresh (and frees this one's CUDA-graph memory)
    return [row("c", name, rate, flops, batch)]


# Variants of the compiled step worth measuring on each new card or torch release (python bench.py --sweep), at the
# end-to-end section's batch and caption length:
# (label, torch.compile mode, inductor settings, batch multiple, Config overrides).
# The other side of a change of default, kernels only (the same results), timed end to end too (section
# e2e_candidates): (label, inductor settings, Config overrides). Now inductor's own realize_reads_threshold, which
# engine.CUDA_INDUCTOR replaced after the synthetic sweep (CUDA graphs end to end: +0.7%, 2026-11-27)
CANDIDATES = ("realize_reads_threshold 4 (inductor's default)", INDUCTOR_DEFAULTS, {})
SWEEP = [  # the reference, those not yet measured (BENCHMARKS.md), those measured, max-autotune last (slow compile)
    ("default mode", "default", {}, 1, {}),
    # torch's scatter_add (engine.lower_max_pool_backward), where this torch decomposes it (2.11 does not: skipped)
    ("max-pool backward as torch decomposes it", "default", {"max_pool_backward": "decomposed"}, 1, {}),
    # PyTorch measured it speeding up inductor's max-pool backward 1.4-1.8x (pytorch/pytorch#103657)
    ("coordinate-descent kernel tuning", "default", {"coordinate_descent_tuning": True}, 1, {}),
    # inductor's default, ours before 2026-11-27 (engine.CUDA_INDUCTOR: 2, 1.6% faster then, 1.3% end to end on
    # 2026-11-28); timed end to end against ours in the first call too (e2e_candidates)
    ("realize_reads_threshold 4 (inductor's default)", "default", INDUCTOR_DEFAULTS, 1, {}),
    ("1.5x batch", "default", {}, 1.5, {}),
    # the default --batch-size: compare (c)'s compiled row
    ("CUDA graphs (reduce-overhead) at half the batch", "reduce-overhead", {}, 0.5, {}),  # no comma: --skip splits
    ("text padded (no packing)", "default", {}, 1, {"pack_text": False}),
    ("frozen batch-norm statistics", "default", {}, 1, {"image_freeze_bn_stats": True}),
    ("CUDA graphs (reduce-overhead)", "reduce-overhead", {}, 1, {}),
    ("1x1 convolutions as matmuls", "default", {"conv_1x1_as_mm": True}, 1, {}),
    ("max-autotune without CUDA graphs", "max-autotune-no-cudagraphs", {}, 1, {}),
]


# --- (d, e, f) real data ------------------------------------------------------------------------------------------

def flickr_sized_shapes(sizes: Sizes, root: Path) -> Path:
    folder = root / f"shapes-{sizes.e2e_size[0]}x{sizes.e2e_size[1]}-{sizes.e2e_images}"
    if not (folder / "results.csv").exists():
        make_shapes(folder, sizes.e2e_images, *sizes.e2e_size, workers=os.cpu_count() or 1)
    return folder


def open_data(folder: Path, square: int, cache: str, sizes: Sizes, max_length: int):
    data = CaptionData(folder, verbose=False)
    data.open_images(square, cache, sizes.workers)
    tokenizer_dir = folder / "tokenizer"
    tokenizer = train_wordpiece(data.splits["train"].captions, 8000, tokenizer_dir)
    data.tokenize(tokenizer, max_length)
    return data, tokenizer


def bench_end_to_end(sizes: Sizes, device, dtype, folder: Path, batch: int, tokens: int, compile_: bool,
                     inductor: dict | None = None, overrides: dict | None = None, label: str = ""):
    """The training loop's work per step, real data included, and the same steps on one batch already on the
    device (augmentation still included): the difference is what loading and the host-to-device copy cost.
    Every batch is padded to `tokens`, as wide as the synthetic ones and the FLOP count. `inductor` and `overrides`
    as in bench_ours."""
    cfg = our_config(sizes, batch, compile_, tokens, **(overrides or {}))
    raw, model, optimizer, scaler = our_model(cfg, sizes, device, dtype)
    pixels = Pixels.for_encoder(raw.image_encoder.data_config, cfg.image_size, cfg.channels_last)
    data, tokenizer = open_data(folder, pixels.square, "on", sizes, tokens)
    batches = TrainBatches(data.splits["train"], data.source, batch, tokenizer.pad_token_id, 0.9, 0, drop_last=True,
                           fixed_length=tokens, pack_chunks=1)
    indices = batches.run_indices(1000)
    batches.fix_token_capacity(1000)  # as train.py: one token_index shape
    resident = {k: v.to(device) for k, v in batches[0, 0].items()}
    train = loop_step(model, raw, optimizer, scaler, cfg, device, dtype)

    def step(b=None):
        b = b or next(stream)
        train(pixels(b["pixels"], b["boxes"], device), {k: b[k].to(device, non_blocking=True) for k in TEXT_KEYS})

    kind = f"{'compiled' if compile_ else 'eager'}, batch {batch}, {tokens} tokens{label}"
    flops = our_flops(raw, pixels(resident["pixels"], resident["boxes"], device), resident, device, dtype)
    try:
        with compile_settings(inductor):
            resident_rate = throughput(lambda: step(resident), batch, sizes, device)  # its warm-up also compiles
            # the loader starts only now, so that nothing it read ahead during compilation is timed
            stream = on_device(batch_loader(batches, indices, sizes.workers, device.type == "cuda"), device)
            loaded = loader_throughput(step, batch, sizes, device)
    finally:
        torch._dynamo.reset()
    return [row("d", f"ours, end to end, {kind}", loaded, flops, batch),
            row("d", f"ours, same steps, one batch already on the device, {kind}", resident_rate, flops, batch)]


def bench_pipeline(sizes: Sizes, device, folder: Path, cache: str, batch: int):
    """images/s from disk to normalised, augmented tensors on the device."""
    pixels = Pixels.for_encoder(timm.data.resolve_model_data_config(timm.create_model(sizes.image_model)),
                                sizes.image_size, True)
    data = CaptionData(folder, verbose=False)
    data.open_images(pixels.square, cache, sizes.workers)
    split = data.splits["train"]
    split.tokens = np.zeros((len(split.captions), 8), dtype=np.int32)
    split.lengths = np.full(len(split.captions), 8, dtype=np.int32)
    batches = TrainBatches(split, data.source, batch, 0, 0.9, 0, drop_last=True)
    loader = iter(batch_loader(batches, batches.run_indices(1000), sizes.workers, device.type == "cuda"))
    assert isinstance(data.source, JpegSource) == (cache == "off")

    def step():
        b = next(loader)
        pixels(b["pixels"], b["boxes"], device)

    rate = loader_throughput(step, batch, sizes, device)
    what = "cached squares" if cache == "on" else "decoding JPEGs"
    return {"section": "e", "name": f"input pipeline, {what}", "images_s": rate,
            "text": f"{rate:,.0f} images/s ({sizes.workers} workers)"}


def bench_eval(sizes: Sizes, device, dtype, folder: Path):
    """Time to embed eval_images images with 5 captions each and compute recall (the model is untrained)."""
    cfg = our_config(sizes, sizes.batch, False, 32)
    raw, _, _, _ = our_model(cfg, sizes, device, dtype)
    pixels = Pixels.for_encoder(raw.image_encoder.data_config, cfg.image_size, cfg.channels_last)
    data, tokenizer = open_data(folder, pixels.square, "on", sizes, 32)
    train = data.splits["train"]
    n = min(sizes.eval_images, len(train))
    split = Split("bench", train.images[:n], train.rows[:n], train.captions[:train.start[n]], train.start[:n + 1],
                  train.tokens[:train.start[n]], train.lengths[:train.start[n]])
    evaluate(raw, split, data.source, pixels, tokenizer.pad_token_id, device, dtype, 1024)  # warm-up
    sync(device)
    start = time.perf_counter()
    metrics = evaluate(raw, split, data.source, pixels, tokenizer.pad_token_id, device, dtype, 1024)
    sync(device)
    seconds = time.perf_counter() - start
    return {"section": "f", "name": "evaluation", "seconds": seconds, "images": metrics["n_images"],
            "captions": metrics["n_captions"], "text": f"{metrics['n_images']} images + {metrics['n_captions']} "
            f"captions embedded and ranked in {seconds:.2f} s"}


def bench_checkpoint(sizes: Sizes, device, dtype, root: Path):
    """What saving a checkpoint (weights, optimiser moments) costs the training loop: written in place, or copied
    off the device and written by the background writer, as train.py does."""
    cfg = our_config(sizes, 8, False, sizes.tokens)
    raw, model, optimizer, scaler = our_model(cfg, sizes, device, dtype)
    train_step(model, raw, optimizer, scaler, *synthetic_batch(8, sizes, sizes.tokens, device), cfg, Dist(), device,
               dtype, 1.0)  # the optimiser's moments exist from the first step on
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece(["a red circle", "a blue square"], 100, root / "checkpoint-tokenizer")
    writer, step = BackgroundWriter(), iter(range(1, 100))
    saves = {  # what the loop waits for: the whole save, or the copy off the device
        "in place": lambda run: save_checkpoint(run, ["last"], raw, cfg, tokenizer, {"step": next(step)}, {},
                                                optimizer, scaler),
        "background": lambda run: writer.submit(capture(raw, cfg, tokenizer, {"step": next(step)}, {}, optimizer,
                                                        scaler), run, ["last"]),
    }
    waits = {kind: [] for kind in saves}
    with tempfile.TemporaryDirectory(dir=root) as run:
        for round_ in range(4):  # the first round warms both up (the first save of a process is the slowest)
            for kind, save in saves.items():
                writer.wait()
                start = time.perf_counter()
                save(run)
                if round_:
                    waits[kind].append(time.perf_counter() - start)
        writer.wait()
        size = sum(f.stat().st_size for f in Path(run, "last").resolve().rglob("*") if f.is_file())
    in_place, waited = (float(np.median(waits[kind])) for kind in saves)
    return {"section": "g", "name": "checkpoint", "seconds": in_place, "waited_seconds": waited, "gb": size / 1e9,
            "text": f"{size / 1e9:.2f} GB; the loop waits {in_place:.2f} s writing it in place, {waited:.2f} s with "
                    f"the background writer (medians of 3)"}


# --- report -------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--tiny", action="store_true", help="toy sizes, CPU, 1-2 minutes")
    p.add_argument("--device", default="auto", help="auto (--tiny: the CPU; else CUDA, then MPS, then the CPU), or "
                   "a torch device")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--data-root", default="data/bench", help="where the Flickr-sized shapes set is drawn")
    p.add_argument("--skip", default="", help="comma-separated sections to skip, e.g. compile,open_clip")
    p.add_argument("--profile", type=Path, help="also profile each of our synthetic steps (eager, compiled, sweep) "
                   "after timing it: top kernels and a Chrome trace per step, in this folder")
    p.add_argument("--sweep", action="store_true", help="also time variants of the compiled step (CUDA graphs, "
                   "inductor settings, batch size), several minutes each on a GPU")
    p.add_argument("--sweep-only", action="store_true", help="the sweep alone, its reference variant first (for a "
                   "second, shorter call on a lent GPU)")
    p.add_argument("--sweep-first", action="store_true", help="with --sweep: its variants before the other sections "
                   "(for a second call that measures new defaults against the old ways first)")
    args = p.parse_args(argv)
    if args.sweep_first and not args.sweep:
        p.error("--sweep-first orders the sweep before the other sections: add --sweep")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):  # found out now, not at the
        p.error(f"--json {args.json}: name a file in a folder that exists")             # end of the first section
    sizes = TINY if args.tiny else FULL
    try:
        device = pick_device("cpu" if args.tiny and args.device == "auto" else args.device)
    except ValueError as e:
        p.error(str(e))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = set(filter(None, args.skip.split(",")))

    S, B, T = sizes.batch, sizes.big_batch, sizes.tokens
    # the figures the targets are about first, so that a time limit costs the others (each compile takes a minute)
    sections = [
        ("tutorial", lambda: bench_tutorial(sizes, device)),
        ("open_clip", lambda: bench_open_clip(sizes, device, dtype, S)),
        # the end-to-end rows' batch: each row is compared with open_clip at its own batch
        *([("open_clip_big", lambda: bench_open_clip(sizes, device, dtype, B))] if B != S else []),
        ("eager", lambda: bench_ours(sizes, device, dtype, S, T, False, profile_dir=args.profile)),
        ("compile", lambda: bench_ours(sizes, device, dtype, S, T, True, profile_dir=args.profile)),
        ("e2e", lambda: bench_end_to_end(sizes, device, dtype, folder, B, T, True)),
        ("pipeline", lambda: [bench_pipeline(sizes, device, folder, cache, S) for cache in ("on", "off")]),
        ("eval", lambda: [bench_eval(sizes, device, dtype, folder)]),
        ("checkpoint", lambda: [bench_checkpoint(sizes, device, dtype, Path(args.data_root))]),
        ("e2e_candidates", lambda: bench_end_to_end(sizes, device, dtype, folder, B, T, True, CANDIDATES[1],
                                                    CANDIDATES[2], f", {CANDIDATES[0]}")),
        # open_clip under its opt-in --torchcompile, as our compiled rows are under ours: not a baseline
        ("open_clip_compiled", lambda: bench_open_clip(sizes, device, dtype, B, compile_=True)),
        ("tutorial_strict_fp32", lambda: bench_tutorial(sizes, device, ", TF32 off for convolutions too")),
        ("eager_padded", lambda: bench_ours(sizes, device, dtype, S, T, False, overrides={"pack_text": False},
                                            label=", text padded (no packing)")),
        ("e2e_eager", lambda: bench_end_to_end(sizes, device, dtype, folder, S, T, False)),
    ]
    known = [tag for tag, _ in sections] + ["open_clip_big"] * (B == S) + [f"sweep: {label}" for label, *_ in SWEEP]
    if unknown := sorted(skip - set(known)):  # a typo would cost minutes of a lent GPU
        p.error(f"--skip: no section named {', '.join(map(repr, unknown))}; the sections are {', '.join(known)}")
    if args.sweep_only:
        sections = []
    if args.sweep or args.sweep_only:
        sweep = []
        for label, mode, knobs, factor, overrides in SWEEP:
            if knobs.get("max_pool_backward") == "decomposed" and MAX_POOL_BACKWARD not in decomposition_table:
                print(f"[sweep: {label}] skipped: this torch has no such decomposition, so it is the reference")
                continue
            sweep.append((f"sweep: {label}", functools.partial(
                bench_ours, sizes, device, dtype, int(B * factor), T, True, mode, knobs, overrides, f", {label}",
                args.profile)))
        sections = sweep + sections if args.sweep_first else sections + sweep
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = {"date": datetime.date.today().isoformat(), "device": card, "sizes": sizes.__dict__,
               **{k: v for k, v in provenance().items() if k != "argv"}, "rows": {}}
    peak = matmul_peak(device)
    results["matmul_peak_tflops"] = peak / 1e12
    print(f"{card}: measured matmul peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    folder = None if args.sweep_only else flickr_sized_shapes(sizes, Path(args.data_root))  # synthetic batches only
    baselines = {}  # contestant -> {batch: samples/s}
    for tag, fn in sections:
        if tag in skip:
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            with cuda_backends(**BACKENDS.get(tag, TUNED)):
                measured = fn()
        except Exception as e:  # one broken section must not cost the others' numbers
            print(f"[{tag}] FAILED {type(e).__name__}: {e}", flush=True)
            results["rows"][tag] = {"error": f"{type(e).__name__}: {e}"}
            measured = []
        finally:  # compiling included: what a time-limited run (a lent GPU) has to plan for
            seconds = results.setdefault("section_seconds", {})[tag] = round(time.perf_counter() - start, 3)
            print(f"[{tag}] {seconds:.0f} s", flush=True)
        for r in measured:
            results["rows"][r["name"]] = r
            if "samples_s" not in r:
                print(f"({r['section']}) {r['name']}: {r['text']}", flush=True)
                continue
            if device.type == "cuda":
                r["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            r["mfu"] = r["gflop_per_sample"] * 1e9 * r["samples_s"] / peak
            if tag in BASELINES:
                baselines.setdefault(BASELINES[tag], {})[r["batch"]] = r["samples_s"]
            # the tutorial's step is batch 32 by definition; open_clip is compared at the row's own batch
            vs = {k: r["samples_s"] / (by[r["batch"]] if k == "open_clip" else by[sizes.tutorial_batch])
                  for k, by in baselines.items() if k == "tutorial" or r["batch"] in by}
            r.update({f"vs_{k}": v for k, v in vs.items()})
            ratios = ", ".join(f"{v:.2f}x {k}" for k, v in vs.items())
            print(f"({r['section']}) {r['name']}: {r['samples_s']:,.0f} samples/s{f' ({ratios})' if ratios else ''}, "
                  f"{r['gflop_per_sample']:.1f} GFLOP/sample, MFU {100 * r['mfu']:.1f}%"
                  + (f", peak memory {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else ""), flush=True)
        if args.json:  # after every section: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
