"""Train CLIP on captioned images: config -> seed -> device -> data -> model -> optimiser -> loop -> final eval.

    python train.py --preset shapes --data-dir data/shapes --run-dir runs/shapes       # built-in set, CPU minutes
    python train.py --data-dir data/flickr30k --run-dir runs/flickr                    # the real recipe, on a GPU
    torchrun --nproc_per_node 8 train.py --data-dir data/flickr30k --run-dir runs/ddp  # many GPUs

Every Config field is a flag (`python train.py --help`). RUN/ gets config.json, env.json (code and library versions),
splits.json (the images of each split), metrics.jsonl (one line per epoch), curves.png (redrawn every epoch),
test_metrics.json, and the `last` and `best` checkpoints (see checkpoint.py).
"""

import itertools
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import (BackgroundWriter, CheckpointError, capture, load_training_state, load_weights, read_tokenizer,
                        rng_state)
from clip import CLIPModel
from config import Config, save_config
from dataset import RUN_SPLITS, TEXT_KEYS, CaptionData, TrainBatches, batch_loader, on_device, record_split
from distributed import Dist, barrier, broadcast_object, cleanup, gather_objects, init_distributed
from engine import compile_model, global_mean, lr_factor, make_optimizer, train_step
from evaluate import evaluate, format_table
from images import Pixels
from modules import hub_repos
from plots import plot_curves
from runs import drop_rows_after, find_run_dir, interrupted, prepare_run_dir, resolve_config
from tokenizer import load_tokenizer
from utils import (HubError, append_jsonl, fast_cuda_kernels, pick_device, pick_precision, provenance, seed_everything,
                   write_json)


def stop(signum, frame):
    """SIGTERM (a scheduler's stop: SLURM, Kubernetes, `timeout`) ends the run as Ctrl-C does, not on the spot: a
    checkpoint being written is finished, and the run says how to resume."""
    raise KeyboardInterrupt


def main(argv=None) -> dict:
    cfg = resolve_config(argv, __doc__)
    d = init_distributed(cfg.device)
    writer = BackgroundWriter()  # checkpoints go to disk while training goes on
    handles_signals = threading.current_thread() is threading.main_thread()  # Python's rule for signal handlers
    on_sigterm = signal.signal(signal.SIGTERM, stop) if handles_signals else None
    try:
        return train(cfg, d, writer)
    except KeyboardInterrupt:
        writer.wait()  # first, so that RUN/last is the one named
        if d.main:
            print(interrupted(cfg, d), file=sys.stderr)
        raise
    except (CheckpointError, FloatingPointError) as e:  # a full or read-only disk, or weights gone bad: no traceback
        raise SystemExit(f"train.py: error: {e}\n{interrupted(cfg, d, 'stopped')}") from None
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            writer.wait()  # a checkpoint that was started is finished, whatever stopped the run
        finally:
            cleanup(d)


