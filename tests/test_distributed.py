"""DDP on CPU with gloo: N ranks x batch b train exactly like one process with batch N*b; --local-loss and
gradient caching give the same loss and gradients; a 2-process run completes and resumes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import cuda_backends
from checkpoint import read_info
from clip import CLIPModel
from config import parse_config
from conftest import TINY, tiny_config
from distributed import Dist
from engine import backward_grad_cache, contrastive_loss, global_mean, micro_texts
from packing import token_index
from utils import read_jsonl

REPO = Path(__file__).resolve().parent.parent
BATCH, WORLD, VOCAB = 8, 2, 120


def tiny_model():
    torch.manual_seed(0)
    cfg = parse_config(TINY + ["--tokenizer", "local"])
    return CLIPModel(cfg, VOCAB).eval()  # eval: no dropout, batch norm from running stats, so rows are independent


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    ids = torch.randint(5, VOCAB, (BATCH, 12), generator=g)
    mask = torch.ones(BATCH, 12, dtype=torch.bool)
    mask[::3, 9:] = False
    return images, ids, mask


def text(ids, mask, chunks=1):
    """The text batch as the loader makes it, with the real tokens of each micro-batch listed (packing.py), on the
    masks' device as train.py moves it."""
    index = torch.from_numpy(token_index(mask.cpu().numpy(), chunks)).to(mask.device)
    return {"input_ids": ids, "attention_mask": mask, "token_index": index}


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_process(mode, learn_temperature=True):
    model = tiny_model()
    model.logit_scale.requires_grad_(learn_temperature)
    images, ids, mask = batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    if mode == "cache":
        loss = backward_grad_cache(model, model, images, text(ids, mask, 4), 4, Dist(), False, torch.device("cpu"),
                                   torch.float32, scaler)
    else:  # padded, so that packing is checked against it too
        loss = contrastive_loss(*model(images, ids, mask), Dist(), local_loss=False)
        loss.backward()
    return loss.item(), gradients(model)


