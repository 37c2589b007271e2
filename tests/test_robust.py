"""Never lose a run: exact resume after SIGKILL, atomic checkpoints, non-finite losses, existing run folders,
safe and explicit loading."""

import json
import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import modules
import runs
import train
from clip import CLIPModel, clip_loss
from config import Config
from conftest import TINY, tiny_config
from distributed import Dist
from engine import lr_factor, make_optimizer, param_groups
from utils import append_jsonl, atomic_write, read_jsonl

REPO = Path(__file__).resolve().parent.parent


def run_train(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def last_step(run: Path) -> int:
    link = run / "last"
    return int(os.readlink(link).split("-")[-1]) if link.is_symlink() else -1


def without_timing(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(shapes_dir, tmp_path):
    args = TINY + ["--data-dir", str(shapes_dir), "--epochs", "2", "--save-every", "13", "--log-every", "5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(args + ["--run-dir", str(straight)])
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out

    proc = run_train(args + ["--run-dir", str(killed)])
    deadline = time.monotonic() + 300
    while last_step(killed) not in (26, 39) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # epoch 2 runs steps 24-46; checkpoints at steps 26 and 39
    assert proc.poll() is None, "training finished before it could be killed mid-epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 23 < last_step(killed) < 46 and len(read_jsonl(killed / "metrics.jsonl")) == 1

    proc = run_train(args + ["--run-dir", str(killed), "--resume"])
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "resuming" in out
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(killed / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = [without_timing(read_jsonl(run / "metrics.jsonl")) for run in (straight, killed)]
    assert history[0] == history[1]
    assert json.loads((straight / "test_metrics.json").read_text()) == \
        json.loads((killed / "test_metrics.json").read_text())


def test_sigterm_stops_a_run_as_ctrl_c_does_saying_how_to_resume_without_a_traceback(tiny_shapes_dir, tmp_path):
    # a scheduler's stop (SLURM, `timeout`) used to kill the run on the spot, without a word
    run = tmp_path / "run"
    proc = run_train(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "50",
                             "--save-every", "3"])
    deadline = time.monotonic() + 300
    while last_step(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    step = checkpoint.read_info(run / "last")["state"]["step"]
    assert f"train.py: interrupted; {run}/last holds step {step} (epoch " in out
    assert f"continue with `python train.py --run-dir {run} --resume`" in out and "Traceback" not in out
    assert runs.interrupted(Config(run_dir=str(tmp_path / "new")), None).endswith(
        "there is nothing to resume; the same command starts the run over")


def test_the_resume_command_of_a_run_over_several_nodes_starts_each_nodes_share(tiny_run, monkeypatch):
    run, _ = tiny_run
    cfg, two = Config(run_dir=str(run)), Dist(rank=0, world=2, enabled=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one node, two processes
    said = runs.interrupted(cfg, two)
    assert f"continue with `torchrun --nproc_per_node 2 train.py --run-dir {run} --resume`" in said
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one: --nproc_per_node 2 on each would start four
    assert ("continue with `torchrun --nnodes 2 --nproc_per_node 1 (and this run's --node-rank and rendezvous flags, "
            f"on each node) train.py --run-dir {run} --resume`") in runs.interrupted(cfg, two)


def test_training_runs_in_a_thread_too(tiny_shapes_dir, tmp_path):
    # signal handlers can only be set in the main thread: a run started from another one (a tuning tool, a notebook
    # helper) trains without the SIGTERM handler rather than failing
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(train.main, TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"),
                                                 "--epochs", "1"]).result()
    assert result["epoch"] == 1 and (tmp_path / "run" / "best" / "checkpoint.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this thread's handler untouched


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    before = os.readlink(copy / "last")
    # a child process that starts saving a new checkpoint and hangs after writing its files, before the rename
    script = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import checkpoint
model, cfg, tokenizer = checkpoint.load_model({str(copy / 'last')!r})
checkpoint._fsync_tree = lambda folder: (print("WRITTEN", flush=True), time.sleep(600))
checkpoint.save_checkpoint({str(copy)!r}, ["last", "best"], model, cfg, tokenizer, {{"step": 999}}, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "WRITTEN"
    assert (copy / "checkpoints" / ".step-00000999.tmp" / "model.safetensors").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.readlink(copy / "last") == before
    model, cfg, _ = checkpoint.load_model(copy / "last")
    assert cfg.epochs == 6 and sum(p.numel() for p in model.parameters()) > 0
    # the next save cleans the half-written folder away
    model, cfg, tokenizer = checkpoint.load_model(copy / "last")
    checkpoint.save_checkpoint(copy, ["last"], model, cfg, tokenizer, {"step": 1000}, {})
    assert not (copy / "checkpoints" / ".step-00000999.tmp").exists()
    assert os.readlink(copy / "last") == "checkpoints/step-00001000"


def test_a_crash_between_the_link_swaps_is_finished_on_resume(tiny_run, tmp_path, monkeypatch, capsys):
    """`best` moves before `last`: a save cut off between the two leaves `best` ahead, and --resume points `last`
    there, so the run neither restarts behind its best score nor deletes the folder that holds it."""
    run, _ = tiny_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    before = os.readlink(copy / "last")
    model, cfg, tokenizer = checkpoint.load_model(copy / "last")
    state = {**checkpoint.read_info(copy / "last")["state"], "step": 999}
    point = checkpoint._point

    def crash_at_last(link, target):
        if link.name == "last":
            raise KeyboardInterrupt
        point(link, target)

    monkeypatch.setattr(checkpoint, "_point", crash_at_last)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(copy, ["last", "best"], model, cfg, tokenizer, state, {})
    monkeypatch.setattr(checkpoint, "_point", point)
    assert os.readlink(copy / "last") == before and os.readlink(copy / "best") == "checkpoints/step-00000999"
    resumed = Config(**{**cfg.to_dict(), "run_dir": str(copy), "resume": True, "epochs": cfg.epochs + 1})
    assert runs.find_run_dir(resumed, Dist()) == copy
    assert os.readlink(copy / "last") == "checkpoints/step-00000999"
    assert "a save was cut short" in capsys.readouterr().out
    assert checkpoint.finish_interrupted_save(copy) is None  # the links agree now
    # a `best` behind `last` is how every run looks after an epoch that did not improve: left alone
    checkpoint.save_checkpoint(copy, ["last"], model, cfg, tokenizer, {**state, "step": 1000}, {})
    assert checkpoint.finish_interrupted_save(copy) is None
    assert os.readlink(copy / "last") == "checkpoints/step-00001000"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def poisoned(*args, **kwargs):  # the 30th step's loss is NaN
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == 30 else loss

    monkeypatch.setattr(train, "train_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data-dir", str(shapes_dir), "--run-dir", str(run), "--epochs", "3",
                           "--save-every", "10", "--log-every", "5"])
    message = str(e.value)
    assert "by step 30" in message and "--precision bf16" in message and "learning rates" in message
    assert f"The last good checkpoint is {run}/last" in message
    assert last_step(run) == 23  # the end of epoch 1; steps 24-29 were never saved with a NaN pending
    model, _, _ = checkpoint.load_model(run / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_existing_run_is_never_overwritten_by_accident(tiny_shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "1"]
    train.main(args)
    stamp = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        train.main(args)
    assert (run / "metrics.jsonl").read_text() == stamp
    with pytest.raises(SystemExit, match=r"train.py: error: --image-model 'resnet10x' is not a timm model"):
        train.main(args + ["--overwrite", "--image-model", "resnet10x"])
    assert (run / "metrics.jsonl").read_text() == stamp  # a start that fails does not clear the old run
    train.main(args + ["--overwrite"])
    assert len(read_jsonl(run / "metrics.jsonl")) == 1
    with pytest.raises(SystemExit):  # which of the two was meant is not ours to guess
        train.main(args + ["--resume", "--overwrite"])
    assert "--resume continues the run in --run-dir and --overwrite starts it over" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a preset the run did not start from would be silently ignored
        train.main(["--run-dir", str(run), "--resume", "--preset", "shapes"])
    err = capsys.readouterr().err
    assert "config.json, which --preset shapes contradicts" in err and "--image-model 'resnet18' (the run has " \
        "'resnet10t')" in err and "--epochs 8 (the run has 1)" in err  # the run's first command + --resume is fine
    assert len(read_jsonl(run / "metrics.jsonl")) == 1
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "new"), "--resume"])
    # a run killed after logging its first epoch, before its first checkpoint, has nothing to resume (and said so):
    # the same command starts it over, rather than asking for a --resume that would find no checkpoint
    shutil.rmtree(run / "checkpoints")
    (run / ".." / "keep.txt").write_text("mine")
    train.main(args)
    assert len(read_jsonl(run / "metrics.jsonl")) == 1 and (run / "last" / "checkpoint.json").exists()
    assert (run / ".." / "keep.txt").read_text() == "mine"
    # compiled runs drop a short last batch, so here no batch is left at all
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"train.py: error: --batch-size 4096 x 1 process\(es\) exceeds the 180 "
                                         r"training images, and --compile drops a last batch smaller than the rest"):
        train.main(args + ["--overwrite", "--batch-size", "4096", "--compile"])
    assert "each epoch is one batch" not in capsys.readouterr().out  # eager mode's note, which would contradict it


def test_a_run_folder_that_cannot_be_one_is_refused_before_any_work(tiny_shapes_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "build", lambda *a: pytest.fail("the data and the model were loaded"))
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    args = TINY + ["--data-dir", str(tiny_shapes_dir)]
    for run_dir in (file, file / "run"):
        with pytest.raises(SystemExit, match=f"--run-dir {run_dir}: {file} is a file, not a folder; choose another"):
            train.main(args + ["--run-dir", str(run_dir)])
    assert file.read_text() == "mine"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != tmp_path)  # a read-only disk (root ignores 555)
    with pytest.raises(SystemExit, match=f"--run-dir {tmp_path / 'a' / 'run'}: {tmp_path} is not writable here"):
        train.main(args + ["--run-dir", str(tmp_path / "a" / "run")])
    monkeypatch.setattr(os, "access", access)
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--resume"])
    assert e.value.code == 2 and "--resume continues the run in --run-dir: name its folder" in capsys.readouterr().err


def test_overwrite_clears_the_old_runs_outputs_and_keeps_other_files(tmp_path):
    from distributed import Dist
    run = tmp_path / "run"
    (run / "checkpoints/step-1").mkdir(parents=True)
    (run / "last").symlink_to("checkpoints/step-1")
    (run / "best").symlink_to("checkpoints/step-1")
    old = ["metrics.jsonl", "test_metrics.json", "curves.png"]
    for name in old + ["notes.txt"]:
        (run / name).write_text("old")
    runs.prepare_run_dir(run, tiny_config(overwrite=True), Dist())
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # nothing of the old run is left to mislead
    (run / "curves.png").write_text("new run's")
    runs.prepare_run_dir(run, tiny_config(resume=True), Dist())
    assert (run / "curves.png").read_text() == "new run's"


def test_resume_with_the_runs_preset_matches_folders_by_where_they_lead(tmp_path, monkeypatch, capsys):
    from config import PRESETS, save_config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    for data_dir, ok in [("./data/shapes", True), (str(tmp_path / "data/shapes"), True), ("data/other", False)]:
        save_config(Config(**{**PRESETS["shapes"], "data_dir": data_dir, "run_dir": "run"}), "run/config.json")
        argv = ["--run-dir", "run", "--resume", "--preset", "shapes"]
        if ok:
            assert runs.resolve_config(argv).data_dir == data_dir  # the run's own spelling is kept
            continue
        with pytest.raises(SystemExit):
            runs.resolve_config(argv)
        assert "--data-dir 'data/shapes' (the run has 'data/other')" in capsys.readouterr().err


def test_a_mid_epoch_checkpoint_resumes_only_with_the_settings_that_drew_its_epoch(tiny_shapes_dir, tmp_path,
                                                                                    monkeypatch):
    run = tmp_path / "run"
    args = TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "1", "--save-every", "2"]
    real_step, calls = train.train_step, []

    def stop_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train, "train_step", real_step)
    assert checkpoint.read_info(run / "last")["state"]["batch"] == 2
    with pytest.raises(SystemExit, match=r"middle of epoch 1 \(after batch 2\).*--batch-size 32 \(now 16\)"):
        train.main(args + ["--resume", "--batch-size", "16"])  # batch 2 of another plan: other images
    assert json.loads((run / "config.json").read_text())["batch_size"] == 32  # the saved values stay on record
    append_jsonl(run / "metrics.jsonl", {"epoch": 1, "train_loss": 9.0})  # a run killed while saving epoch 1
    train.main(args + ["--resume", "--lr-head", "0.002"])  # settings that leave the plan alone are fine
    rows = read_jsonl(run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1] and rows[0]["train_loss"] != 9.0  # logged once, by the resumed run


