"""One optimisation step: schedule, parameter groups, the (global-batch) contrastive loss, gradient caching."""

import contextlib
import math

import torch

from clip import MAX_LOGIT_SCALE, CLIPModel, clip_loss, clip_loss_rows
from config import Config
from distributed import Dist, all_reduce_, gather_with_grad
from utils import autocast


def lr_factor(step: int, total: int, warmup: int, min_frac: float = 0.0) -> float:
    """Linear warmup over `warmup` steps (1/warmup of the rate at the first, all of it at the last), then cosine
    decay to `min_frac` at `total`: a pure function."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: CLIPModel, cfg: Config) -> list[dict]:
    """Encoders and heads at their own learning rates; no weight decay on norms, biases or the temperature."""
    groups = []
    for name, module, lr in [("image", model.image_encoder, cfg.lr_image), ("text", model.text_encoder, cfg.lr_text),
                             ("head", torch.nn.ModuleList([model.image_projection, model.text_projection]),
                              cfg.lr_head)]:
        decay, no_decay = [], []
        for _, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)  # 1-d tensors: norm scales/shifts and biases
        groups += [{"name": f"{name}", "params": decay, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay},
                   {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]
    if model.logit_scale.requires_grad:
        groups.append({"name": "temperature", "params": [model.logit_scale], "lr": cfg.lr_head,
                       "base_lr": cfg.lr_head, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def make_optimizer(model: CLIPModel, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # fused AdamW: one kernel for all parameters on CUDA; the multi-tensor (foreach) path elsewhere
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6, fused=fused,
                             foreach=None if fused else True)  # betas/eps as in the CLIP paper


MAX_POOL_BACKWARD = torch.ops.aten.max_pool2d_with_indices_backward.default


def lower_max_pool_backward(lowered: bool = True) -> bool:
    """Whether torch.compile builds max-pool's backward with inductor's own kernel (True) or as torch decomposes it
    (False), for models compiled from now on in this process; returns the setting before.

    Recent torch (2.14 here; pytorch/pytorch#167318) decomposes it into a scatter_add: on CUDA a memset, atomic adds
    in fp32 and two layout changes of the ResNet stem's activation, the largest in the network. Inductor's own kernel
    gathers instead: each input pixel reads the (at most four) windows it lies in, in the tensor's own layout, with
    no atomics, fused with the add of the two gradients that reach the pool's output. The torch 2.11 of the H100
    behind BENCHMARKS.md does not decompose it, so every GPU figure there was measured with inductor's kernel (1.46
    ms of a resnet50 step at batch 256); lowering it on CUDA keeps that kernel under newer torch, whose scatter has
    not been timed on a GPU. Inductor's own byte count puts the lowered backward at 2.3% fewer bytes. On the CPU the
    decomposition is the faster one.

    torch's AOTAutograd cache does not key on the decomposition table: a process that compiles one model both ways
    must turn that cache off for one of them (bench.compile_settings does)."""
    from torch._decomp import decomposition_table
    from torch._inductor import decomposition

    table = decomposition.decompositions
    before = MAX_POOL_BACKWARD not in table
    if lowered:
        table.pop(MAX_POOL_BACKWARD, None)
    elif MAX_POOL_BACKWARD in decomposition_table:
        table[MAX_POOL_BACKWARD] = decomposition_table[MAX_POOL_BACKWARD]
    cached = getattr(decomposition, "fast_random_decomps", None)  # inductor's cached copy of the table
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    return before


# inductor's settings for compiling on CUDA. realize_reads_threshold: an element-wise result that several kernels use
# is written out once, rather than recomputed inside each of them, when computing it reads more than this many
# buffers (inductor's default: 4). At 2, resnet50 + DistilBERT's compiled step at batch 512 ran 1.6% faster on an
# H100 (1.3% end to end, 5,056 against 4,989 samples/s in one process), and inductor's own count puts resnet50's
# compiled backward at 3% fewer bytes moved (BENCHMARKS.md).
CUDA_INDUCTOR = {"realize_reads_threshold": 2}


def compile_model(model, mode: str, device: torch.device):
    """torch.compile in the given mode; on CUDA, with max-pool's backward built by inductor's own kernel and
    inductor's settings from CUDA_INDUCTOR, for this and every later compile in the process (a bench variant patches
    over them while it compiles)."""
    if device.type == "cuda":
        from torch._inductor import config

        lower_max_pool_backward(True)
        for key, value in CUDA_INDUCTOR.items():
            setattr(config, key, value)
    return torch.compile(model, mode=mode)


def contrastive_loss(image_emb, text_emb, logit_scale, d: Dist, local_loss: bool) -> torch.Tensor:
    """The loss of the global batch: every rank's pairs are negatives for everyone (features gathered with their
    gradients). With local_loss each rank computes only its own rows of the global logit matrix."""
    if d.world == 1:
        return clip_loss(image_emb, text_emb, logit_scale)
    all_images, all_texts = gather_with_grad(image_emb, d), gather_with_grad(text_emb, d)
    if local_loss:
        return clip_loss_rows(image_emb, text_emb, all_images, all_texts, logit_scale, d.rank * len(image_emb))
    return clip_loss(all_images, all_texts, logit_scale)


class _ReplayRNG:
    """Draw the same random numbers (dropout) when a micro-batch is embedded a second time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def __enter__(self):
        self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def micro_texts(text: dict, chunks: int) -> tuple[tuple, tuple, tuple]:
    """A text batch's ids, masks and token indices per micro-batch (rows split as tensor_split splits them).

    text: input_ids and attention_mask (B, L), and optionally token_index (chunks, T): row c lists micro-batch c's
    real tokens (packing.token_index); without it the text tower runs padded."""
    index = text.get("token_index")
    if index is not None and len(index) != chunks:
        raise ValueError(f"token_index has {len(index)} rows for {chunks} micro-batches")
    return (text["input_ids"].tensor_split(chunks), text["attention_mask"].tensor_split(chunks),
            tuple(index) if index is not None else (None,) * chunks)


