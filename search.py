"""Search with a trained checkpoint: text -> image and image -> text, as a command and as the library demo.ipynb uses.

    python search.py --checkpoint runs/shapes/best --text "a red circle" --k 9 --out x.jpg
    python search.py --checkpoint runs/shapes/best --image data/shapes/images/1000012.jpg --out y.jpg
    python search.py --checkpoint runs/shapes/best --images ~/Pictures --text "a dog on a beach"
    python search.py --checkpoint runs/shapes/best --data-dir data/shapes --make-results results

What is searched: the test split (--split) of the checkpoint's data folder (--data-dir), images and captions; or, with
--images, any folder of your own images (any size, subfolders and linked folders included). It is embedded once, in
batches, into an index stored inside the checkpoint folder (index-<hash>.safetensors: the embeddings, with JSON
metadata naming the checkpoint, the files and the captions) and reused until the checkpoint, an image (name, size,
modification time) or a caption changes. A checkpoint keeps its 4 most recently used indexes (KEEP_INDEXES) and
removes older ones, saying so. Scores are cosine similarities of unit embeddings, the quantity training and
evaluation rank by.
"""

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from captions import IMAGE_EXTS, image_files_in, is_data_folder
from checkpoint import load_model, resolve, run_dir_of
from clip import CLIPModel
from config import Config
from dataset import CaptionData
from evaluate import embed_images, embed_texts, warn_if_seen
from images import Pixels, check_image, fingerprint, full_boxes, to_square
from plots import curves_figure, image_to_text_figure, read_metrics, save_figure, text_to_image_figure
from utils import REPO_DIR, autocast, checkpoint_data_dir, inference_precision, not_utf8, path_arg, pick_device

INDEX_VERSION = 1  # bump when the index layout changes: older files are then rebuilt
STALE_TMP_SECONDS = 3600  # a temporary index file older than this was left by a killed search
KEEP_INDEXES = 4  # per checkpoint, the most recently used: each split or folder searched leaves one, and they add up
TEXT_K, IMAGE_K = 9, 5  # a 3 x 3 grid of images; five captions, as many as a Flickr30k image has
EXAMPLES = 3  # pictures per direction in results/


@dataclass
class Searcher:
    """A checkpoint loaded for search, with what embedding a query needs."""
    model: CLIPModel
    cfg: Config
    tokenizer: object
    folder: Path  # the resolved checkpoint folder, where indexes are stored
    pixels: Pixels
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 256


@dataclass
class Index:
    """Unit embeddings of a collection: its images and, for a data split, its captions."""
    source: str  # what it holds, for messages
    paths: list[str]  # absolute image paths; row i of image_emb
    image_emb: torch.Tensor  # (n_images, D) float32 on the CPU
    captions: list[str]  # a data split's captions, grouped by image; empty for a folder
    text_emb: torch.Tensor  # (n_captions, D) float32 on the CPU; (0, D) for a folder
    caption_image: torch.Tensor  # (n_captions,) int64 row of each caption's image
    file: Path  # where it is stored
    built: bool  # True: embedded by this call; False: read back from `file`


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 = best
    row: int  # row in the index (an image or a caption)
    item: str  # the image path or the caption
    score: float  # cosine similarity to the query
    match: bool  # a known true match: the image a query caption belongs to, or a query image's own caption


def load_searcher(checkpoint, device="auto", batch_size: int = 256) -> Searcher:
    device = pick_device(device) if isinstance(device, str) else device
    folder = resolve(checkpoint)
    model, cfg, tokenizer = load_model(folder, device)
    pixels = Pixels.for_encoder(model.image_encoder.data_config, cfg.image_size, cfg.channels_last)
    dtype = inference_precision(cfg.precision, device)
    return Searcher(model, cfg, tokenizer, folder, pixels, device, dtype, batch_size)