def test_at_an_epochs_end_a_run_resumes_with_more_processes_whose_new_ranks_keep_their_seed(tiny_run):
    run, _ = tiny_run
    model, cfg, _ = checkpoint.load_model(run / "last")
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed + 1)  # what train.py seeds rank 1 with
    fresh = torch.get_rng_state()
    state = checkpoint.load_training_state(run / "last", model, optimizer, None, rank=1)  # saved by one process
    assert state["batch"] == 0 and torch.equal(torch.get_rng_state(), fresh)
    checkpoint.load_training_state(run / "last", model, optimizer, None, rank=0)
    assert not torch.equal(torch.get_rng_state(), fresh)  # rank 0 gets the saved state


def test_resume_restores_the_grad_scaler_and_each_ranks_own_random_state(tiny_run, tmp_path):
    """fp16's grad scaler (CUDA only in train.py, so no CPU run shows it) and rank 1's RNGs (torch, Python,
    NumPy), not rank 0's."""
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "last")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler.scale(torch.ones(()))  # the scale is set up lazily, at the first use
    scaler.update(512.0)
    ranks, draws = [], []
    for seed in (11, 22):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        ranks.append(checkpoint.rng_state())
        draws.append((random.random(), np.random.rand()))  # what each rank draws next, from its saved state
    checkpoint.save_checkpoint(tmp_path, ["last"], model, cfg, tokenizer, {"step": 1, "epoch": 0, "batch": 1}, {},
                               make_optimizer(model, cfg, torch.device("cpu")), scaler, rng=ranks)
    fresh = torch.amp.GradScaler("cpu")
    checkpoint.load_training_state(tmp_path / "last", model, make_optimizer(model, cfg, torch.device("cpu")), fresh,
                                   rank=1)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0
    assert torch.equal(torch.get_rng_state(), ranks[1][1]["torch"])
    assert (random.random(), np.random.rand()) == draws[1]  # Python's and NumPy's too, through the JSON info


