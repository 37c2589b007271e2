"""Checkpoints: safetensors + JSON only (nothing on the load path unpickles), written atomically.

A run directory holds checkpoints/step-XXXXXXXX/ folders and two symbolic links, `last` and `best`, to them:
    model.safetensors     the weights (all that inference needs, with the two JSON files and tokenizer/)
    checkpoint.json       resolved config, step, epoch, position in the epoch, metrics, RNG states, provenance
    text_config.json      the text tower's architecture, so loading never downloads anything
    tokenizer/            the tokenizer the model was trained with
    training_state.safetensors   optimiser moments and RNG tensors, for exact resume
Each folder is written under a temporary name, flushed, and renamed; the links are then swapped atomically, `best`
before `last`. A crash at any moment leaves the previous `last` and `best` loadable, and a crash between the two swaps
leaves `best` ahead of `last`, which resuming repairs (finish_interrupted_save).
"""

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from clip import CLIPModel
from config import Config, config_from_dict
from utils import fsync_dir, write_json

CHECKPOINTS = "checkpoints"


def locate(path) -> Path:
    """The checkpoint folder a path names, as named (for messages): the folder or a link to it, a file inside it
    (model.safetensors, checkpoint.json: a file picker hands those out), or a run directory (its `best`, which a run
    has from the end of its first epoch on)."""
    path = Path(path)
    if path.is_file() and (path.parent / "checkpoint.json").exists():
        return path.parent
    if (path / "checkpoint.json").exists():
        return path
    if (path / "best" / "checkpoint.json").exists():
        return path / "best"
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint folder; pass the folder that holds "
                                f"checkpoint.json, e.g. runs/shapes/best")
    if (path / "last" / "checkpoint.json").exists():
        # not silently `last` instead: it was saved mid-epoch and never validated, so it is not what "the run" means
        raise FileNotFoundError(f"{path} has no `best` checkpoint yet: the run stopped before the end of its first "
                                f"epoch. Its latest, saved mid-epoch, is {path / 'last'}: pass that to use it, or "
                                f"finish training with `python train.py --run-dir {quote(str(path))} --resume`")
    if path.is_symlink() and not path.exists():  # `cp -r RUN/best elsewhere` copies the link, not the folder
        raise FileNotFoundError(f"{path} is a link to {os.readlink(path)}, which is not there: a copy of RUN/best or "
                                f"RUN/last copies only the link unless it follows links (`cp -rL`)")
    if not path.exists():  # a typo, or a run folder named from another working directory, or no run yet
        runs = sorted(str(p) for p in Path("runs").glob("*/best") if p.exists())[:5]
        found = f"runs here: {runs}" if runs else "no run has been trained here yet (`make demo` trains runs/shapes)"
        raise FileNotFoundError(f"{path} does not exist; pass a run's `best` or `last` folder ({found})")
    raise FileNotFoundError(f"{path} is not a checkpoint (no checkpoint.json); pass a run's `best` or `last` folder, "
                            f"e.g. runs/shapes/best")


def resolve(path) -> Path:
    """locate(path) with links followed: the step folder itself, which index files and run_dir_of() go by."""
    return locate(path).resolve()


def run_dir_of(folder) -> Path | None:
    """The run a checkpoint folder belongs to (RUN/checkpoints/NAME), or None for one kept outside its run."""
    folder = resolve(folder)
    return folder.parent.parent if folder.parent.name == CHECKPOINTS else None


# --- random number generators -----------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """(JSON-able part, tensor part) of every RNG this process uses: python, numpy, torch, CUDA."""
    py = random.getstate()
    np_state = np.random.get_state()
    info = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return info, tensors


def set_rng_state(info: dict, tensors: dict) -> None:
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# --- optimiser state as tensors + JSON --------------------------------------------------------------------------

def flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict, info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


# --- writing ----------------------------------------------------------------------------------------------------