def latest_checkpoint(runs_dir=REPO_DIR / "runs") -> Path:
    """The `best` checkpoint of the run under runs_dir that saved one most recently (the notebook's default)."""
    found = [p for p in Path(runs_dir).glob("*/best") if (p / "checkpoint.json").exists()]
    if not found:
        raise FileNotFoundError(f"no run under {runs_dir} has a best checkpoint; train one with `python train.py "
                                f"--preset shapes --run-dir runs/shapes`, or name a checkpoint")
    return max(found, key=lambda p: (p / "checkpoint.json").stat().st_mtime)


# --- the index: embed once, store beside the weights, reuse while nothing changed -------------------------------

def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj).encode()).hexdigest()


def _stamp(s: Searcher, files: list[str], extra) -> dict:
    """What an index depends on: the checkpoint's weights file, the image files, and (for a split) the captions."""
    weights = (s.folder / "model.safetensors").stat()
    return {"version": INDEX_VERSION, "checkpoint": [str(s.folder), weights.st_size, weights.st_mtime_ns],
            "files": fingerprint(files), "extra": _digest(extra)}


def _index_file(s: Searcher, key) -> Path:
    return s.folder / f"index-{_digest(key)[:12]}.safetensors"


def _read_index(file: Path, stamp: dict, source: str) -> Index | None:
    """The stored index if it was made from exactly these inputs, else None."""
    if not file.exists():
        return None
    try:
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["index"])
            if meta["stamp"] != stamp:
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        print(f"rebuilding the unreadable index {file} ({type(e).__name__}: {e})")
        return None
    try:  # the access time marks use, set by hand as mounts may not keep it; the mtime stays the time it was built
        os.utime(file, ns=(time.time_ns(), file.stat().st_mtime_ns))
    except OSError:  # a checkpoint we may only read: it stores no new index either, so none is removed by age
        pass
    return Index(source, meta["paths"], t["image_emb"], meta["captions"], t["text_emb"], t["caption_image"], file,
                 built=False)


def _write_index(index: Index, stamp: dict) -> None:
    """Write atomically (temporary file, then rename); a checkpoint folder we may not write to only costs reuse."""
    tensors = {"image_emb": index.image_emb.contiguous(), "text_emb": index.text_emb.contiguous(),
               "caption_image": index.caption_image.contiguous()}
    meta = {"stamp": stamp, "source": index.source, "paths": index.paths, "captions": index.captions}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=index.file.parent, prefix=f".{index.file.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"index": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp makes files private; the checkpoint's other files are not
        os.replace(tmp, index.file)
    except OSError as e:
        print(f"could not store the index in {index.file.parent} ({e}); it will be embedded again next time")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return
    _remove_old_indexes(index.file)


def _remove_old_indexes(newest: Path) -> None:
    """Keep the KEEP_INDEXES most recently used indexes of a checkpoint folder, newest among them; say what goes.
    Also remove what a search killed while writing an index left behind (a write takes seconds, not an hour)."""
    try:
        for tmp in newest.parent.glob(".index-*.tmp"):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        indexes = sorted(newest.parent.glob("index-*.safetensors"), reverse=True,
                         key=lambda f: (f == newest, f.stat().st_atime_ns))
        for old in indexes[KEEP_INDEXES:]:
            source = _source(old)
            old.unlink()
            print(f"note: removed the search index of {source} from {old.parent} ({old.name}): a checkpoint keeps "
                  f"the {KEEP_INDEXES} most recently used; searching it again embeds it again")
    except OSError as e:  # another search removing the same file, or a folder we may not change: nothing is lost
        print(f"could not remove older search indexes from {newest.parent} ({e})")


def _source(file: Path) -> str:
    """What a stored index holds, in words, for messages; its file name if unreadable."""
    try:
        with safe_open(str(file), "pt") as f:
            return json.loads(f.metadata()["index"])["source"]
    except (OSError, KeyError, ValueError, SafetensorError):
        return file.name