def test_a_run_resumes_with_a_tower_frozen_keeping_the_moments_of_what_still_trains(tiny_run, capsys):
    run, _ = tiny_run
    model, cfg, _ = checkpoint.load_model(run / "last")
    full = make_optimizer(model, cfg, torch.device("cpu"))
    checkpoint.load_training_state(run / "last", model, full, None, rank=0)
    moments = {p: full.state[p]["exp_avg"].clone() for p in model.text_projection.parameters()}
    frozen_cfg = checkpoint.Config(**{**cfg.to_dict(), "image_trainable": False, "learn_temperature": False})
    frozen, _, _ = checkpoint.load_model(run / "last")
    frozen.image_encoder.requires_grad_(False)
    frozen.logit_scale.requires_grad_(False)
    optimizer = make_optimizer(frozen, frozen_cfg, torch.device("cpu"))
    checkpoint.load_training_state(run / "last", frozen, optimizer, None, rank=0)  # a raw torch error before
    assert "image no longer trains" in capsys.readouterr().out
    for p, q in zip(model.text_projection.parameters(), frozen.text_projection.parameters()):
        assert torch.equal(optimizer.state[q]["exp_avg"], moments[p])  # the head's moments came along
    assert not any(p in optimizer.state for p in frozen.image_encoder.parameters())


