"""Get a data set into the on-disk format captions.py and dataset.py read, verified, with a report of what was wrong
with it.

    python download.py                                             # Flickr30k from Kaggle -> data/flickr30k
    python download.py --dataset flickr8k                          # Flickr8k from Kaggle -> data/flickr8k
    python download.py --zip ~/Downloads/archive.zip --out data/flickr30k   # a zip you downloaded by hand
    python download.py --prepare data/mine                         # (re)verify a folder you made yourself
    python download.py --split-file dataset_flickr30k.json         # Karpathy's split (29,000 / 1,014 / 1,000)
    python download.py --dataset shapes --out data/shapes          # the built-in set, drawn here in seconds

Running it again is cheap: a prepared, unchanged folder is recognised at once; an interrupted download or
extraction is continued or redone. Kaggle credentials are looked for only when something must be downloaded (see
kaggle_auth.py for where). Everything found goes into DIR/prepare_report.json (see prepare.py).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from shlex import quote

from tqdm import tqdm

from kaggle_auth import CredentialsError, kaggle_api, resolve_credentials
from prepare import DATASETS, PrepareError, fetch, prepare, read_split_file
from shapes import make_shapes
from utils import path_arg, too_many_workers, write_json


SHAPES_RECIPE = "shapes.json"  # how a shapes folder was drawn: the same request again has nothing to do
# what a shapes folder holds once drawn, prepared and trained on
SHAPES_FOLDER = {"images", "results.csv", SHAPES_RECIPE, "prepare_report.json", "splits.json", "tokenizer", ".cache"}


def make_shapes_set(p: argparse.ArgumentParser, args, out: str) -> None:
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size must look like 128x128, got {args.image_size!r}")
    if min(width, height) < 16 or max(width, height) > 4096:
        p.error(f"--image-size {args.image_size}: the shapes are drawn at 16 to 4096 pixels a side (Flickr's photos "
                f"are 500x375)")
    if args.num_images < 20:
        p.error(f"--num-images must be at least 20 (a train, val and test split), got {args.num_images}")
    out = Path(out)
    recipe = {"num_images": args.num_images, "image_size": f"{width}x{height}", "seed": args.seed}
    if (out / "results.csv").exists() and (out / SHAPES_RECIPE).exists():
        drawn = json.loads((out / SHAPES_RECIPE).read_text())
        if drawn == recipe:
            print(f"{out} already holds this set ({args.num_images} images of {width}x{height}, seed {args.seed})")
            return
        print(f"note: {out} holds another shapes set ({drawn}); drawing this one ({recipe}) in its place")
    if out.exists():
        strangers = sorted(f.name for f in out.iterdir() if f.name not in SHAPES_FOLDER)
        if strangers:
            p.error(f"{out} holds files a shapes set does not make ({strangers[:3]}); choose another --out")
        # a Flickr folder holds only names a shapes folder may hold too: only a recipe says the set is ours to redraw
        if not (out / SHAPES_RECIPE).exists() and ((out / "images").exists() or (out / "results.csv").exists()):
            p.error(f"{out} already holds images/ or results.csv, but no {SHAPES_RECIPE}, so not a shapes set drawn "
                    f"here (or one drawn before 2026-11-26, when that file came in); choose another --out, or delete "
                    f"{out} yourself if you no longer need it")
        shutil.rmtree(out / "images", ignore_errors=True)  # another set drawn before: start clean
        (out / "results.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # first: a draw cut short leaves a folder marked as ours (results.csv, written last, is missing), so it is redrawn
    write_json(out / SHAPES_RECIPE, recipe)
    make_shapes(out, args.num_images, width, height, args.seed, workers=os.cpu_count() or 1,
                progress=lambda it, total: tqdm(it, total=total, desc="drawing shapes", unit="img"))
    print(f"wrote {args.num_images} images and {5 * args.num_images} captions to {out}")


def main(argv=None, connect=kaggle_api) -> int:
    """connect(credentials) -> an authenticated Kaggle API object (tests pass a fake that "downloads" a local zip)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset", choices=[*DATASETS, "shapes"],
                   help="what to get (default flickr30k; with --prepare, the data set whose image and caption "
                        "counts the folder is checked against: a plain --prepare checks none)")
    p.add_argument("--out", type=path_arg, help="target folder (default: data/<dataset>)")
    p.add_argument("--zip", type=path_arg,
                   help="prepare from this zip, downloaded by hand from the Kaggle page (kept)")
    p.add_argument("--prepare", type=path_arg, metavar="DIR",
                   help="only verify DIR (a folder in our format) and rewrite its report")
    p.add_argument("--split-file", type=path_arg,
                   help="Karpathy's dataset_flickr30k.json, or flickr30k_train_karpathy.txt (with its val/test lists "
                        "beside it), or a splits.json; default: 5%% (at most 1,000) of the images each for val and "
                        "test, chosen by a hash of each file name (see README)")
    p.add_argument("--kaggle-json", type=path_arg,
                   help="Kaggle credentials file (else: see kaggle_auth.py for where we look)")
    p.add_argument("--keep-zip", action="store_true", help="keep the downloaded zip after extracting it")
    p.add_argument("--workers", type=int, default=0, help="processes that verify images (default: one per CPU)")
    p.add_argument("--num-images", type=int, help="shapes: how many pictures (default 6000)")
    p.add_argument("--image-size", help="shapes: WIDTHxHEIGHT of each picture (default 128x128; Flickr: 500x375)")
    p.add_argument("--seed", type=int, help="shapes: the drawing seed (default 0)")
    args = p.parse_args(argv)
    shapes = args.dataset == "shapes" and not args.prepare
    for name in (["zip", "split_file", "kaggle_json", "keep_zip"] if shapes else ["num_images", "image_size", "seed"]):
        if getattr(args, name) not in (None, False):  # said, not ignored: --num-images never shrinks a download
            p.error(f"--{name.replace('_', '-')} does not apply to " + ("the built-in set, which is drawn here"
                    if shapes else f"{'--prepare' if args.prepare else 'a Kaggle data set'}: it is for "
                    f"--dataset shapes"))
    args.num_images = 6000 if args.num_images is None else args.num_images
    args.image_size, args.seed = args.image_size or "128x128", args.seed or 0
    if args.workers < 0:
        p.error(f"--workers must not be negative, got {args.workers}")
    if why := too_many_workers(args.workers, "--workers"):
        p.error(why)
    if args.prepare and (args.zip or args.out):
        p.error("--prepare DIR works on DIR as it is; it takes no --zip or --out")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder" + ("; a zip downloaded by hand goes with --zip"
                                                               if args.out.lower().endswith(".zip") else ""))
    if args.dataset == "shapes" and not args.prepare:
        make_shapes_set(p, args, args.out or "data/shapes")
        return 0
    spec = DATASETS.get(args.dataset)  # None for shapes and for --prepare without --dataset: no expected counts

    def connect_with_credentials():
        try:
            creds = resolve_credentials(args.kaggle_json)
            print(creds.describe())
            return connect(creds)
        except CredentialsError as e:  # without a key, or offline, a zip downloaded by hand still works
            raise CredentialsError(f"{e}\nOr download the zip by hand from {spec.url} and run `python download.py "
                                   f"--dataset {spec.name} --zip PATH --out {quote(str(out))}`") from None

    try:
        # read first: a split file that cannot be used must stop the run before a download of 4 GB, not after it
        splits = read_split_file(args.split_file) if args.split_file else None
        if args.prepare:
            prepare(args.prepare, spec, args.split_file, args.workers, reverify=True, splits=splits)
            return 0
        spec = spec or DATASETS["flickr30k"]
        out = Path(args.out or f"data/{spec.name}")
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
        try:
            fetch(spec, out, args.zip, connect_with_credentials, args.keep_zip)
            prepare(out, spec, args.split_file, args.workers, splits=splits)
        finally:
            for folder in made:  # a run that failed before writing anything leaves no empty folder behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    except (CredentialsError, PrepareError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