def dataset_index(s: Searcher, data_dir=None, split: str = "test", verbose: bool = True) -> Index:
    """A data split's images and captions (default: the test split of the checkpoint's own data folder)."""
    data = CaptionData(data_dir or checkpoint_data_dir(s.cfg.data_dir), verbose=verbose)
    if split not in data.splits:
        raise ValueError(f"no split {split!r} in {data.data_dir}; choose one of {sorted(data.splits)}")
    if verbose:
        warn_if_seen(s.folder, data, split)
    part = data.splits[split]
    paths = [str((data.image_dir / name).resolve()) for name in part.images]
    source = f"the {split} split of {data.data_dir}"
    stamp = _stamp(s, paths, [part.images, part.captions, part.start.tolist()])
    file = _index_file(s, ["split", str(data.data_dir.resolve()), split])
    index = _read_index(file, stamp, source)
    if index is None:
        if verbose:
            print(f"embedding {source}: {len(paths)} images, {len(part.captions)} captions -> {file}")
        data.open_images(s.pixels.square, mode="off", verify=split)  # decode only this split's files
        data.tokenize(s.tokenizer, s.cfg.max_length)
        part = data.splits[split]  # without the images that failed to decode
        paths = [str((data.image_dir / name).resolve()) for name in part.images]
        image_emb = embed_images(s.model, part, data.source, s.pixels, s.device, s.dtype, s.batch_size,
                                 progress=verbose)
        text_emb = embed_texts(s.model, part, s.tokenizer.pad_token_id, s.device, s.dtype, s.batch_size, verbose)
        index = Index(source, paths, image_emb.cpu(), part.captions, text_emb.cpu(),
                      torch.from_numpy(part.caption_image), file, built=True)
        _write_index(index, stamp)
    elif verbose:
        print(f"reusing the index of {source} ({len(paths)} images): {file}")
    return index


def list_images(folder) -> list[str]:
    """Image files in a folder and its subfolders, linked ones too (an external disk, a synced folder), hidden ones
    skipped, sorted, as absolute paths; a file reached twice through links counts once."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    files, seen = set(), set()
    for top, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or a second link to a folder already walked
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files |= {Path(top, n).resolve() for n in names if not n.startswith(".")
                  and Path(n).suffix.lower() in IMAGE_EXTS and Path(top, n).is_file()}
    files = sorted(files)
    if not files:
        raise ValueError(f"{root} holds no image files (looked for {', '.join(sorted(IMAGE_EXTS))}, subfolders too)")
    return [str(p) for p in files]


def folder_index(s: Searcher, folder, verbose: bool = True) -> Index:
    """Any folder of images (no captions): for text -> image search over your own pictures."""
    listed = list_images(folder)
    source = f"{len(listed)} images in {folder}"
    stamp = _stamp(s, listed, [])
    file = _index_file(s, ["folder", str(Path(folder).resolve())])
    index = _read_index(file, stamp, source)
    if index is None:
        if verbose:
            print(f"embedding {source} -> {file}")
        image_emb, paths = embed_files(s, listed, verbose)
        dim = image_emb.shape[1]
        index = Index(source, paths, image_emb, [], torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64), file,
                      built=True)
        _write_index(index, stamp)
    elif verbose:
        print(f"reusing the index of {source}: {file}")
        kept = set(index.paths)
        if skipped := [p for p in listed if p not in kept]:  # said when it was built; still true
            print(f"skipping {len(skipped)} files that are not readable images (found when it was built), e.g. "
                  + "; ".join(skipped[:5]))
    index.source = f"{len(index.paths)} images in {folder}"  # the readable ones
    return index


@torch.no_grad()
def embed_files(s: Searcher, paths: list[str], progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """((n, D) embeddings, their n files) for the files that decode as images; the others are named and skipped."""
    out, kept, failed = [], [], []
    bar = tqdm(total=len(paths), desc="embedding images", unit="img", disable=not progress)
    for lo in range(0, len(paths), s.batch_size):
        squares = []
        for i in range(lo, min(lo + s.batch_size, len(paths))):
            try:
                squares.append(to_square(paths[i], s.pixels.square))  # (S, S, 3) uint8, as for the data set
                kept.append(paths[i])
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not a readable image
                failed.append(f"{paths[i]} ({type(e).__name__}: {e})")
        if squares:
            batch = torch.from_numpy(np.stack(squares))  # (B, S, S, 3)
            with autocast(s.device, s.dtype):
                out.append(s.model.encode_image(s.pixels(batch, full_boxes(len(batch), s.pixels.square),
                                                         s.device)).float().cpu())
        bar.update(min(s.batch_size, len(paths) - lo))
    bar.close()
    if failed:
        print(f"skipping {len(failed)} files that are not readable images: " + "; ".join(failed[:5]))
    if not out:
        raise ValueError(f"none of the {len(paths)} image files could be read, e.g. {failed[0]}")
    return torch.cat(out), kept


# --- queries and ranking ----------------------------------------------------------------------------------------

@torch.no_grad()
def embed_text(s: Searcher, text: str) -> torch.Tensor:
    """(D,) unit embedding of a free-text query, tokenised as training tokenised captions."""
    enc = s.tokenizer([text], truncation=True, max_length=s.cfg.max_length, return_tensors="pt")
    with autocast(s.device, s.dtype):
        return s.model.encode_text(enc["input_ids"].to(s.device), enc["attention_mask"].to(s.device)).float()[0].cpu()


@torch.no_grad()
def embed_image(s: Searcher, path) -> torch.Tensor:
    """(D,) unit embedding of one image file, whole, made exactly as the indexed images are."""
    with autocast(s.device, s.dtype):
        return s.model.encode_image(s.pixels.from_files([path], s.device)).float()[0].cpu()


def top_k(query: torch.Tensor, emb: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(row, cosine score) of the k rows of emb (N, D) most similar to query (D,), best first."""
    if not 1 <= k <= len(emb):
        raise ValueError(f"--k {k} must be between 1 and the {len(emb)} items searched")
    top = (emb @ query).topk(k)  # (N,) scores -> k best
    return list(zip(top.indices.tolist(), top.values.tolist()))