def backward_grad_cache(model, raw: CLIPModel, images, text: dict, chunks: int, d: Dist, local_loss: bool, device,
                        dtype, scaler) -> torch.Tensor:
    """Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup"): the same loss and gradients as one big batch, with activations for only one micro-batch at a time.
    Batch norm in training mode is the exception: it normalises each micro-batch with that micro-batch's statistics.

    1. embed every micro-batch without a graph;  2. loss over the whole (global) batch, backward to the embeddings;
    3. re-embed each micro-batch with a graph and push the cached embedding gradients through it.
    """
    # even micro-batches: a short last batch of n >= 2 * chunks pairs splits into parts of 2 or more
    micro = list(zip(images.tensor_split(chunks), *micro_texts(text, chunks)))
    # batch-norm running statistics move in pass 3 only: once per micro-batch, as K steps of the micro-batch size
    # would move them (not once with the whole batch's statistics)
    buffers = [b.detach().clone() for b in raw.buffers()]
    rngs, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for x, *t in micro:
            rngs.append(_ReplayRNG(device))
            with autocast(device, dtype):
                img, txt, _ = model(x, *t)
            image_parts.append(img.clone())  # under CUDA graphs the next call reuses the output memory
            text_parts.append(txt.clone())
    for b, saved in zip(raw.buffers(), buffers):
        b.copy_(saved)
    image_emb = torch.cat(image_parts).requires_grad_()
    text_emb = torch.cat(text_parts).requires_grad_()
    loss = contrastive_loss(image_emb, text_emb, raw.scale(), d, local_loss)
    scaler.scale(loss).backward()  # -> image_emb.grad, text_emb.grad, and the temperature's gradient
    image_grads, text_grads = image_emb.grad.tensor_split(chunks), text_emb.grad.tensor_split(chunks)
    # pass 3 adds into gradient buffers of its own: autograd would keep the first backward's output as .grad, and
    # under CUDA graphs (--compile-mode reduce-overhead) that memory is the graph's, which the next replay overwrites
    for p in raw.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    for i, ((x, *t), rng) in enumerate(zip(micro, rngs)):
        sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
        with rng, (model.no_sync() if not sync else contextlib.nullcontext()):
            with autocast(device, dtype):
                img, txt, scale = model(x, *t)
            # a learned scale enters with a zero gradient so that DDP sees every parameter used (its real gradient
            # was accumulated in step 2 and is averaged across ranks with the rest at the last micro-batch)
            outputs, grads = [img, txt], [image_grads[i], text_grads[i]]
            if scale.requires_grad:  # not with --no-learn-temperature
                outputs, grads = outputs + [scale], grads + [torch.zeros_like(scale)]
            torch.autograd.backward(outputs, grads)
    return loss.detach()


def clip_gradients(raw: CLIPModel, optimizer, scaler, max_norm: float) -> None:
    """Scale the gradients so that their global norm is at most max_norm, as clip_grad_norm_ does.

    With fused AdamW and no fp16 grad scaler, the scale rides in the optimiser's kernel instead (its grad_scale
    input divides every gradient as it reads it), which saves a pass over all gradients (read and write, 0.7 GB for
    resnet50 + DistilBERT) in every step; train_step removes it after the update."""
    scaler.unscale_(optimizer)
    if optimizer.defaults.get("fused") and not scaler.is_enabled():
        grads = [p.grad for p in raw.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        # clip_grad_norm_'s 1e-6; the fused kernels read the scale as fp32
        optimizer.grad_scale = torch.clamp((total.float() + 1e-6) / max_norm, min=1.0)
    else:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm, foreach=True)


def train_step(model, raw: CLIPModel, optimizer, scaler, images, text: dict, cfg: Config, d: Dist, device, dtype,
               lr_scale: float) -> torch.Tensor:
    """Forward, backward and update on one batch; returns the loss as a device tensor (no host sync).

    images: (B, 3, H, W); text: input_ids, attention_mask and optionally token_index, as micro_texts reads them."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_scale
    if cfg.accum_steps > 1:
        loss = backward_grad_cache(model, raw, images, text, cfg.accum_steps, d, cfg.local_loss, device, dtype, scaler)
    else:
        (ids,), (mask,), (index,) = micro_texts(text, 1)
        with autocast(device, dtype):
            image_emb, text_emb, scale = model(images, ids, mask, index)
        loss = contrastive_loss(image_emb, text_emb, scale, d, cfg.local_loss)
        scaler.scale(loss).backward()
    if cfg.grad_clip:
        clip_gradients(raw, optimizer, scaler, cfg.grad_clip)
    try:
        scaler.step(optimizer)
    finally:
        optimizer.__dict__.pop("grad_scale", None)  # a clip handed to the fused kernel holds for this step only
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the temperature's cap, on the parameter (see CLIPModel.scale)
        raw.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    return loss.detach()


def global_mean(loss: torch.Tensor, d: Dist) -> torch.Tensor:
    """The batch loss as one process would report it (under --local-loss each rank holds only its rows' share)."""
    if d.world == 1:
        return loss
    return all_reduce_(loss.clone(), d) / d.world
