"""Get a data set into the Flickr30k on-disk layout (`images/` + `results.csv`).

    python download.py --dataset shapes --out data/shapes          # the built-in set, drawn here in seconds
    python download.py                                             # Flickr30k from Kaggle -> data/flickr30k
"""

import argparse
import sys

from tqdm import tqdm

from shapes import make_shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="flickr30k", choices=["flickr30k", "shapes"])
    p.add_argument("--out", help="target folder (default: data/<dataset>)")
    p.add_argument("--num-images", type=int, default=6000, help="shapes: how many pictures")
    p.add_argument("--image-size", default="128x128", help="shapes: WIDTHxHEIGHT of each picture (Flickr: 500x375)")
    p.add_argument("--seed", type=int, default=0, help="shapes: the drawing seed")
    args = p.parse_args(argv)
    out = args.out or f"data/{args.dataset}"
    if args.dataset == "shapes":
        try:
            width, height = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            p.error(f"--image-size must look like 128x128, got {args.image_size!r}")
        if args.num_images < 20:
            p.error(f"--num-images must be at least 20 (a train, val and test split), got {args.num_images}")
        make_shapes(out, args.num_images, width, height, args.seed,
                    progress=lambda it: tqdm(it, desc="drawing shapes", unit="img"))
        print(f"wrote {args.num_images} images and {5 * args.num_images} captions to {out}")
        return 0
    p.error("the Flickr30k download is not wired up yet")


if __name__ == "__main__":
    sys.exit(main())