def _fsync_tree(folder: Path) -> None:
    """Flush every file to disk (and make it readable to others: safetensors writes 0600 whatever the umask)."""
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o644)
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _point(link: Path, target: str) -> None:
    """Make `link` a symlink to `target`, atomically replacing whatever link was there."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


@dataclass
class Snapshot:
    """Everything one checkpoint holds, copied to host memory, so training can go on while it is written."""
    folder_name: str
    weights: dict  # name -> tensor, as model.safetensors
    tensors: dict  # optimiser moments and RNG states, as training_state.safetensors
    info: dict  # checkpoint.json
    text_config: dict
    tokenizer: object


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in host memory: a copy even on the CPU, where training would otherwise change it under us."""
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def capture(model, cfg: Config, tokenizer, state: dict, provenance: dict, optimizer=None, scaler=None,
            rng=None) -> Snapshot:
    """Copy a checkpoint's contents off the device (the only part the training loop waits for).

    state: JSON-able progress (step, epoch, batch, metrics, ...). rng: (info, tensors) of every rank's RNGs, as
    [rng_state() of rank 0, rank 1, ...]; None skips them (a weights-only checkpoint).
    """
    weights = {k: _host_copy(v) for k, v in model.state_dict().items()}
    tensors, info = {}, {"config": cfg.to_dict(), "state": state, "provenance": provenance}
    if optimizer is not None:
        opt_tensors, info["optimizer"] = flatten_optimizer(optimizer.state_dict())
        tensors.update({k: _host_copy(v) for k, v in opt_tensors.items()})
    if scaler is not None and scaler.is_enabled():
        info["scaler"] = scaler.state_dict()
    if rng is not None:
        info["rng"] = []
        for rank, (rng_info, rng_tensors) in enumerate(rng):
            info["rng"].append(rng_info)
            tensors.update({f"rng.{rank}.{k}": _host_copy(v) for k, v in rng_tensors.items()})
    return Snapshot(f"step-{state['step']:08d}", weights, tensors, json.loads(json.dumps(info)),
                    model.text_encoder.config.to_dict(), tokenizer)


class CheckpointError(OSError):
    """A checkpoint that could not be written; the links (RUN/last, RUN/best) still name the checkpoints before."""


def write(snapshot: Snapshot, run_dir, links) -> Path:
    """Write the snapshot as RUN/checkpoints/<step folder> and point each name in `links` ("last", "best") at it."""
    run_dir = Path(run_dir)
    broken = [k for k, v in snapshot.weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # the loss is checked before each save, but a step's gradients can still break the weights
        raise FloatingPointError(f"not saving {snapshot.folder_name}: {len(broken)} weights hold nan or inf (e.g. "
                                 f"{broken[:3]}); {run_dir}/last still holds the previous checkpoint")
    final = run_dir / CHECKPOINTS / snapshot.folder_name
    tmp = run_dir / CHECKPOINTS / f".{snapshot.folder_name}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(snapshot.weights, str(tmp / "model.safetensors"))
        if snapshot.tensors:
            save_file(snapshot.tensors, str(tmp / "training_state.safetensors"))
        write_json(tmp / "checkpoint.json", snapshot.info)
        write_json(tmp / "text_config.json", snapshot.text_config)
        snapshot.tokenizer.save_pretrained(tmp / "tokenizer")
        _fsync_tree(tmp)
        if final.exists():  # a run killed before its links reached this folder left it: an older state than ours
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for name in [n for n in ("best", "last") if n in links]:  # best first: see finish_interrupted_save
            _point(run_dir / name, f"{CHECKPOINTS}/{snapshot.folder_name}")
        fsync_dir(run_dir)
    except (OSError, SafetensorError) as e:  # a full or read-only disk: the half-written folder must not fill it more
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint {snapshot.folder_name} into {run_dir / CHECKPOINTS} "
                              f"({type(e).__name__}: {e})") from e
    _collect_garbage(run_dir)
    return final


def finish_interrupted_save(run_dir) -> str | None:
    """Point `last` at `best` where a crash came between write()'s two link swaps: `best` then holds a later step
    than `last`, or there is no `last` yet. Returns what it did, or None where the links agree.

    Resuming from the older `last` instead would restart before the best score was reached, and its next save would
    delete the folder only `best` points to."""
    run_dir = Path(run_dir)
    last, best = run_dir / "last", run_dir / "best"
    if not (best / "checkpoint.json").exists():
        return None
    best_step = _read_json(best / "checkpoint.json")["state"]["step"]
    if (last / "checkpoint.json").exists() and _read_json(last / "checkpoint.json")["state"]["step"] >= best_step:
        return None
    _point(last, os.readlink(best))
    fsync_dir(run_dir)
    return f"{last} now points where {best} does ({os.readlink(best)}, step {best_step}): a save was cut short"


