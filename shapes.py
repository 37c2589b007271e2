"""The built-in data set: seeded pictures of coloured shapes with five differently worded captions each.

Written in exactly the on-disk format of Kaggle's Flickr30k (`images/` plus a `|`-separated `results.csv` with five
captions per image), so every later line of code is the same for this set and for Flickr30k. Each picture holds one to
three objects (shape, colour, size, position on a 3x3 grid) on a coloured background; no two pictures share a
description. Captions mix full descriptions, synonyms, other word orders and partial descriptions, like real ones.
"""

import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# name -> words a captioner might use for it
SHAPES = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "three-sided shape", "wedge"],
    "star": ["star", "five-pointed star", "star shape"],
    "diamond": ["diamond", "rhombus", "diamond shape"],
    "cross": ["cross", "plus sign", "plus shape"],
}
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 205, 40),
    "purple": (140, 60, 185), "orange": (245, 135, 30), "pink": (240, 120, 190), "brown": (125, 80, 40),
}
BACKGROUNDS = {"white": (246, 246, 246), "black": (18, 18, 18), "grey": (128, 128, 128), "beige": (225, 210, 170)}
SIZES = {"small": (0.085, ["small", "little", "tiny"]), "large": (0.15, ["large", "big", "huge"])}
# 3x3 grid cells (column, row) -> ways to say where an object is
POSITIONS = {
    (0, 0): ["in the top left", "in the upper left corner"], (1, 0): ["at the top", "in the top middle"],
    (2, 0): ["in the top right", "in the upper right corner"], (0, 1): ["on the left", "at the left side"],
    (1, 1): ["in the center", "in the middle"], (2, 1): ["on the right", "at the right side"],
    (0, 2): ["in the bottom left", "in the lower left corner"], (1, 2): ["at the bottom", "in the bottom middle"],
    (2, 2): ["in the bottom right", "in the lower right corner"],
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: random.Random) -> tuple[str, tuple[Thing, ...]]:
    n = rng.choices([1, 2, 3], weights=[0.3, 0.4, 0.3])[0]
    cells = rng.sample(sorted(POSITIONS), n)
    things = tuple(Thing(rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), c)
                   for c in cells)
    return rng.choice(list(BACKGROUNDS)), things


def scene_key(background: str, things) -> tuple:
    return background, tuple(sorted((t.shape, t.colour, t.size, t.cell) for t in things))


def describe(t: Thing, rng: random.Random, size=True, where=True, synonyms=False) -> str:
    shape = rng.choice(SHAPES[t.shape]) if synonyms else t.shape
    size_word = rng.choice(SIZES[t.size][1]) if synonyms else t.size
    words = ([size_word] if size else []) + [t.colour, shape]
    phrase = f"{article(words[0])} {' '.join(words)}"
    if where:
        phrase += " " + (rng.choice(POSITIONS[t.cell]) if synonyms else POSITIONS[t.cell][0])
    return phrase


def join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(background: str, things, rng: random.Random) -> list[str]:
    """Five captions: full, full reworded, no positions, one object only, colours and background."""
    ordered = list(things)
    shuffled = rng.sample(ordered, len(ordered))
    biggest = max(things, key=lambda t: (t.size == "large", -ordered.index(t)))
    count = COUNT_WORDS[len(things)]
    return [
        f"{join([describe(t, rng) for t in ordered])} on a {background} background",
        f"on a {background} background there is {join([describe(t, rng, synonyms=True) for t in shuffled])}",
        f"{count} shape{'s' if len(things) > 1 else ''}: {join([describe(t, rng, where=False) for t in shuffled])}",
        f"a picture with {describe(biggest, rng, synonyms=True)}",
        f"{article(background)} {background} image showing "
        f"{join([describe(t, rng, size=False, where=False, synonyms=True) for t in ordered])}",
    ]


def polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "star":
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                for i in range(10) for a, rr in [(-math.pi / 2 + i * math.pi / 5, r if i % 2 == 0 else 0.45 * r)]]
    if kind == "cross":
        w = 0.35 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w),
               (-w, r)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(kind)


def draw(background: str, things, width: int, height: int, rng: random.Random, supersample: int = 2) -> Image.Image:
    W, H = width * supersample, height * supersample
    img = Image.new("RGB", (W, H), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    for t in things:
        r = SIZES[t.size][0] * min(W, H)
        cx = (t.cell[0] + 0.5 + rng.uniform(-0.12, 0.12)) * W / 3
        cy = (t.cell[1] + 0.5 + rng.uniform(-0.12, 0.12)) * H / 3
        colour = COLOURS[t.colour]
        if t.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif t.shape == "square":
            s = 0.85 * r
            d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
        else:
            d.polygon(polygon(t.shape, cx, cy, r), fill=colour)
    return img.resize((width, height), Image.Resampling.LANCZOS) if supersample > 1 else img


def _draw_one(job) -> None:
    path, background, things, width, height, seed, quality = job
    draw(background, things, width, height, random.Random(seed)).save(path, quality=quality)


def make_shapes(out_dir, num_images: int = 6000, width: int = 128, height: int = 128, seed: int = 0,
                quality: int = 90, workers: int = 0, progress=None) -> Path:
    """Draw the set into `out_dir` (images/ + results.csv), in `workers` processes. Deterministic for a given seed
    and size: scenes and captions come from one seeded stream, each picture's jitter from its own seed."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen = set()
    rows = ["image_name| comment_number| comment"]
    jobs = []
    for i in range(num_images):
        for _ in range(1000):
            background, things = sample_scene(rng)
            key = scene_key(background, things)
            if key not in seen:
                break
        else:
            raise RuntimeError(f"could not find {num_images} distinct scenes; ask for fewer images")
        seen.add(key)
        name = f"{1000000 + i}.jpg"
        jobs.append((out / "images" / name, background, things, width, height, seed * 1_000_003 + i, quality))
        rows += [f"{name}| {j}| {c}" for j, c in enumerate(captions(background, things, rng))]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    done = pool.map(_draw_one, jobs, chunksize=64) if pool else map(_draw_one, jobs)
    for _ in (progress(done, total=len(jobs)) if progress else done):
        pass
    if pool:
        pool.shutdown()
    (out / "results.csv").write_text("\n".join(rows) + "\n")  # last: its presence means the set is complete
    return out