def unknown_words(s: Searcher, text: str) -> None:
    """Refuse a query with no words at all (spaces, invisible characters), which would rank as a blank one; warn
    about the words the tokenizer reads as [UNK] (an emoji, a script its vocabulary lacks): the model sees a
    placeholder there, and a query of nothing else embeds like a blank one."""
    unk = s.tokenizer.unk_token_id
    enc = s.tokenizer(text, truncation=True, max_length=s.cfg.max_length, return_offsets_mapping=s.tokenizer.is_fast)
    words = [i for i in enc["input_ids"] if i not in s.tokenizer.all_special_ids or i == unk]
    if not words:
        raise ValueError(f"the query {text!r} holds no words the tokenizer reads (only spaces or invisible "
                         f"characters); type what to search for")
    spans = [span for i, span in zip(enc["input_ids"], enc.get("offset_mapping", [])) if i == unk]
    unknown = list(dict.fromkeys(text[a:b] for a, b in spans if b > a))
    if words and all(i == unk for i in words):
        print(f"warning: the model's vocabulary knows none of the words in {text!r}, so these results say little")
    elif unknown:
        print(f"warning: the model's vocabulary lacks {', '.join(map(repr, unknown))}: "
              f"{'it reads' if len(unknown) == 1 else 'they read'} as [UNK], which says nothing of "
              f"{'it' if len(unknown) == 1 else 'them'}")


def cut_off(s: Searcher, text: str) -> None:
    """Warn when a query is longer than the model reads: it is cut at max_length tokens, as captions were in training,
    so the words past that point change nothing."""
    if len(s.tokenizer(text)["input_ids"]) <= s.cfg.max_length:
        return
    rest = "the rest"
    if s.tokenizer.is_fast:
        enc = s.tokenizer(text, truncation=True, max_length=s.cfg.max_length, return_offsets_mapping=True)
        rest = repr(text[max(b for _, b in enc["offset_mapping"]):].strip())
    print(f"warning: the model reads the first {s.cfg.max_length} tokens of a query (its max_length), so it ignores "
          f"{rest}")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def search_text(s: Searcher, index: Index, text: str, k: int | None = None) -> list[Hit]:
    """The k images (default TEXT_K, or all if fewer) that best match a text; an image is a true match when the text
    is one of its captions. Warns about words the model's vocabulary lacks, and those past the length it reads."""
    unknown_words(s, text)
    cut_off(s, text)
    own = {int(index.caption_image[c]) for c, caption in enumerate(index.captions) if _normal(caption) == _normal(text)}
    k = k or min(TEXT_K, len(index.image_emb))
    return [Hit(rank, row, index.paths[row], score, row in own)
            for rank, (row, score) in enumerate(top_k(embed_text(s, text), index.image_emb, k), start=1)]