def save_checkpoint(run_dir, links, model, cfg: Config, tokenizer, state: dict, provenance: dict,
                    optimizer=None, scaler=None, rng=None) -> Path:
    """capture() then write(), waiting for the disk."""
    return write(capture(model, cfg, tokenizer, state, provenance, optimizer, scaler, rng), run_dir, links)


class BackgroundWriter:
    """Writes one checkpoint at a time on a thread while training goes on (a full-size checkpoint is over a
    gigabyte, seconds of disk time per save). submit() first waits for the previous write; wait() re-raises a
    failed write's error. The thread is joined at interpreter exit, so a started write always completes."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = None

    def submit(self, snapshot: Snapshot, run_dir, links) -> None:
        self.wait()
        self._pending = self._pool.submit(write, snapshot, run_dir, links)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def check(self) -> None:
        """Re-raise a write that has failed already, without waiting for one still running: cheap enough for every
        few steps, so that a full disk stops the run at once rather than at the next save."""
        if self._pending is not None and self._pending.done() and self._pending.exception() is not None:
            self.wait()


def _collect_garbage(run_dir: Path) -> None:
    """Delete checkpoint folders no link points to any more, and half-written ones a killed save left behind
    (one process writes checkpoints, so once its own folder is renamed any temporary one is stale)."""
    keep = {os.readlink(run_dir / n).split("/")[-1] for n in ("last", "best") if (run_dir / n).is_symlink()}
    for folder in (run_dir / CHECKPOINTS).iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------------------------

def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is damaged ({e}); use another checkpoint of the run (RUN/best, RUN/last)") from None


def _read_tensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"{file} is damaged ({e}); use another checkpoint of the run (RUN/best, RUN/last)") from None


def read_info(path) -> dict:
    return _read_json(resolve(path) / "checkpoint.json")


def _check_complete(folder: Path) -> None:
    """A folder that lost part of a checkpoint (copied file by file) says which part, not what transformers makes of
    a missing folder."""
    missing = [n for n in ("model.safetensors", "text_config.json", "tokenizer") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: a checkpoint is its whole folder (model."
                                f"safetensors, checkpoint.json, text_config.json, tokenizer/); copy all of it, e.g. "
                                f"`cp -rL RUN/best DEST`")


def read_tokenizer(path):
    """The tokenizer a checkpoint was trained with (saved inside it)."""
    folder = resolve(path)
    _check_complete(folder)
    try:
        return AutoTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'tokenizer'} is damaged ({e}); use another checkpoint of the run (RUN/best, "
                         f"RUN/last)") from None


def load_model(path, device="cpu") -> tuple[CLIPModel, Config, object]:
    """(model in eval mode, its config, its tokenizer) from a checkpoint, with no download and no unpickling."""
    folder = resolve(path)
    info = _read_json(folder / "checkpoint.json")
    cfg = config_from_dict(info["config"])
    tokenizer = read_tokenizer(folder)
    text_values = _read_json(folder / "text_config.json")
    text_config = AutoConfig.for_model(**text_values)
    # the weights come from the file: build both towers with random init, never from the Hub
    arch = Config(**{**cfg.to_dict(), "image_pretrained": False, "text_pretrained": False})
    model = CLIPModel(arch, len(tokenizer), text_config=text_config)
    load_weights(model, folder / "model.safetensors")
    return model.to(device).eval(), cfg, tokenizer


def load_weights(model: torch.nn.Module, file) -> dict:
    """Load safetensors weights, explaining any mismatch between the file and the model's architecture. Returns the
    weights of the file that the model no longer has: BERT's unused pooler, which text towers now drop
    (modules.TextEncoder); checkpoints from before still load."""
    saved = _read_tensors(Path(file))
    own = model.state_dict()
    dropped = {k: saved.pop(k) for k in list(saved) if k not in own and ".model.pooler." in k}
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(saved) & set(own)) if saved[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{file} does not fit this architecture: {len(missing)} weights missing from the file "
                         f"{missing[:4]}, {len(unexpected)} not in the model {unexpected[:4]}, {len(shapes)} of "
                         f"another shape {shapes[:4]}; build the model from the checkpoint's own config")
    model.load_state_dict(saved, strict=True)
    return dropped


def _drop_last_params(saved: dict, optimizer, counts: dict) -> None:
    """Forget the last counts[name] parameters of each named group of a saved optimiser state (and their moments),
    where that makes the group fit this run's."""
    own = {g["name"]: len(g["params"]) for g in optimizer.param_groups}
    for group in saved["param_groups"]:
        n = counts.get(group["name"], 0)
        if n and len(group["params"]) - n == own.get(group["name"]):
            for param_id in group["params"][-n:]:
                saved["state"].pop(param_id, None)
            group["params"] = group["params"][:-n]