def _rank(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    d = Dist(rank, WORLD, rank, enabled=True)
    raw = tiny_model()
    model = torch.nn.parallel.DistributedDataParallel(raw)
    images, ids, mask = (t[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for t in batch())
    if mode == "cache":
        loss = backward_grad_cache(model, raw, images, text(ids, mask, 2), 2, d, False, torch.device("cpu"),
                                   torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    else:
        index = text(ids, mask)["token_index"][0] if mode == "local" else None  # packed, or padded
        loss = contrastive_loss(*model(images, ids, mask, index), d, local_loss=mode == "local")
        loss.backward()
    # the loss as train.py logs it: under --local-loss each rank holds only its rows' share
    torch.save({"loss": global_mean(loss.detach(), d).item(), "rank_loss": loss.item(), "grads": gradients(raw)},
               out / f"{mode}-{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for mode in ("full", "local", "cache"):
        mp.start_processes(_rank, args=(free_port(), mode, out), nprocs=WORLD, start_method="spawn")
    return {mode: [torch.load(out / f"{mode}-{r}.pt") for r in range(WORLD)] for mode in ("full", "local", "cache")}


def assert_same_gradients(a, b, tol=1e-5, floor=0.0):
    """Each gradient within tol of its own largest entry, or of floor times the largest entry of all of them (for the
    gradients that are zero but for rounding, such as the attention keys' biases)."""
    assert a.keys() == b.keys() and len(a) > 10
    top = max(g.abs().max().item() for g in a.values())
    for name in a:
        scale = max(a[name].abs().max().item(), floor * top, 1e-8)
        assert (a[name] - b[name]).abs().max().item() <= tol * scale + 1e-9, name


@pytest.mark.parametrize("mode", ["full", "local", "cache"])
def test_two_ranks_match_one_process_with_the_whole_batch(two_rank_results, mode):
    loss, grads = one_process("full")
    for rank_result in two_rank_results[mode]:
        assert rank_result["loss"] == pytest.approx(loss, rel=1e-5)
        assert_same_gradients(grads, rank_result["grads"])
    # each rank's own loss: the whole matrix's, or under --local-loss only its own rows' (different on each rank)
    own = [r["rank_loss"] for r in two_rank_results[mode]]
    if mode == "local":
        assert abs(own[0] - own[1]) > 1e-3 * loss
    else:
        assert own == pytest.approx([loss] * WORLD, rel=1e-5)


def test_gradient_caching_in_one_process_matches_one_big_batch():
    loss, grads = one_process("full")
    cached_loss, cached = one_process("cache")
    assert cached_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(grads, cached)
    assert "logit_scale" in cached  # the temperature learns under gradient caching too


def test_gradient_caching_with_a_fixed_temperature_matches_one_big_batch():
    loss, grads = one_process("full", learn_temperature=False)
    cached_loss, cached = one_process("cache", learn_temperature=False)  # --no-learn-temperature --accum-steps 4
    assert cached_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(grads, cached)
    assert "logit_scale" not in cached


def test_gradient_caching_in_training_mode_is_exact_with_frozen_batch_norm_statistics():
    """In training mode each micro-batch's batch norms would use its own statistics; with the statistics frozen the
    micro-batches are independent again, and gradient caching gives one big batch's loss and gradients."""
    def run(cached):
        torch.manual_seed(0)
        model = CLIPModel(tiny_config(image_freeze_bn_stats=True, dropout=0.0), VOCAB).train()
        for module in model.modules():  # the text tower's own dropout too: only batch norm should matter here
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        images, ids, mask = batch()
        if cached:
            loss = backward_grad_cache(model, model, images, text(ids, mask, 4), 4, Dist(), False,
                                       torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", enabled=False))
        else:
            loss = contrastive_loss(*model(images, ids, mask), Dist(), local_loss=False)
            loss.backward()
        return loss.item(), gradients(model)

    loss, grads = run(cached=False)
    cached_loss, cached = run(cached=True)
    assert cached_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(grads, cached)


def test_gradient_caching_replays_each_micro_batchs_dropout_and_moves_batch_norm_once_per_micro_batch():
    """Pass 3 must draw the dropout masks pass 1 drew, or the cached embedding gradients belong to other embeddings;
    and batch norm's running statistics must move as K forward passes of the micro-batches move them, not twice as
    often. The reference embeds the same micro-batches in turn, with a graph, from the same seed."""
    def model_in_training():
        torch.manual_seed(0)
        return CLIPModel(tiny_config(dropout=0.3), VOCAB).train()

    images, ids, mask = batch()
    chunks = text(ids, mask, 4)
    model = model_in_training()
    torch.manual_seed(5)
    loss = backward_grad_cache(model, model, images, chunks, 4, Dist(), False, torch.device("cpu"), torch.float32,
                               torch.amp.GradScaler("cpu", enabled=False))
    reference = model_in_training()
    torch.manual_seed(5)
    parts = [reference(x, *t) for x, *t in zip(images.tensor_split(4), *micro_texts(chunks, 4))]
    reference_loss = contrastive_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2],
                                      Dist(), local_loss=False)
    reference_loss.backward()
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    assert_same_gradients(gradients(reference), gradients(model))
    buffers = dict(reference.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[name], msg=name)


def test_gradient_caching_adds_into_gradient_buffers_of_its_own():
    """Autograd would keep the first micro-batch's gradient as .grad itself; under CUDA graphs that memory is the
    graph's, and the next replay overwrites it. Pass 3 must add into buffers that no backward handed over."""
    model = tiny_model()
    handed = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: handed.setdefault(name, []).append(g.data_ptr()) and None)
    images, ids, mask = batch()
    backward_grad_cache(model, model, images, text(ids, mask, 4), 4, Dist(), False, torch.device("cpu"),
                        torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    passed = [name for name, p in model.named_parameters() if name in handed and name != "logit_scale"]
    assert len(passed) > 10  # logit_scale's gradient comes from pass 2, outside the micro-batches
    for name in passed:
        assert model.get_parameter(name).grad.data_ptr() not in handed[name], name


def grad_cache_steps(device, modes):
    """Three steps of gradient caching (4 micro-batches) in each torch.compile mode ("eager": none), each on a fresh
    model: under CUDA graphs the graphs are warmed up, recorded, then replayed. {mode: (loss, gradients)}"""
    images, ids, mask = (t.to(device) for t in batch())
    runs = {}
    for mode in modes:
        model = tiny_model().to(device)
        step_model = model if mode == "eager" else torch.compile(model, mode=mode)
        for _ in range(3):
            model.zero_grad(set_to_none=True)  # as train_step leaves it
            loss = backward_grad_cache(step_model, model, images, text(ids, mask, 4), 4, Dist(), False, device,
                                       torch.float32, torch.amp.GradScaler(device.type, enabled=False))
        runs[mode] = loss.item(), gradients(model)
        torch._dynamo.reset()
    return runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu-check runs it)")
def test_gradient_caching_under_cuda_graphs_gives_the_eager_gradients():
    """--compile-mode reduce-overhead --accum-steps 4: if a replay overwrote the gradient that an earlier micro-batch
    left in the graph's memory, the sum would be off by a whole micro-batch's share, far outside 1e-3."""
    # TF32 off: cuDNN's default TF32 convolutions moved conv1's gradient by 3.7% between eager and compiled
    # (H100, 2026-11-28); rounding the convolutions' inputs to TF32 on the CPU moves it by 5.8%
    with cuda_backends(benchmark=False, matmul_tf32=False, conv_tf32=False):
        runs = grad_cache_steps(torch.device("cuda"), ["eager", "default", "reduce-overhead"])
    loss, grads = runs["eager"]
    for mode in ("default", "reduce-overhead"):
        assert runs[mode][0] == pytest.approx(loss, rel=1e-4), mode
        assert_same_gradients(grads, runs[mode][1], tol=1e-3, floor=1e-3)
    # the graphs replay the default mode's kernels
    assert_same_gradients(runs["default"][1], runs["reduce-overhead"][1], tol=1e-3, floor=1e-3)


# train.py that also saves each rank's final weights, to compare them across ranks
SAVE_WEIGHTS = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, train
models, step = [], train.train_step
def spy(model, raw, *args, **kwargs):
    models[:] = [raw]
    return step(model, raw, *args, **kwargs)
train.train_step = spy
train.main(sys.argv[1:])
torch.save({{k: v.detach() for k, v in models[0].named_parameters()}}, {out!r} + f"/rank{{os.environ['RANK']}}.pt")
"""


def torchrun(args, script="train.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_training_completes_and_resumes(tiny_shapes_dir, tmp_path):
    run = tmp_path / "run"
    args = TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--device", "cpu", "--batch-size", "16"]
    script = tmp_path / "train_and_save_weights.py"
    script.write_text(SAVE_WEIGHTS.format(repo=str(REPO), out=str(tmp_path)))
    first = torchrun(args + ["--epochs", "1"], str(script))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, value in weights[0].items():  # DDP averaged every step's gradients, so the ranks never drifted apart
        assert torch.equal(weights[1][name], value), name
    history = read_jsonl(run / "metrics.jsonl")
    assert len(history) == 1  # only rank 0 writes
    # 180 train images / (2 ranks x 16) -> 5 full global batches + 20 left over, 10 per rank
    assert history[0]["step"] == 6
    assert len(read_info(run / "last")["rng"]) == WORLD  # every rank's random state, so that each resumes its own
    second = torchrun(args + ["--epochs", "2", "--resume"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    history = read_jsonl(run / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["step"] == 12
    assert "resuming" in second.stdout + second.stderr
    # a problem with the run folder, found by rank 0 alone, stops every rank: one message, no other rank's traceback
    # from a barrier rank 0 never reached
    third = torchrun(args + ["--epochs", "2", "--resume"])
    out = third.stdout + third.stderr
    assert third.returncode != 0 and out.count(f"--resume: {run} has trained 2 epochs") == 1, out[-3000:]
    assert "[rank1]" not in out and "Connection closed" not in out, out[-3000:]  # torchrun's own report is left