def build(cfg: Config, d: Dist, device: torch.device, dtype: torch.dtype, run_dir: Path):
    """Data, tokenizer, model, optimiser, batches and, with --resume, the saved state: the part of a run where bad
    input shows up, before any file of the run is written."""
    # --- data and tokenizer ---
    data = CaptionData(cfg.data_dir, verbose=d.main)
    train_split = data.splits["train"]
    for rank_turn in (True, False):  # rank 0 first trains the tokenizer / builds the image cache; then the others
        if d.main == rank_turn:
            tokenizer = read_tokenizer(run_dir / "last") if cfg.resume else load_tokenizer(
                cfg.tokenizer, cfg.text_model, cfg.data_dir, lambda: train_split.captions, cfg.vocab_size)
        barrier(d)

    # --- model ---
    raw = CLIPModel(cfg, len(tokenizer), pad_id=tokenizer.pad_token_id).to(device)
    pixels = Pixels.for_encoder(raw.image_encoder.data_config, cfg.image_size, cfg.channels_last)
    if cfg.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    for rank_turn in (True, False):
        if d.main == rank_turn:
            data.open_images(pixels.square, cfg.image_cache, cfg.num_workers)
        barrier(d)
    data.tokenize(tokenizer, cfg.max_length)
    train_split, val_split = data.splits["train"], data.splits["val"]
    if d.main:
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{len(train_split)} train / {len(val_split)} val / {len(data.splits['test'])} test images; "
              f"model {n_params / 1e6:.1f}M parameters on {device} ({str(dtype).split('.')[-1]}), "
              f"{d.world} process(es) x batch {cfg.batch_size}")
        if cfg.text_pooling == "cls" and tokenizer.cls_token_id is None:  # T5's, for one
            print("note: the tokenizer puts no [CLS] token first, so --text-pooling cls takes the first word's vector;"
                  " --text-pooling mean is the usual choice here (open_clip's for T5)")
        if raw.text_encoder.padding_mixes_in:
            print(f"note: --text-model {cfg.text_model} lets a caption's padding change its own tokens' outputs "
                  f"(it mixes positions outside attention), so a caption's vector depends a little on the longest "
                  f"caption in its batch, in training, evaluation and search alike")
        if cfg.batch_size * d.world > len(train_split) and not cfg.compile:  # compiled: no batch at all (below)
            print(f"note: the batch ({d.world} x {cfg.batch_size}) is larger than the {len(train_split)} training "
                  f"images, so each epoch is one batch of {d.world * (len(train_split) // d.world)}")

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in raw.image_encoder.modules())
    if d.main and cfg.accum_steps > 1 and has_bn and cfg.image_trainable and not cfg.image_freeze_bn_stats:
        batch = min(cfg.batch_size, len(train_split) // d.world)  # a small training set caps it (the note above)
        print(f"note: with --accum-steps {cfg.accum_steps}, the image tower's batch norms normalise micro-batches of "
              f"{batch // cfg.accum_steps}, so gradients are close to, not equal to, one batch of {batch}'s"
              + (" (--image-freeze-bn-stats makes them equal)" if cfg.image_pretrained else ""))
    if d.main and cfg.accum_steps > 1 and cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune") \
            and device.type == "cuda":
        print(f"note: gradient caching (--accum-steps) under CUDA graphs (--compile-mode {cfg.compile_mode}) has not "
              "been checked on a GPU yet (BENCHMARKS.md); --compile-mode default is the checked combination")

    # --- optimiser and state ---
    optimizer = make_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = TrainBatches(train_split, data.source, cfg.batch_size, tokenizer.pad_token_id, cfg.crop_scale_min,
                           cfg.seed, d.rank, d.world, drop_last=cfg.compile,  # compiled: one batch shape
                           fixed_length=cfg.max_length if cfg.compile else 0,
                           min_pairs=2 * cfg.accum_steps,  # so that a short last batch has micro-batches of 2+
                           pack_chunks=cfg.accum_steps if cfg.pack_text and raw.text_encoder.packed else 0)
    if len(batches) == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} x {d.world} process(es) exceeds the {len(train_split)} "
                         f"training images" + (", and --compile drops a last batch smaller than the rest (one shape "
                                               "for the compiled model): lower --batch-size" if cfg.compile else ""))
    if batches.pack_chunks:
        batches.fix_token_capacity(cfg.epochs)  # one token_index shape for the whole run, eager or compiled
    state = {"step": 0, "epoch": 0, "batch": 0, "best": -1.0, "loss_sum": 0.0, "loss_count": 0}
    if cfg.resume:
        state = load_training_state(run_dir / "last", raw, optimizer, scaler, d.rank)
        if state["batch"] > len(batches):
            raise ValueError(f"--resume: {run_dir}/last was saved after batch {state['batch']} of an epoch, which now "
                             f"has {len(batches)}: the training set changed; resume with the data it started with")
    return data, tokenizer, raw, pixels, optimizer, scaler, batches, state


