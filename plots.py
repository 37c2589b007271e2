"""Every picture the repo draws: training curves, text -> image grids, image -> text panels.

Figures are built with matplotlib's object API (`Figure`, never pyplot), so nothing depends on a display or a global
backend: training writes them headless, and a notebook shows the returned Figure like any other (`%matplotlib inline`
registers the PNG display for Figures).
"""

import json
import math
import os
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from clip import MAX_LOGIT_SCALE
from images import load_rgb
from utils import atomic_write

MATCH = "#1a9641"  # green: a known true match (the query's own image or caption)
OTHER = "#bbbbbb"
THUMBNAIL = 320  # pixels: the longest side an image is drawn at; keeps figures small whatever the photo's size
DPI = 100
JPEG_QUALITY = 85  # keeps a 3 x 3 grid well under 300 KB
LINE_INCHES = 0.21  # height of one caption line at 11 pt (1.2 line spacing is 0.18 in), with a little air
GAP = 0.6  # blank space between two captions, in lines
CELL = 2.8  # inches: the square each image of a text -> image grid is fitted into
NAME_CHARACTERS = 48  # a file name under a grid image wraps at this many characters, about a cell's width at 7 pt
MARGIN, AIR = 0.1, 0.15  # inches: around a grid, and between its texts and pictures


def read_metrics(run_dir) -> list[dict]:
    """The epochs logged so far in RUN/metrics.jsonl; skips a line being written (partial JSON) or garbled."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def save_figure(fig: Figure, path) -> Path:
    """Write a figure as JPEG or PNG (by extension), atomically, so a reader never sees half a file."""
    path = Path(path)
    kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: pictures are written as .jpg, .jpeg or .png, not {path.suffix or 'no extension'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=kind, dpi=DPI, bbox_inches="tight",
                    pil_kwargs={"quality": JPEG_QUALITY} if kind == "jpeg" else None)
    return path


# --- training curves --------------------------------------------------------------------------------------------

def curves_figure(rows: list[dict]) -> Figure:
    """Three panels per epoch: train and val loss, val recall in both directions, the logit scale (1 / temperature)."""
    fig = Figure(figsize=(14, 4))
    loss, recall, scale = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in rows]

    def line(ax, key, label, **style):
        points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, label=label, **style)

    line(loss, "train_loss", "train")
    line(loss, "val_loss", "val")
    loss.set(title="contrastive loss", xlabel="epoch", ylabel="loss")
    for direction, name, colour in [("i2t", "image→text", "tab:blue"), ("t2i", "text→image", "tab:orange")]:
        for k, dash in [(1, ":"), (5, "--"), (10, "-")]:
            line(recall, f"val_{direction}_R@{k}", f"{name} R@{k}", color=colour, linestyle=dash)
    recall.set(title="validation recall", xlabel="epoch", ylabel="recall (%)", ylim=(0, 101))
    line(scale, "logit_scale", "exp(logit scale)", color="tab:green")
    scale.set(title=f"temperature (logit scale, at most {math.exp(MAX_LOGIT_SCALE):.0f})", xlabel="epoch",
              ylabel="logit scale = 1 / temperature")
    for ax in (loss, recall, scale):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(set(epochs)) == 1:  # one point: matplotlib would spread ticks of fractional epochs around it
            ax.set_xticks(epochs[:1])
    fig.tight_layout()
    return fig


def plot_curves(run_dir) -> Path | None:
    """Redraw RUN/curves.png from RUN/metrics.jsonl; called by training after every epoch.

    A picture is not worth a training run: any failure (no metrics yet, a full disk, a matplotlib problem) is reported
    and swallowed, and the run goes on.
    """
    try:
        rows = read_metrics(run_dir)
        if not rows:
            return None
        return save_figure(curves_figure(rows), Path(run_dir) / "curves.png")
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"warning: could not draw {Path(run_dir) / 'curves.png'}: {type(e).__name__}: {e}")
        return None


# --- retrieval pictures -----------------------------------------------------------------------------------------

LITERAL = {"parse_math": False}  # queries, captions and file names are shown as typed: "$5" is not TeX


def printable(name: str) -> str:
    """A file name as it can be drawn. A name that is not UTF-8 on disk reaches Python with its stray bytes as
    surrogates (U+DC80..U+DCFF), which matplotlib refuses to draw; they become U+FFFD (�), as a terminal shows them."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def thumbnail(path):
    img = load_rgb(path)
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return img


