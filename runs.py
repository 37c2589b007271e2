"""The run folder: the config a run starts or resumes with, what an existing folder allows (--resume, --overwrite),
which settings a checkpoint saved mid-epoch resumes with, and what an interrupted run says."""

import json
import os
import shutil
import sys
import time
from pathlib import Path
from shlex import quote

from checkpoint import CHECKPOINTS, finish_interrupted_save, read_info
from config import PRESETS, Config, build_parser, config_from_args, config_from_dict, flag, validate_with_preset
from distributed import Dist, barrier, broadcast_object
from utils import atomic_write, read_jsonl


def differs(key: str, a, b) -> bool:
    """Config values that differ; folders by where they lead, so "./data/shapes" is "data/shapes"."""
    if key.endswith("_dir") and a and b:
        return Path(a).resolve() != Path(b).resolve()
    return a != b


# The settings that decide the model's weights (their names and shapes) or its vocabulary: a resumed run keeps them.
ARCHITECTURE = ("image_model", "text_model", "text_layers", "text_width", "text_heads", "projection_dim", "tokenizer",
                "vocab_size")


def resolve_config(argv, description: str = "") -> Config:
    """Flags over the preset over the defaults; with --resume, flags over the run's saved config. description: the
    entry point's, for --help."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume continues the run in --run-dir and --overwrite starts it over: give one of them")
    if getattr(args, "resume", False) and not getattr(args, "run_dir", None):
        parser.error("--resume continues the run in --run-dir: name its folder, e.g. --run-dir runs/shapes")
    try:
        cfg = config_from_args(args, validate=False)  # on resume, the flags alone may not make a whole config
        if cfg.resume and cfg.run_dir and (Path(cfg.run_dir) / "config.json").exists():
            saved, file = saved_config(Path(cfg.run_dir))
            given = {k: v for k, v in vars(args).items() if k != "preset"}
            try:
                cfg = config_from_dict({**saved, **given})
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
            reshaped = [f"--{flag(k)} {given[k]!r} (the run has {saved[k]!r})" for k in ARCHITECTURE
                        if k in given and k in saved and differs(k, given[k], saved[k])]
            if reshaped:
                parser.error(f"--resume continues the model in {cfg.run_dir}, and {', '.join(reshaped)} would build "
                             f"another one: leave those flags out, or train the new model in another --run-dir")
            preset = getattr(args, "preset", None)  # the run's first command repeated with --resume is fine
            clashes = [f"--{flag(k)} {v!r} (the run has {getattr(cfg, k)!r})"
                       for k, v in PRESETS.get(preset, {}).items() if k not in given and differs(k, getattr(cfg, k), v)]
            if clashes:
                parser.error(f"--resume continues with {cfg.run_dir}/config.json, which --preset {preset} contradicts:"
                             f" it sets {', '.join(clashes)}. Leave --preset out, or give as flags what should change")
            cfg.validate()  # the saved config, not a preset, filled in what the flags leave out
        else:
            validate_with_preset(cfg, args)
        return cfg
    except ValueError as e:
        parser.error(str(e))


def saved_config(run_dir: Path) -> tuple[dict, Path]:
    """The config a run resumes with, and the file it came from: RUN/config.json, or where that is damaged, the copy
    inside RUN/last (training writes config.json again)."""
    file, last = run_dir / "config.json", run_dir / "last"
    try:
        return json.loads(file.read_text()), file
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if not (last / "checkpoint.json").exists():
            raise ValueError(f"{file} is damaged ({e}) and {run_dir} holds no checkpoint to resume: start the run "
                             f"over with --overwrite") from None
        print(f"note: {file} is damaged ({e}); resuming with the config saved in {last}")
        return read_info(last)["config"], last / "checkpoint.json"


# The settings that decide an epoch's batches: a run stopped mid-epoch must finish that epoch with the same ones.
PLAN_FIELDS = ("batch_size", "seed", "accum_steps", "compile")


def check_mid_epoch_resume(run_dir: Path, cfg: Config, world: int) -> None:
    """Refuse to resume a mid-epoch checkpoint with settings that would redraw the rest of its epoch (its position
    would point into another plan, repeating or skipping images, or past its end)."""
    info = read_info(run_dir / "last")
    saved, state = info["config"], info["state"]
    if not state["batch"]:
        return
    changed = [f"--{flag(k)} {saved[k]} (now {getattr(cfg, k)})" for k in PLAN_FIELDS if saved[k] != getattr(cfg, k)]
    if len(info["rng"]) != world:
        changed.append(f"{len(info['rng'])} processes (now {world})")
    if changed:
        raise SystemExit(f"--resume: {run_dir}/last was saved in the middle of epoch {state['epoch'] + 1} (after batch "
                         f"{state['batch']}), and the rest of that epoch depends on settings that changed. It was "
                         f"saved with {', '.join(changed)}: resume with those, and change them once a later epoch "
                         f"has ended")


def drop_rows_after(metrics_file: Path, epoch: int) -> None:
    """Forget metrics of epochs after the checkpoint being resumed: a run killed while that epoch's checkpoint was
    being written logged the epoch, and will log it again. A last line cut short goes too, or the next row would be
    appended to it."""
    if metrics_file.exists():
        rows, text = read_jsonl(metrics_file), metrics_file.read_text()
        torn = bool(text) and not text.endswith("\n")
        if torn or any(row["epoch"] > epoch for row in rows):
            with atomic_write(metrics_file) as f:
                f.writelines(json.dumps(row) + "\n" for row in rows if row["epoch"] <= epoch)


def find_run_dir(cfg: Config, d: Dist) -> Path:
    """The run directory, checked but not touched: an existing run needs --resume or --overwrite. One process checks;
    where it finds a problem, every process stops (the others quietly), rather than going on to a barrier alone."""
    run_dir = Path(broadcast_object(cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S"), d))
    problem = None
    if d.main:
        try:
            check_run_dir(run_dir, cfg, d)
        except (SystemExit, ValueError) as e:
            problem = e
    if not d.enabled and problem is not None:
        raise problem
    if broadcast_object(problem is not None, d):
        if d.main:
            print(problem if isinstance(problem, SystemExit) else f"train.py: error: {problem}", file=sys.stderr,
                  flush=True)
        barrier(d)  # said before any process exits: torchrun stops the others at the first exit
        raise SystemExit(1)
    return run_dir


def check_run_dir(run_dir: Path, cfg: Config, d: Dist) -> None:
    """find_run_dir's checks, on one process: they raise SystemExit or ValueError with the message to print."""
    nearest = next(p for p in [run_dir, *run_dir.parents] if p.exists())  # the folder it goes into, or is
    if not nearest.is_dir():  # said now, not once the data and the model are ready
        raise SystemExit(f"--run-dir {run_dir}: {nearest} is a file, not a folder; choose another --run-dir")
    if not os.access(nearest, os.W_OK):
        raise SystemExit(f"--run-dir {run_dir}: {nearest} is not writable here; choose another --run-dir")
    # a run stopped before its first checkpoint was written has nothing to lose (its config.json, metrics.jsonl,
    # curves.png and a half-written checkpoint folder are cleared when it starts over); a finished checkpoint
    # folder that no link reaches yet is one to resume from (finish_interrupted_save)
    has_run = (run_dir / "last").exists() or (run_dir / CHECKPOINTS).is_dir() and any(
        not f.name.startswith(".") for f in (run_dir / CHECKPOINTS).iterdir())
    repaired = finish_interrupted_save(run_dir) if cfg.resume else None
    if repaired:
        print(f"note: {repaired}")
    if cfg.resume and not (run_dir / "last" / "checkpoint.json").exists():
        raise SystemExit(f"--resume: {run_dir} holds no checkpoint to resume (no {run_dir}/last)")
    if cfg.resume:
        done = read_info(run_dir / "last")["state"]["epoch"]
        if done >= cfg.epochs:  # said before the data and the model load
            raise ValueError(f"--resume: {run_dir} has trained {done} epoch{'s' * (done != 1)}, and --epochs is "
                             f"{cfg.epochs}: to train on, give more, e.g. --epochs {done + cfg.epochs}")
        check_mid_epoch_resume(run_dir, cfg, d.world)
    if has_run and not cfg.resume and not cfg.overwrite:
        raise SystemExit(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it "
                         f"over, or choose another --run-dir")