def train(cfg: Config, d: Dist, writer: BackgroundWriter) -> dict:
    # --- device, input, run directory: bad input stops the run here with one line, before any file is written ---
    try:
        device = torch.device("cuda", d.local_rank) if d.enabled and cfg.device == "auto" and \
            torch.cuda.is_available() else pick_device(cfg.device)
        dtype = pick_precision(cfg.precision, device)
        run_dir = find_run_dir(cfg, d)
        seed_everything(cfg.seed + d.rank)
        data, tokenizer, raw, pixels, optimizer, scaler, batches, state = build(cfg, d, device, dtype, run_dir)
    except (ValueError, FileNotFoundError, HubError) as e:
        repos = hub_repos(cfg.image_model, cfg.image_pretrained, cfg.text_model, cfg.text_pretrained,
                          cfg.tokenizer) if isinstance(e, HubError) else []
        if len(repos) > 1:  # one trip to a machine with internet fetches them all, not one per failed start
            e = f"{e}\n  - all that this run loads from the Hub: " + "; ".join(f"hf download {r}" for r in repos)
        raise SystemExit(f"train.py: error: {e}") from None
    fast_cuda_kernels(device)
    prepare_run_dir(run_dir, cfg, d)
    cfg.run_dir = str(run_dir)
    if d.main:
        save_config(cfg, run_dir / "config.json")
        write_json(run_dir / "env.json", {**provenance(), "world_size": d.world, "device": str(device),
                                          "dtype": str(dtype)})
        earlier = record_split(run_dir / RUN_SPLITS, data, cfg.resume)  # what evaluate.py checks against
        if earlier:
            print(f"warning: {len(earlier)} val/test images (e.g. {earlier[:3]}) were training images earlier in "
                  f"this run: {cfg.data_dir} or its default split changed since the run began, so val and test "
                  f"recall overstate the model")
        if cfg.resume:
            drop_rows_after(run_dir / "metrics.jsonl", state["epoch"])
            print(f"resuming {run_dir} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    val_split = data.splits["val"]
    steps_per_epoch = len(batches)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_frac * total_steps)
    model = raw
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode, device)

    saved_any = cfg.resume  # whether RUN/last holds a checkpoint of this run, for the message of a non-finite loss

    def save(links, metrics=None):
        nonlocal saved_any
        saved_any = True
        rngs = gather_objects(rng_state(), d)
        if d.main:  # the copy off the device happens now; the writing in the background
            writer.submit(capture(raw, cfg, tokenizer, {**state, "metrics": metrics}, provenance(), optimizer, scaler,
                                  rngs), run_dir, links)
        barrier(d)

    # --- loop ---
    global_batch = cfg.batch_size * d.world

    def lr_at(epoch: int, batch: int) -> float:
        """The schedule is read off the epoch and batch, not the saved step count: a run resumed with other steps per
        epoch (another --batch-size or number of processes) goes on from the same point of its epochs."""
        return lr_factor(epoch * steps_per_epoch + batch, total_steps, warmup, cfg.min_lr_frac)

    last_metrics, lr_scale = {}, lr_at(state["epoch"], state["batch"])
    # one loader (and one set of worker processes) for the rest of the run; it reads ahead across epoch ends
    loader = on_device(batch_loader(batches, batches.run_indices(cfg.epochs, state["epoch"], state["batch"]),
                                    cfg.num_workers, device.type == "cuda"), device)
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        bar = tqdm(itertools.islice(loader, steps_per_epoch - state["batch"]), total=steps_per_epoch,
                   initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not d.main, unit="batch",
                   dynamic_ncols=True)
        window = torch.zeros((), device=device)  # sum of losses since the last read-back, kept on the device
        window_steps, tick = 0, time.perf_counter()
        epoch_start = time.perf_counter()

        def read_losses():
            """The one host sync: check the losses since the last read and add them to the epoch's tally."""
            nonlocal window_steps, tick
            writer.check()  # a checkpoint that failed to write stops the run now, not at the next save
            if window_steps == 0:
                return
            value = window.item() / window_steps
            if not math.isfinite(value):
                raise SystemExit(  # one line, as for bad input: nothing to debug in a traceback
                    f"train.py: error: the loss became {value} by step {state['step']} (epoch {epoch + 1}); "
                    f"stopped. Likely causes: learning rates too high (--lr-image/--lr-text/--lr-head), fp16 "
                    f"overflow (try --precision bf16 or fp32), or broken inputs. "
                    + (f"The last good checkpoint is {run_dir}/last" if saved_any else
                       "No checkpoint was saved before it, so there is none to resume: start the run over"))
            state["loss_sum"] += value * window_steps
            state["loss_count"] += window_steps
            now = time.perf_counter()
            bar.set_postfix(loss=f"{value:.3f}", samples_s=f"{window_steps * global_batch / (now - tick):.0f}",
                            lr=f"{lr_scale:.2f}x")
            window.zero_()
            window_steps, tick = 0, now

        for batch in bar:
            images = pixels(batch["pixels"], batch["boxes"], device)
            text = {k: batch[k].to(device, non_blocking=True) for k in TEXT_KEYS if k in batch}
            lr_scale = lr_at(epoch, state["batch"])
            loss = train_step(model, raw, optimizer, scaler, images, text, cfg, d, device, dtype, lr_scale)
            window += global_mean(loss, d)
            window_steps += 1
            state["step"] += 1
            state["batch"] += 1
            if window_steps == cfg.log_every:
                read_losses()
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["batch"] < steps_per_epoch:
                read_losses()  # a checkpoint never holds weights after an unchecked loss
                save(["last"])
        read_losses()
        bar.close()

        # --- end of epoch: validate, log, checkpoint ---
        seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch + 1, "step": state["step"],
                   "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                   "logit_scale": raw.scale().item(), "lr_scale": lr_scale, "seconds": round(seconds, 1)}
        if d.main:
            val = evaluate(raw, val_split, data.source, pixels, tokenizer.pad_token_id, device, dtype,
                           cfg.eval_batch_size, loss_batch_size=cfg.batch_size * d.world)
            metrics.update({f"val_{k}": v for k, v in val.items() if not k.startswith("n_")})
            append_jsonl(run_dir / "metrics.jsonl", metrics)
            plot_curves(run_dir)
            print(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.3f}, val loss {val['loss']:.3f}, "
                  f"val R@1/5/10 i2t {val['i2t_R@1']:.1f}/{val['i2t_R@5']:.1f}/{val['i2t_R@10']:.1f} "
                  f"t2i {val['t2i_R@1']:.1f}/{val['t2i_R@5']:.1f}/{val['t2i_R@10']:.1f}, {seconds:.0f} s")
        score = broadcast_object(metrics.get("val_mean_recall", -1.0), d)
        best = score > state["best"]  # a tie keeps the earlier checkpoint: a later one is no better
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0, best=max(score, state["best"]))
        save(["last", "best"] if best else ["last"], metrics)
        last_metrics = metrics

    # --- final evaluation of the best checkpoint on the test split ---
    if d.main:
        writer.wait()
        load_weights(raw, run_dir / "best" / "model.safetensors")
        test = evaluate(raw, data.splits["test"], data.source, pixels, tokenizer.pad_token_id, device, dtype,
                        cfg.eval_batch_size)
        write_json(run_dir / "test_metrics.json", test)
        print(format_table(test, f"test split, best checkpoint ({run_dir}/best)"))
        last_metrics = {**last_metrics, **{f"test_{k}": v for k, v in test.items()}}
    barrier(d)
    return last_metrics


def no_traceback_for_interrupts(kind, value, tb):
    """Ctrl-C and SIGTERM end the run with main()'s one line; Python still exits as killed by SIGINT, so that a shell
    loop of runs stops too."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)


if __name__ == "__main__":
    sys.excepthook = no_traceback_for_interrupts
    main()