def search_image(s: Searcher, index: Index, image, k: int | None = None) -> list[Hit]:
    """The k captions (default IMAGE_K, or all if fewer) that best describe an image; a true match is one of the
    image's own captions (when the image is one of the index's)."""
    if not index.captions:
        raise ValueError(f"image -> text search ranks captions, and {index.source} has none; search a data split")
    k = k or min(IMAGE_K, len(index.text_emb))
    real = os.path.realpath(image)
    own = index.paths.index(real) if real in index.paths else -1
    return [Hit(rank, row, index.captions[row], score, int(index.caption_image[row]) == own)
            for rank, (row, score) in enumerate(top_k(embed_image(s, image), index.text_emb, k), start=1)]


def _spread(n: int, count: int, phase: float) -> list[int]:
    """count rows spread evenly over n (phase in [0, 1) shifts them), so examples do not cluster."""
    return [int((i + phase) * n / count) for i in range(count)]


def example_queries(index: Index, count: int = EXAMPLES) -> list[str]:
    """Captions of images spread over the split, one caption style each (1st, 3rd, 5th, ...): deterministic, so the
    pictures in results/ can be made again."""
    queries = []
    for q, row in enumerate(_spread(len(index.paths), count, 0.25)):
        own = (index.caption_image == row).nonzero().flatten().tolist()
        queries.append(index.captions[own[2 * q % len(own)]])
    return queries


def example_images(index: Index, count: int = EXAMPLES) -> list[str]:
    """Images spread over the split, other than example_queries' ones."""
    return [index.paths[row] for row in _spread(len(index.paths), count, 0.75)]


def make_results(s: Searcher, index: Index, out_dir) -> list[Path]:
    """The README's pictures: text2image_{1,2,3}.jpg, image2text_{1,2,3}.jpg and the run's curves.png."""
    out = Path(out_dir)
    written = [save_figure(text_to_image_figure(q, search_text(s, index, q)), out / f"text2image_{i}.jpg")
               for i, q in enumerate(example_queries(index), start=1)]
    written += [save_figure(image_to_text_figure(im, search_image(s, index, im)), out / f"image2text_{i}.jpg")
                for i, im in enumerate(example_images(index), start=1)]
    run = run_dir_of(s.folder)
    if run is not None and (run / "metrics.jsonl").exists():
        written.append(save_figure(curves_figure(read_metrics(run)), out / "curves.png"))
    else:
        print(f"no curves.png: {s.folder} is not inside a run folder with a metrics.jsonl")
    return written


# --- the command ------------------------------------------------------------------------------------------------