def test_resume_forgets_metrics_logged_after_its_checkpoint(tmp_path):
    """A run killed while its epoch-2 checkpoint was being written has logged epoch 2; resuming from epoch 1's
    checkpoint runs epoch 2 again, and logs it once."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"epoch": e, "train_loss": 5.0 - e}) + "\n" for e in (1, 2)))
    runs.drop_rows_after(metrics, 1)
    assert read_jsonl(metrics) == [{"epoch": 1, "train_loss": 4.0}]


def test_resume_drops_a_metrics_line_cut_short_and_names_a_damaged_one(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"epoch": 1, "train_loss": 4.0}) + '\n{"epoch": 2, "train_lo')  # the disk filled
    runs.drop_rows_after(metrics, 1)
    append_jsonl(metrics, {"epoch": 2, "train_loss": 3.0})
    assert read_jsonl(metrics) == [{"epoch": 1, "train_loss": 4.0}, {"epoch": 2, "train_loss": 3.0}]
    metrics.write_text('{"epoch": 1, "train_lo\n' + json.dumps({"epoch": 2}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1, is not JSON .*repair or delete that line"):
        runs.drop_rows_after(metrics, 1)


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # results are for sharing, unlike mkstemp's private files


def test_a_metrics_log_reads_back_row_by_row_past_blank_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"epoch": 1})
    with open(log, "a") as f:
        f.write("\n")  # as an editor may leave it
    append_jsonl(log, {"epoch": 2})
    assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}]


def test_a_run_resumed_with_other_steps_per_epoch_goes_on_from_the_same_point_of_its_schedule(tiny_shapes_dir,
                                                                                                  tmp_path,
                                                                                                  monkeypatch):
    run = tmp_path / "run"
    args = TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--warmup-frac", "0"]
    train.main(args + ["--epochs", "1", "--batch-size", "16"])  # 180 training images: 12 steps
    with monkeypatch.context() as m, \
            pytest.raises(SystemExit, match=r"has trained 1 epoch, and --epochs is 1: .* e\.g\. --epochs 2"):
        m.setattr(train, "build", lambda *args: pytest.fail("loaded the data and the model first"))
        train.main(["--run-dir", str(run), "--resume"])  # nothing left to train: said at once, not skipped
    train.main(["--run-dir", str(run), "--resume", "--epochs", "2", "--batch-size", "64"])  # 3 steps per epoch now
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [12, 15]
    # epoch 2 runs the second half of a 6-step cosine (its last step at 5/6), not past the end of it at 0
    assert rows[1]["lr_scale"] == pytest.approx(lr_factor(5, 6, 0))
    assert rows[1]["lr_scale"] > 0.05


def test_resume_validates_the_flags_together_with_the_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**checkpoint.Config(compile=True).to_dict()}))
    cfg = runs.resolve_config(["--run-dir", str(run), "--resume", "--compile-mode", "reduce-overhead"])
    assert cfg.compile and cfg.compile_mode == "reduce-overhead"  # --compile comes from the saved run


def test_resume_refuses_flags_that_would_build_another_model_naming_them(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(Config(image_model="resnet18", projection_dim=128).to_dict()))
    base = ["--run-dir", str(run), "--resume"]
    with pytest.raises(SystemExit) as e:
        runs.resolve_config(base + ["--image-model", "resnet34", "--projection-dim", "128", "--epochs", "20"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--image-model 'resnet34' (the run has 'resnet18') would build another one" in err
    assert "--projection-dim 128" not in err  # given, but as the run has it
    cfg = runs.resolve_config(base + ["--image-model", "resnet18", "--no-image-trainable", "--epochs", "20"])
    assert cfg.image_model == "resnet18" and not cfg.image_trainable and cfg.epochs == 20  # training flags may change


def test_a_folder_left_by_a_killed_run_is_rewritten_not_reused(tiny_run, tmp_path):
    """Killed after renaming its step-8 folder but before moving `last` to it, a run resumes from step 4 and saves
    step 8 again: the checkpoint must hold this run's state, not the folder the killed one left."""
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "last")
    checkpoint.save_checkpoint(tmp_path, ["last"], model, cfg, tokenizer, {"step": 4}, {})
    subprocess.run(["cp", "-a", str(tmp_path / "checkpoints" / "step-00000004"),
                    str(tmp_path / "checkpoints" / "step-00000008")], check=True)
    with torch.no_grad():
        model.image_projection.proj.weight.add_(1.0)
    checkpoint.save_checkpoint(tmp_path, ["last"], model, cfg, tokenizer, {"step": 8}, {})
    saved = load_file(tmp_path / "last" / "model.safetensors")
    assert torch.equal(saved["image_projection.proj.weight"], model.image_projection.proj.weight)


