"""Ground-floor helpers: seeding, device and precision, atomic file writes, run provenance, JSON-lines logs."""

import argparse
import contextlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_DIR = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple's MPS, then the CPU; anything else is taken as a torch device string."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device torch knows: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no CUDA GPU here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} asked for Apple's MPS, which this machine or torch build lacks; use "
                         f"--device cpu")
    return device


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on CUDA where supported, else fp16 (with a grad scaler); fp32 off CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    return dtype


def fast_cuda_kernels(device: torch.device) -> None:
    """On CUDA: cuDNN picks the fastest convolution for each shape, and what stays in fp32 (the similarity matrices,
    the loss) runs in TF32. Training and evaluate.py both set it, so that their recall agrees to the last tie."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def trained_data_dir(data_dir: str) -> Path:
    """The data folder a checkpoint's config names. Its path is as given to train.py, often relative to the repo
    (data/shapes); from another working directory (a notebook kernel, a script elsewhere) look for it in the repo."""
    path = Path(data_dir)
    if not path.exists() and not path.is_absolute() and (REPO_DIR / path).exists():
        return REPO_DIR / path
    return path


def checkpoint_data_dir(data_dir: str) -> Path:
    """trained_data_dir where that folder is still there; else an error naming the way out, not one that says how
    to download a data set the user never asked for."""
    path = trained_data_dir(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"the checkpoint was trained on the data folder {data_dir}, which is not there any "
                                f"more (moved, renamed, or another machine?); name where it is now with --data-dir "
                                f"(the notebook's data_dir)")
    return path


def inference_precision(precision: str, device: torch.device) -> torch.dtype:
    """The training run's precision where this device has it, else the device's default: a checkpoint trained in
    fp16 on a GPU still evaluates and searches on a CPU."""
    try:
        return pick_precision(precision, device)
    except ValueError:
        return pick_precision("auto", device)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def append_jsonl(path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines log. A last line cut short (the machine went down, or the disk filled, while it was
    written) is left out; a damaged line before it is an error naming the file and the line."""
    text = Path(path).read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}, is not JSON ({e}): repair or delete that line") from None
    return rows


def not_utf8(text: str) -> bool:
    """Whether a file name on disk (or a command-line argument) was not UTF-8: Python keeps its stray bytes as
    surrogates U+DC80..U+DCFF."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def path_arg(value: str) -> str:
    """argparse type of a path flag: an empty value (an unset shell variable, `--out "$DIR"`) is refused, not read as
    the flag left out, which could mean a default folder or a 4 GB download."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a path, or leave the flag out")
    return value


def too_many_workers(n: int, name: str = "--num-workers") -> str | None:
    """Why n worker processes is too many for this machine (each costs seconds to start and memory), or None."""
    cpus = os.cpu_count() or 1
    if n > 4 * cpus:
        return f"{name} {n} is far more than this machine's {cpus} CPUs; use at most {4 * cpus} (4 per CPU); " \
               f"about {cpus} is usually enough"
    return None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip() if out.returncode == 0 else ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    """What produced a run: code version, command line, library versions, machine."""
    import timm
    import transformers

    info = {
        "git_sha": git_sha(),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name()
    return info


class HubError(RuntimeError):
    """Weights or files that could not come from the Hugging Face Hub."""


# The flags that take every Hub download out of a run: random initialisation and a tokenizer trained on the captions.
OFFLINE_FLAGS = "--no-image-pretrained --no-text-pretrained --text-model distilbert --tokenizer local"


def model_type_of(name: str) -> str:
    """The transformers model type a Hub name most likely has ("bert-base-uncased" -> "bert", "answerdotai/
    ModernBERT-base" -> "modernbert"), which builds offline with random weights; else "distilbert"."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # here: most callers never need it
    first = re.split(r"[-_.]", name.rstrip("/").split("/")[-1].lower())[0]
    return first if first in CONFIG_MAPPING else "distilbert"


def hub_error(name: str, what: str, flag_hint: str, cause: Exception, repo: str = "",
              local_flag: str = "") -> HubError:
    """A fail-fast message for weights or files that could not come from the Hugging Face Hub (repo: the Hub
    repository holding them, when it differs from `name`; local_flag: the flag that also takes a local folder)."""
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    offline = " (HF_HUB_OFFLINE is set, so nothing was downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
    local = f", or point {local_flag} at a local folder holding the files" if local_flag else ""
    return HubError(
        f"could not load the {what} {name!r} from the Hugging Face Hub or its cache{offline}: "
        f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
        f"  - the cache is HF_HOME={home}; pre-download on a machine with internet with\n"
        f"      hf download {repo or name}\n"
        f"    and copy that cache to this machine{local};\n"
        f"  - or train without it: {flag_hint}\n"
        f"  - or without any download at all (random initialisation): {OFFLINE_FLAGS}"
        + ("" if offline else "\n  - offline? set HF_HUB_OFFLINE=1, and this comes at once, not after a minute of "
           "retries"))
