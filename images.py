"""Pixels: decoding, the decoded-once image cache, and batched augmentation that runs on the training device.

Every image becomes an S x S uint8 square first (shorter side resized to S, centre crop), with S a little larger than
the training size (S = image_size / crop_pct from timm's data config). That square comes either from the cache (a
memory-mapped .npy built once, reused while the source files are unchanged) or from decoding the JPEG on the fly; both
use `to_square`, so both give the same pixels. Augmentation (random resized crop) and normalisation then run on whole
batches on the device, so the CPU only ever copies bytes.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates at import otherwise

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from utils import fsync_dir, write_json

MIN_SIDE = 2  # pixels: a 1-pixel-wide file is a placeholder or a spacer, not a picture
Image.MAX_IMAGE_PIXELS = 200_000_000  # still guards against decompression bombs, but allows big photos
CACHE_VERSION = 5  # bump when `to_square` or the meta file changes, so older caches are rebuilt (2: JPEGs decode at
# reduced scale; 3: 16-bit grayscale is scaled to 8 bits, no longer clipped to white; 4: failed images stored as rows;
# 5: 32-bit float grayscale is scaled to 8 bits, no longer black)


def load_rgb(path, min_side: int = 0) -> Image.Image:
    """Decode any image PIL reads, apply its EXIF orientation, and convert (grayscale, CMYK, palette, ...) to RGB.

    With `min_side`, a JPEG may decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's `draft`) while both
    sides stay at least `min_side`: a 4032x3024 phone photo bound for a 256 px square decodes 4-9x faster. Flickr's
    500x375 JPEGs decode at full scale for any square over 187 px.
    """
    with Image.open(path) as img:
        if min_side:
            img.draft(None, (min_side, min_side))  # a no-op for other formats
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale: convert() would clip it to white
            img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
        elif img.mode == "F":  # 32-bit float grayscale (scientific TIFFs): convert() truncates [0, 1] to black
            values = np.nan_to_num(np.asarray(img, dtype=np.float64))
            peak = values.max()
            top = 1.0 if peak <= 1 else 255.0 if peak <= 255 else peak  # a [0, 1] scale, an 8-bit one, or its own
            img = Image.fromarray((np.clip(values / top, 0, 1) * 255 + 0.5).astype(np.uint8))
        return img.convert("RGB")


def square_transform(size: int) -> A.Compose:
    """Shorter side to `size` (area interpolation, the sharpest for shrinking), then the centre square."""
    return A.Compose([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_AREA),
                      A.CenterCrop(height=size, width=size)])


def to_square(path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the one way a file on disk becomes pixels, for the cache and the JPEG path alike.
    Refuses what `check_image` refuses as too small, so a searched folder skips the files training would skip."""
    img = load_rgb(path, min_side=size)
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        raise ValueError(f"too small ({img.width}x{img.height})")
    return square_transform(size)(image=np.asarray(img))["image"]