def test_loading_never_unpickles(tiny_run, monkeypatch):
    run, _ = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("something on the load path unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    assert cfg.image_model == "resnet10t" and len(tokenizer) > 10


def test_loading_into_another_architecture_says_what_differs(tiny_run):
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    from clip import CLIPModel
    other = CLIPModel(checkpoint.Config(**{**cfg.to_dict(), "projection_dim": 32}), len(tokenizer))
    with pytest.raises(ValueError, match=r"of another shape.*image_projection"):
        checkpoint.load_weights(other, run / "best" / "model.safetensors")


def test_checkpoint_round_trip_gives_identical_embeddings(tiny_run, tmp_path):
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    checkpoint.save_checkpoint(tmp_path, ["best"], model, cfg, tokenizer, {"step": 7}, {})
    again, cfg_again, tokenizer_again = checkpoint.load_model(tmp_path / "best")
    assert cfg_again == cfg and tokenizer_again.get_vocab() == tokenizer.get_vocab()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a red circle on a white background", "two shapes"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))
        assert torch.equal(model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                           again.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        assert not torch.equal(model.encode_image(images), model.encode_image(images.flip(0)))  # not a constant


def test_an_image_size_the_model_cannot_take_fails_before_any_work(tiny_shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: --image-size 8 does not fit --image-model vit_tiny_patch16_224"):
        train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"),
                           "--image-model", "vit_tiny_patch16_224", "--image-size", "8"])
    assert not (tmp_path / "run").exists()  # no folder of a run that never started
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()  # the failed start did not block the folder


def test_a_checkpoint_holds_the_moment_it_was_captured_not_what_training_did_next(tiny_run, tmp_path):
    """Checkpoints are written in the background while training goes on, so the snapshot must be a copy: on the CPU
    the weights and optimiser moments would otherwise be the very tensors the next steps change in place."""
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "last")
    model.train()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    tokens = tokenizer(["a red circle", "a blue square", "two shapes", "a green star"], padding=True,
                       return_tensors="pt")

    def step():
        image_emb, text_emb, scale = model(images, tokens["input_ids"], tokens["attention_mask"])
        clip_loss(image_emb, text_emb, scale).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in checkpoint.flatten_optimizer(optimizer.state_dict())[0].items()}
    writer = checkpoint.BackgroundWriter()
    writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 5}, {}, optimizer), tmp_path, ["last"])
    for _ in range(2):
        step()  # in place, while (or before) the writer runs
    writer.wait()
    assert not torch.equal(model.image_projection.proj.weight, before["image_projection.proj.weight"])
    saved = load_file(tmp_path / "last" / "model.safetensors")
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    state = load_file(tmp_path / "last" / "training_state.safetensors")
    assert state.keys() == moments.keys() and all(torch.equal(state[k], moments[k]) for k in moments)