def prepare_run_dir(run_dir: Path, cfg: Config, d: Dist) -> None:
    """Create the run directory once the run has started well; unless resuming, clear what an earlier run left there
    (find_run_dir let it through: --overwrite, or a run stopped before its first checkpoint)."""
    if d.main:
        if not cfg.resume:  # a run over an old one (--overwrite), or over one stopped before its first checkpoint
            for name in [CHECKPOINTS, "last", "best", "metrics.jsonl", "test_metrics.json", "curves.png"]:
                path = run_dir / name
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(d)


def interrupted(cfg: Config, d: Dist, how: str = "interrupted") -> str:
    """The line a run stopped by Ctrl-C or SIGTERM (or an error) ends with: what RUN/last holds, and the command that
    resumes it."""
    last = Path(cfg.run_dir) / "last"
    if not cfg.run_dir or not (last / "checkpoint.json").exists():
        return (f"train.py: {how} before the first checkpoint of {cfg.run_dir or 'the run'} (the end of epoch 1, or "
                f"--save-every steps): there is nothing to resume; the same command starts the run over")
    state = read_info(last)["state"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))  # torchrun's processes on this node
    launch = "python train.py" if d.world == 1 else f"torchrun --nproc_per_node {per_node} train.py"
    if d.world > per_node:  # several nodes: each starts its share again, with its own rendezvous flags
        launch = (f"torchrun --nnodes {d.world // per_node} --nproc_per_node {per_node} (and this run's --node-rank "
                  f"and rendezvous flags, on each node) train.py")
    return (f"train.py: {how}; {last} holds step {state['step']} (epoch {state['epoch'] + 1}, batch "
            f"{state['batch']}): continue with `{launch} --run-dir {quote(cfg.run_dir)} --resume`")