def show(path: str) -> str:
    """A path as short as it can be said: relative to the working directory when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def print_hits(title: str, hits: list[Hit]) -> None:
    print(title)
    for h in hits:
        item = show(h.item) if os.path.isabs(h.item) else h.item
        print(f"{h.rank:4}. {h.score:6.3f}  {'*' if h.match else ' '} {item}")
    if any(h.match for h in hits):
        print("(* a true match)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (RUN/best, RUN/last) or a run folder")
    p.add_argument("--data-dir", type=path_arg,
                   help="data folder whose --split is searched (default: the checkpoint's own)")
    p.add_argument("--split", choices=["train", "val", "test"], help="the split searched (default test)")
    p.add_argument("--images", type=path_arg, metavar="FOLDER",
                   help="search this folder of your own images instead (with --text)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="rank the images by how well they match this text")
    query.add_argument("--image", type=path_arg, metavar="FILE", help="rank the data split's captions for this image")
    query.add_argument("--make-results", type=path_arg, metavar="DIR", help="write the README's pictures into DIR: "
                       "text2image_{1,2,3}.jpg, image2text_{1,2,3}.jpg and the run's curves.png")
    p.add_argument("--k", type=int, help=f"how many results (default {TEXT_K} images for --text, {IMAGE_K} captions "
                   f"for --image)")
    p.add_argument("--out", type=path_arg, help="also draw the results into this picture (.jpg, .jpeg or .png)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), or a device: cpu, cuda:1")
    p.add_argument("--batch-size", type=int, default=256, help="images or captions embedded at a time")
    args = p.parse_args(argv)
    if args.text is not None and not args.text.strip():
        p.error("--text is empty; give the words to search for")
    if args.text is not None and not_utf8(args.text):  # bytes that argv could not decode
        p.error(f"--text {os.fsencode(args.text)!r} is not UTF-8 text (a terminal set to another encoding?); type it "
                f"in a UTF-8 terminal, or pass the words in a Python string to search.py's main()")
    if args.image and Path(args.image).is_dir():
        p.error(f"--image {args.image} is a folder; name one image file, or search the folder's images with "
                f"--images {quote(args.image)} --text ...")
    if args.image and not Path(args.image).is_file():
        p.error(f"--image {args.image}: no such file")
    if args.images and not Path(args.images).is_dir():
        p.error(f"--images {args.images} is not a folder")
    if args.images and (args.data_dir or args.split):
        p.error("--images FOLDER searches that folder; --data-dir and --split choose a data split instead: drop them")
    if args.image and args.images:
        p.error("--image ranks a data split's captions and --images FOLDER has none; search a folder with --text")
    if args.image and (why := check_image(args.image)):
        p.error(f"--image {args.image} is not an image this can read: {why}")
    if args.make_results and (args.images or args.k or args.out):
        p.error("--make-results draws fixed examples from a data split into fixed file names; drop --images, --k "
                "and --out")
    if args.k is not None and args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    if args.out and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; name the picture to write, e.g. {Path(args.out) / 'search.jpg'}")
    if args.out and Path(args.out).suffix.lower() not in {".jpg", ".jpeg", ".png"}:
        p.error(f"--out {args.out}: name a .jpg, .jpeg or .png file")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return p, args


def main(argv=None):
    """Returns the ranked hits (or, with --make-results, the files written)."""
    p, args = parse_args(argv)
    try:
        s = load_searcher(args.checkpoint, args.device, args.batch_size)
        index = folder_index(s, args.images) if args.images else dataset_index(s, args.data_dir, args.split or "test")
        if args.make_results:
            try:
                written = make_results(s, index, args.make_results)
            except OSError as e:
                p.error(f"--make-results {args.make_results}: could not write the pictures ({e})")
            print("wrote " + ", ".join(show(str(f)) for f in written))
            return written
        if args.text is not None:
            hits = search_text(s, index, args.text, args.k)
            print_hits(f"text -> image: {args.text!r} over {index.source}", hits)
            figure = text_to_image_figure(args.text, hits) if args.out else None
        else:
            hits = search_image(s, index, args.image, args.k)
            print_hits(f"image -> text: {args.image} against the captions of {index.source}", hits)
            figure = image_to_text_figure(args.image, hits) if args.out else None
    except (FileNotFoundError, ValueError) as e:
        if args.data_dir and Path(args.data_dir).is_dir() and not is_data_folder(args.data_dir) \
                and image_files_in(args.data_dir):  # pictures with no caption file
            p.error(f"{e}\n(to search a folder of pictures without captions: --images {quote(args.data_dir)} "
                    f"--text ...)")
        p.error(str(e))
    if figure is not None:
        try:
            print(f"wrote {save_figure(figure, args.out)}")
        except OSError as e:  # the ranked list above still stands; only the picture is missing
            p.error(f"--out {args.out}: could not write the picture ({e})")
    return hits


if __name__ == "__main__":
    main()