def test_resume_with_fused_adamw_on_channels_last_weights_continues_exactly(tiny_run, tmp_path):
    """On CUDA the optimiser is fused AdamW over channels_last weights. Its moments are saved contiguous; loaded back
    in that layout, the fused kernel would pair each weight with another element's moments (CPU) or refuse (CUDA)."""
    run, _ = tiny_run
    _, cfg, tokenizer = checkpoint.load_model(run / "last")
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size).contiguous(memory_format=torch.channels_last)
    tokens = tokenizer(["a red circle", "a blue square", "two shapes", "a green star"], padding=True,
                       return_tensors="pt")

    def build(lr_head):
        model = checkpoint.load_model(run / "last")[0].train().to(memory_format=torch.channels_last)
        groups = param_groups(model, checkpoint.Config(**{**cfg.to_dict(), "lr_head": lr_head}))
        return model, torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=True)

    def step(model, optimizer):
        torch.manual_seed(0)  # the same dropout in both runs
        clip_loss(*model(images, tokens["input_ids"], tokens["attention_mask"])).backward()
        optimizer.step()
        optimizer.zero_grad()

    straight, optimizer = build(cfg.lr_head)
    for _ in range(2):
        step(straight, optimizer)
    checkpoint.save_checkpoint(tmp_path, ["last"], straight, cfg, tokenizer, {"step": 2}, {}, optimizer,
                               rng=[checkpoint.rng_state()])
    step(straight, optimizer)

    resumed, fresh = build(cfg.lr_head)
    checkpoint.load_training_state(tmp_path / "last", resumed, fresh, None, 0)
    conv = resumed.image_encoder.model.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fresh.state[conv]["exp_avg"].stride() == conv.stride()
    step(resumed, fresh)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    # flags given on resume win over the checkpoint's settings, as config.json will say
    model, other = build(0.5)
    checkpoint.load_training_state(tmp_path / "last", model, other, None, 0)
    assert {g["name"]: g["base_lr"] for g in other.param_groups}["head"] == 0.5