def check_image(path) -> str | None:
    """None if the file decodes exactly as training will decode it (`load_rgb`), else why not: empty, truncated, not
    an image, too small. Run at prepare time so that no broken file is ever met mid-epoch."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with load_rgb(path) as img:
            if img.width < MIN_SIDE or img.height < MIN_SIDE:
                return f"too small ({img.width}x{img.height})"
        return None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError)
        return f"{type(e).__name__}: {e}"


def find_bad_images(paths: list[Path], workers: int) -> dict[str, str]:
    """{file name: why} for every image that does not decode as training decodes it; decoding costs ~3 ms per image
    per core, so it runs in `workers` processes."""
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = pool.map(check_image, paths, chunksize=64) if pool else map(check_image, paths)
    try:
        results = tqdm(results, total=len(paths), desc="verifying images", unit="img")
        return {p.name: why for p, why in zip(paths, results, strict=True) if why}
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def fingerprint(paths, root=None) -> str:
    """Changes when any file is added, removed, resized, touched or replaced by another file (the inode: renames
    that swap two files, or an extraction that keeps sizes and times). With `root`, names count relative to it, so
    moving the folder that holds root and files alike (on one file system: inodes and times stay) changes nothing."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        name = os.path.relpath(p, root) if root else p
        # fsencode: a name that is not UTF-8 on disk holds surrogates, which str.encode() refuses
        h.update(os.fsencode(name) + f"|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode())
    return h.hexdigest()


class JpegSource:
    """Decodes each image from disk when asked: for data sets too big for the cache."""

    def __init__(self, paths, size: int):
        self.paths = [str(p) for p in paths]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def get(self, indices) -> np.ndarray:  # (B, S, S, 3) uint8
        squares = []
        for i in indices:
            try:
                squares.append(to_square(self.paths[i], self.size))
            except Exception as e:  # PIL raises many kinds
                data_dir = quote(str(Path(self.paths[i]).parent.parent))  # DATA/images/x.jpg
                raise ValueError(f"{self.paths[i]} could not be decoded ({type(e).__name__}: {e}); `python download.py"
                                 f" --prepare {data_dir}` lists broken images so training skips them") from None
        return np.stack(squares)


class CacheSource:
    """Every image decoded once into one memory-mapped (N, S, S, 3) uint8 array.

    `lock`: the file, open with a shared flock on it while this object lives, so that a build for another list of
    files (in another process: evaluate.py after a caption edit) leaves the file in place. Data-loader workers need
    no lock of their own: a forked one shares this one (its exit does not release it), a spawned one unpickles a
    copy without it, and either ends before the process holding it.
    """

    def __init__(self, file, size: int, lock=None):
        self.file = str(file)
        self.size = size
        self._array = None
        self._lock = lock

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # opened lazily, so data-loader workers each map the file themselves
            self._array = np.load(self.file, mmap_mode="r")
        return self._array

    def __getstate__(self):
        return {"file": self.file, "size": self.size, "_array": None, "_lock": None}

    def __len__(self):
        return len(self.array)

    def get(self, indices) -> np.ndarray:
        """(B, S, S, 3) uint8 rows, copied once, read in file order (kinder to a disk than random order)."""
        indices = np.asarray(indices)
        out = np.empty((len(indices), *self.array.shape[1:]), dtype=self.array.dtype)
        for pos in np.argsort(indices, kind="stable"):
            out[pos] = self.array[indices[pos]]
        return out


def _square_or_none(args):
    path, size = args
    try:
        return to_square(path, size)
    except Exception:
        return None


def abandoned_build(tmp: Path) -> bool:
    """Whether a cache build's temp file was left by a build that ended without finishing (killed, out of memory).
    A live build holds an exclusive lock on its file (flock, which processes in other containers sharing the file
    system see too); a file younger than a minute may be a build that has not taken its lock yet."""
    if time.time() - tmp.stat().st_mtime < 60:
        return False
    with open(tmp, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _lock_shared(file: Path):
    """`file` open with a shared flock on it (see CacheSource), or None if it is gone: deleted as stale, or replaced
    by another build, between finding it and locking it."""
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        return None
    fcntl.flock(f, fcntl.LOCK_SH)  # waits while a clean-up holds LOCK_EX to delete it
    try:
        if os.stat(file).st_ino == os.fstat(f.fileno()).st_ino:
            return f
    except FileNotFoundError:
        pass
    f.close()
    return None


def _delete_unless_in_use(file: Path) -> None:
    """Delete a stale cache (.npy and .json) unless a process still reads it (holds its shared lock): that one stays
    for a later call. Deleted under LOCK_EX, so a reader locking it meanwhile then finds it gone (see _lock_shared)."""
    try:
        f = open(file, "rb")
    except FileNotFoundError:  # a meta file left alone, or another process deleting beside us got there first
        file.with_suffix(".json").unlink(missing_ok=True)
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{file}: a stale image cache, kept while another process still reads it")
            return
        file.unlink(missing_ok=True)
        file.with_suffix(".json").unlink(missing_ok=True)


def _read_meta(meta_file: Path) -> dict:
    """A cache's meta file, or {} (a rebuild) if it is missing or unreadable: cut short by a crash or a full disk."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return {}
    return meta if isinstance(meta, dict) else {}


def _decode_into(array: np.ndarray, paths: list[str], size: int, workers: int, desc: str) -> list[int]:
    """Fill array[i] with path i's square, in `workers` processes; returns the rows whose file failed to decode."""
    jobs = [(p, size) for p in paths]
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    results = pool.map(_square_or_none, jobs, chunksize=64) if pool else map(_square_or_none, jobs)
    failed = []
    try:
        for i, img in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img")):
            if img is None:
                failed.append(i)
            else:
                array[i] = img
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # interrupted (Ctrl-C, a full disk): the queued images are dropped
    return failed


def build_cache(paths, size: int, cache_dir, workers: int = 0, desc: str = "caching images"):
    """Decode `paths` into cache_dir/images-{size}px-*.npy unless a cache of exactly these files exists.

    Returns (CacheSource, paths that failed to decode); failed rows hold zeros and must not be used.
    """
    paths = [str(p) for p in paths]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # keyed on paths relative to the cache folder, which lives in the data folder: a moved data folder keeps its cache
    # (and a folder spelled relative or absolute, or through a symlink, has one key however the caller spells both)
    names = [os.path.relpath(p, cache_dir) for p in paths]
    key = hashlib.sha1(b"\n".join(map(os.fsencode, names))).hexdigest()[:12]
    file, meta_file = cache_dir / f"images-{size}px-{key}.npy", cache_dir / f"images-{size}px-{key}.json"
    # a cache of this size for another list of files (images added, removed or found broken since) is stale, and
    # at Flickr30k's size it holds gigabytes; caches of other sizes stay, for models of other resolutions. Tidied on
    # every call, so a stale cache kept while a run still read it goes at the next call after that run ends.
    for old in {p.with_suffix(".npy") for p in cache_dir.glob(f"images-{size}px-*")} - {file}:
        _delete_unless_in_use(old)
    for tmp in cache_dir.glob(".images-*.tmp"):  # never another process's build in progress
        with contextlib.suppress(FileNotFoundError):
            if abandoned_build(tmp):
                tmp.unlink()
    stamp = fingerprint(paths, root=cache_dir)
    meta = _read_meta(meta_file)
    if meta.get("fingerprint") == stamp and meta.get("version") == CACHE_VERSION:
        lock = _lock_shared(file)
        if lock:
            return CacheSource(file, size, lock), [paths[i] for i in meta["failed"]]
    need = len(paths) * size * size * 3
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise OSError(f"the image cache needs {need / 1e9:.1f} GB in {cache_dir} but only {free / 1e9:.1f} GB are "
                      f"free; free some space or train with --image-cache off (decodes JPEGs every step)")
    # a name of our own: another process building the same cache (two runs on one data folder) writes beside us,
    # and whichever finishes last replaces the other's equal file
    tmp = cache_dir / f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    lock = open(tmp, "xb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the cache is in place: abandoned_build() leaves the file alone
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        failed_rows = _decode_into(array, paths, size, workers, desc)
        array.flush()
        del array
        os.replace(tmp, file)
    except BaseException:
        lock.close()
        tmp.unlink(missing_ok=True)
        raise
    # from here on, the lock of a cache in use (see CacheSource); flock swaps the lock's kind non-atomically, but a
    # clean-up would have to glob this new file within that moment
    fcntl.flock(lock, fcntl.LOCK_SH)
    write_json(meta_file, {"version": CACHE_VERSION, "fingerprint": stamp, "size": size, "count": len(paths),
                           "failed": failed_rows})
    fsync_dir(cache_dir)
    return CacheSource(file, size, lock), [paths[i] for i in failed_rows]


def sample_boxes(generator: torch.Generator, n: int, size: int, scale_min: float,
                 ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """(n, 4) integer crop boxes (x0, y0, w, h) in an S x S square, as torchvision's RandomResizedCrop samples them:
    area share uniform in [scale_min, 1] and log aspect ratio uniform in `ratio`, drawn up to `tries` times until
    the box fits (else the whole square), then a uniform position. Clamping a box that does not fit instead would
    shrink its area below scale_min."""
    area = torch.empty(n, tries).uniform_(scale_min, 1.0, generator=generator) * size * size
    log_r = torch.empty(n, tries).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator)
    w = torch.sqrt(area * torch.exp(log_r)).round()  # (n, tries)
    h = torch.sqrt(area / torch.exp(log_r)).round()
    fits = (w >= 1) & (w <= size) & (h >= 1) & (h <= size)
    first = fits.int().argmax(1, keepdim=True)  # (n, 1): the first draw that fits
    whole = torch.full((n,), float(size))
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], whole)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], whole)
    x0 = (torch.rand(n, generator=generator) * (size - w + 1)).floor()
    y0 = (torch.rand(n, generator=generator) * (size - h + 1)).floor()
    return torch.stack([x0, y0, w, h], dim=1)