def _match_groups(saved: dict, optimizer) -> list[str]:
    """Lay a saved optimiser state over this run's parameter groups by name, for a run resumed with a tower frozen
    or unfrozen (--no-image-trainable, --no-text-trainable, --no-learn-temperature): a group no longer trained is
    left behind, a newly trained one starts with fresh moments. Returns what changed, in words."""
    names = [g["name"] for g in optimizer.param_groups]
    if [g["name"] for g in saved["param_groups"]] == names:
        return []
    old = {g["name"]: g for g in saved["param_groups"]}
    state, groups, first = {}, [], 0
    for own in optimizer.param_groups:
        ids = list(range(first, first + len(own["params"])))
        first += len(ids)
        before = old.get(own["name"])
        if before is not None and len(before["params"]) != len(ids):
            raise ValueError(f"--resume: the {own['name']} group has {len(ids)} parameters, the checkpoint's "
                             f"{len(before['params'])}: the model changed since it was saved")
        if before is not None:
            state.update({i: saved["state"][j] for i, j in zip(ids, before["params"]) if j in saved["state"]})
        groups.append({**(before or {k: v for k, v in own.items() if k != "params"}), "params": ids})
    saved["state"], saved["param_groups"] = state, groups
    return ([f"{n} no longer trains" for n in old if n not in names]
            + [f"{n} starts training with fresh optimiser moments" for n in names if n not in old])


def load_training_state(path, model, optimizer, scaler, rank: int) -> dict:
    """Restore weights, optimiser, grad scaler and this rank's RNGs from a checkpoint; return its progress state."""
    folder = resolve(path)
    info = _read_json(folder / "checkpoint.json")
    dropped = load_weights(model, folder / "model.safetensors")
    tensors = _read_tensors(folder / "training_state.safetensors")
    saved = unflatten_optimizer(tensors, info["optimizer"])
    if dropped:  # the pooler's weight and bias came last in the text tower's two groups (engine.param_groups)
        _drop_last_params(saved, optimizer, {"text": sum(t.ndim > 1 for t in dropped.values()),
                                             "text_no_decay": sum(t.ndim <= 1 for t in dropped.values())})
    changed = _match_groups(saved, optimizer)
    if changed and rank == 0:
        print(f"note: resuming with other parts in training than {folder} had: {'; '.join(changed)}")
    # The checkpoint brings the moments; this run's flags and device bring the settings: learning rates and weight
    # decay as resolved from the command line, and the kernel (fused on CUDA, foreach elsewhere).
    for group, own in zip(saved["param_groups"], optimizer.param_groups):
        group.update({k: v for k, v in own.items() if k != "params"})
    optimizer.load_state_dict(saved)
    for param, state in optimizer.state.items():
        for key, value in state.items():  # moments are saved contiguous; channels_last weights need theirs alike
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    if "scaler" in info and scaler is not None:
        scaler.load_state_dict(info["scaler"])
    if rank < len(info["rng"]):  # a rank the run did not have yet (more processes now) keeps its fresh seed
        prefix = f"rng.{rank}."
        set_rng_state(info["rng"][rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return info["state"]