def test_weights_with_nan_are_never_saved(tiny_run, tmp_path):
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    checkpoint.save_checkpoint(tmp_path, ["last"], model, cfg, tokenizer, {"step": 1}, {})
    with torch.no_grad():
        model.text_projection.fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="text_projection.fc.weight"):
        checkpoint.save_checkpoint(tmp_path, ["last"], model, cfg, tokenizer, {"step": 2}, {})
    assert os.readlink(tmp_path / "last") == "checkpoints/step-00000001"


def test_a_failed_background_write_is_raised_where_the_trainer_waits(tiny_run, tmp_path):
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the run directory should be")
    writer = checkpoint.BackgroundWriter()
    writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 1}, {}), blocked, ["last"])
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once; the writer goes on working
    writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 2}, {}), blocked, ["last"])
    with pytest.raises(OSError):  # submit() first waits for the previous write: its error surfaces there too
        writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 3}, {}), tmp_path / "run", ["last"])
    writer.wait()
    writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 2}, {}), tmp_path / "run", ["last"])
    writer.wait()
    assert checkpoint.load_model(tmp_path / "run" / "last")[1] == cfg


def test_a_full_disk_stops_the_run_at_once_naming_the_checkpoint_to_resume_from(tiny_shapes_dir, tmp_path,
                                                                                   monkeypatch):
    """A failed write used to end the run with the writer thread's traceback, at the next save (an epoch later),
    leaving its half-written folder on the full disk."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 3:  # the second checkpoint (each writes model and training state)
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "3",
                           "--save-every", "2", "--log-every", "1"])
    assert str(e.value).startswith("train.py: error: could not write the checkpoint step-00000004 into "
                                   f"{run}/checkpoints (OSError: [Errno 28] No space left on device)\n")
    assert str(e.value).endswith(f"train.py: stopped; {run}/last holds step 2 (epoch 1, batch 2): continue with "
                                 f"`python train.py --run-dir {run} --resume`")
    assert os.readlink(run / "last") == "checkpoints/step-00000002"
    assert sorted(f.name for f in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no half-written folder
    assert not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) <= 1  # not 3 epochs


def test_a_failed_write_is_found_by_check_without_waiting_for_a_running_one(tiny_run, tmp_path):
    run, _ = tiny_run
    model, cfg, tokenizer = checkpoint.load_model(run / "best")
    writer, release = checkpoint.BackgroundWriter(), threading.Event()
    writer._pool.submit(release.wait)  # the writer is busy: the next write queues behind this
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the run directory should be")
    writer.submit(checkpoint.capture(model, cfg, tokenizer, {"step": 1}, {}), blocked, ["last"])
    writer.check()  # still waiting to run: check() neither blocks nor raises
    release.set()
    while not writer._pending.done():
        time.sleep(0.01)
    with pytest.raises(checkpoint.CheckpointError, match="could not write the checkpoint step-00000001"):
        writer.check()
    writer.check()  # reported once


def test_a_bert_run_saved_with_its_pooler_resumes(tiny_shapes_dir, tmp_path, monkeypatch):
    """Text towers used to keep BERT's own pooler (unused; it stopped DDP). A run saved then still resumes: its
    optimiser state lists the pooler's two weights, which this run's groups no longer have."""
    from transformers.models.bert.modeling_bert import BertPooler

    build = modules.TextEncoder.__init__

    def with_pooler(self, *args, **kwargs):  # the text tower as it was
        build(self, *args, **kwargs)
        self.model.pooler = BertPooler(self.model.config)

    run = tmp_path / "run"
    args = TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--text-model", "bert"]
    monkeypatch.setattr(modules.TextEncoder, "__init__", with_pooler)
    train.main(args + ["--epochs", "1"])
    assert any(".model.pooler." in k for k in load_file(run / "last" / "model.safetensors"))
    monkeypatch.undo()
    train.main(args + ["--epochs", "2", "--resume"])
    assert [row["epoch"] for row in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def weights_file(tmp_path, change):
    model = CLIPModel(tiny_config(), 120)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    change(weights)
    save_file(weights, str(tmp_path / "model.safetensors"))
    return model, tmp_path / "model.safetensors"


def test_a_weights_file_with_an_extra_tensor_is_refused_naming_it(tmp_path):
    model, file = weights_file(tmp_path, lambda w: w.update({"image_encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"1 not in the model \['image_encoder.extra.weight'\]"):
        checkpoint.load_weights(model, file)


def test_a_weights_file_missing_a_tensor_is_refused_naming_it(tmp_path):
    model, file = weights_file(tmp_path, lambda w: w.pop("logit_scale"))
    with pytest.raises(ValueError, match=r"1 weights missing from the file \['logit_scale'\]"):
        checkpoint.load_weights(model, file)


def fake_mid_epoch_checkpoint(tmp_path, processes=1, **saved):
    (tmp_path / "last").mkdir(parents=True)
    info = {"config": Config(**saved).to_dict(), "state": {"epoch": 0, "batch": 3}, "rng": [{}] * processes}
    (tmp_path / "last" / "checkpoint.json").write_text(json.dumps(info))
    return tmp_path


def test_a_mid_epoch_resume_with_another_seed_is_refused(tmp_path):
    run = fake_mid_epoch_checkpoint(tmp_path, seed=0)
    runs.check_mid_epoch_resume(run, Config(seed=0), world=1)
    with pytest.raises(SystemExit, match=r"--seed 0 \(now 1\)"):
        runs.check_mid_epoch_resume(run, Config(seed=1), world=1)


def test_a_mid_epoch_resume_with_fewer_processes_is_refused(tmp_path):
    run = fake_mid_epoch_checkpoint(tmp_path, processes=2)
    runs.check_mid_epoch_resume(run, Config(), world=2)
    with pytest.raises(SystemExit, match=r"2 processes \(now 1\)"):
        runs.check_mid_epoch_resume(run, Config(), world=1)


def test_an_infinite_loss_stops_at_the_step_log_every_reads(shapes_dir, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def poisoned(*args, **kwargs):  # the 3rd step reports an infinite loss (the weights stay finite)
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(SystemExit, match=r"train.py: error: the loss became inf by step 3 ") as e:
        train.main(TINY + ["--data-dir", str(shapes_dir), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                           "--log-every", "1"])
    # before the first checkpoint, the message names none (it used to name a RUN/last that did not exist)
    assert not (tmp_path / "run" / "last").exists()
    assert "last good checkpoint" not in str(e.value) and "No checkpoint was saved before it" in str(e.value)


def test_a_damaged_config_json_resumes_from_the_checkpoints_copy_and_a_foreign_field_is_named(tiny_run, tmp_path,
                                                                                               capsys):
    run, _ = tiny_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    text = (copy / "config.json").read_text()
    (copy / "config.json").write_text(text[:len(text) // 2])  # the disk filled while it was written
    cfg = runs.resolve_config(["--run-dir", str(copy), "--resume", "--epochs", "9"])
    assert f"{copy / 'config.json'} is damaged" in capsys.readouterr().out
    assert cfg.epochs == 9 and cfg.to_dict() == {**checkpoint.read_info(copy / "last")["config"], "epochs": 9,
                                                 "resume": True, "run_dir": str(copy)}
    (copy / "config.json").write_text(json.dumps({**json.loads(text), "bogus": 1}))
    with pytest.raises(SystemExit):
        runs.resolve_config(["--run-dir", str(copy), "--resume", "--epochs", "9"])
    assert f"{copy / 'config.json'}: saved config has fields this version does not know: ['bogus']" in \
        capsys.readouterr().err