def _frame(ax, colour: str, width: float) -> None:
    """A coloured border around an image axis (axis('off') would hide it)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _lines_inches(count: int, points: float) -> float:
    """Height of `count` lines of text at `points` pt (matplotlib's line spacing is 1.2)."""
    return count * points * 1.2 / 72


def text_to_image_figure(query: str, hits, columns: int = 3) -> Figure:
    """The top images for a text query in a grid: the query as the title, rank and cosine score over each image,
    its file name under it, true matches framed in green.

    Laid out by hand, in inches, rather than by tight_layout: that packs rows by their cells, but an image's axes then
    shrinks to the picture's shape inside its cell, so a file name and the next row's title met. Here every cell is a
    square with room above for the title and below for the name, and shrinking only adds air."""
    rows = math.ceil(len(hits) / columns)
    names = [textwrap.wrap(printable(Path(hit.item).name), NAME_CHARACTERS) or [""] for hit in hits]
    sup = textwrap.fill(f"“{query}”", 60)
    title = _lines_inches(1, 10) + 6 / 72 + AIR  # matplotlib's title pad is 6 pt
    label = _lines_inches(max(map(len, names), default=1), 7) + 4 / 72 + AIR  # and the label pad 4 pt
    top = MARGIN + _lines_inches(sup.count("\n") + 1, 13) + AIR
    width = columns * CELL + (columns - 1) * AIR + 2 * MARGIN
    height = top + rows * (title + CELL + label) + MARGIN
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=MARGIN / width, right=1 - MARGIN / width, top=1 - (top + title) / height,
        bottom=(MARGIN + label) / height, wspace=AIR / CELL, hspace=(label + title) / CELL)).ravel()
    for ax, hit, name in zip(axes, hits, names):
        ax.imshow(thumbnail(hit.item))
        _frame(ax, MATCH if hit.match else OTHER, 6 if hit.match else 1)
        ax.set_title(f"{hit.rank}. score {hit.score:.3f}" + ("  ✓ true match" if hit.match else ""), fontsize=10,
                     color=MATCH if hit.match else "black", fontweight="bold" if hit.match else "normal")
        ax.set_xlabel("\n".join(name), fontsize=7, color="dimgrey", **LITERAL)
    for ax in axes[len(hits):]:
        ax.set_axis_off()
    fig.suptitle(sup, y=1 - MARGIN / height, va="top", fontsize=13, **LITERAL)
    return fig


def image_to_text_figure(image, hits) -> Figure:
    """A query image beside its top captions, wrapped, with rank and cosine score; its own captions in green."""
    wrapped = [textwrap.wrap(hit.item, 52) or [""] for hit in hits]
    height = sum(len(lines) + GAP for lines in wrapped) + 1.5  # in caption lines, the footer included
    fig = Figure(figsize=(11, max(3.5, LINE_INCHES * height + 0.7)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.7]})
    left.imshow(thumbnail(image))
    _frame(left, OTHER, 1)
    left.set_title(textwrap.fill(f"query: {printable(Path(image).name)}", 40), fontsize=11, **LITERAL)
    right.set_axis_off()
    right.set(xlim=(0, 1), ylim=(height, 0))  # y counts caption lines from the top
    y = 0.0
    for hit, lines in zip(hits, wrapped):
        text = f"{hit.rank}. {'✓ ' if hit.match else '   '}{lines[0]}" + "".join(f"\n       {x}" for x in lines[1:])
        right.text(0, y, text, va="top", fontsize=11, color=MATCH if hit.match else "black",
                   fontweight="bold" if hit.match else "normal", **LITERAL)
        right.text(1, y, f"{hit.score:.3f}", va="top", ha="right", fontsize=10, color="dimgrey")
        y += len(lines) + GAP
    if any(hit.match for hit in hits):
        right.text(0, height, "✓ green: one of the image's own captions", fontsize=9, color=MATCH, va="bottom")
    right.set_title(f"top {len(hits)} captions (cosine score)", fontsize=11)
    fig.tight_layout()
    return fig