def full_boxes(n: int, size: int) -> torch.Tensor:
    """(n, 4) boxes covering the whole square (a real copy: the loader pins it, and pinning refuses views)."""
    return torch.tensor([[0.0, 0.0, size, size]]).repeat(n, 1)


def crop_resize(pixels: torch.Tensor, boxes: torch.Tensor, out_size: int, mean, std) -> torch.Tensor:
    """Crop each image to its box, resize bilinearly to out_size, and normalise; one batched op on any device.

    pixels: (B, S, S, 3) uint8; boxes: (B, 4) (x0, y0, w, h) in pixels. Returns (B, 3, out, out) float32.
    Output pixel i samples the box at x0 + (i + 0.5) * w / out - 0.5 (half-pixel centres), clamped to the box's
    edge pixels: exactly crop-then-resize as OpenCV / albumentations do it (see reference_crop_resize).
    """
    S = pixels.shape[1]
    x = pixels.permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    x0, y0, w, h = boxes.to(x.device, non_blocking=True).float().unbind(1)  # each (B,)
    steps = (torch.arange(out_size, device=x.device, dtype=torch.float32) + 0.5) / out_size  # (out,)

    def sample_at(start, length):  # pixel coordinates (B, out) -> grid_sample's [-1, 1] (align_corners=False)
        coords = start[:, None] + steps[None, :] * length[:, None] - 0.5
        coords = torch.maximum(torch.minimum(coords, (start + length - 1)[:, None]), start[:, None])
        return (2 * coords + 1) / S - 1

    gx, gy = sample_at(x0, w), sample_at(y0, h)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, out, out, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, out, out)
    mean, std = _normalisation(tuple(mean), tuple(std), x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device):
    """(1, 3, 1, 1) mean and std in 0-255 units, made once per device (a fresh host-to-device copy every step
    would make the host wait for the GPU)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255 for v in (mean, std))


def reference_crop_resize(square: np.ndarray, box, out_size: int, mean, std) -> np.ndarray:
    """The CPU definition of `crop_resize` for one image, with albumentations: (out, out, 3) float32."""
    x0, y0, w, h = (int(v) for v in box)
    aug = A.Compose([A.Crop(x_min=x0, y_min=y0, x_max=x0 + w, y_max=y0 + h),
                     A.Resize(out_size, out_size, interpolation=cv2.INTER_LINEAR),
                     A.Normalize(mean=mean, std=std, max_pixel_value=255.0)])
    return aug(image=square)["image"]


def square_size(image_size: int, crop_pct: float) -> int:
    """Side of the cached square: image_size / crop_pct (floored), as timm sizes its eval resize."""
    return int(math.floor(image_size / crop_pct))


@dataclass(frozen=True)
class Pixels:
    """How uint8 squares become model input for one image encoder: size, normalisation, memory format."""
    image_size: int
    square: int
    mean: tuple
    std: tuple
    channels_last: bool = False

    @classmethod
    def for_encoder(cls, data_config: dict, image_size: int, channels_last: bool = False) -> "Pixels":
        return cls(image_size, square_size(image_size, data_config.get("crop_pct", 0.875)),
                   tuple(data_config["mean"]), tuple(data_config["std"]), channels_last)

    def __call__(self, pixels: torch.Tensor, boxes: torch.Tensor, device) -> torch.Tensor:
        """(B, S, S, 3) uint8 + (B, 4) boxes -> (B, 3, image_size, image_size) float32 on `device`."""
        x = crop_resize(pixels.to(device, non_blocking=True), boxes, self.image_size, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def from_files(self, paths, device) -> torch.Tensor:
        """Whole images (no augmentation) straight from files, e.g. a user's query image."""
        squares = torch.from_numpy(np.stack([to_square(p, self.square) for p in paths]))
        return self(squares, full_boxes(len(paths), self.square), device)
