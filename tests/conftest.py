"""Shared fixtures: an offline environment, a small built-in data set, and flags for a tiny model."""

import os

# Before anything imports timm or transformers: never reach for the Hub (it would retry for half a minute), never
# ask PyPI whether albumentations is current.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config import Config  # noqa: E402
from shapes import make_shapes  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A model small enough to train in seconds on a 2-core CPU, large enough to learn the shapes set.
TINY = ["--preset", "shapes", "--image-model", "resnet10t", "--image-size", "32", "--text-width", "64",
        "--text-heads", "2", "--projection-dim", "64", "--batch-size", "32", "--eval-batch-size", "128"]


def tiny_config(**overrides) -> Config:
    """A toy model's config for tests that build models directly: random init, 32 px, a 2-layer text tower."""
    return Config(**{**dict(image_model="resnet10t", image_pretrained=False, image_size=32, text_model="distilbert",
                            text_pretrained=False, text_layers=2, text_width=64, text_heads=2, tokenizer="local",
                            max_length=16, projection_dim=32), **overrides})


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """800 shapes pictures at 64 px: 720 train / 40 val / 40 test images."""
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes", num_images=800, width=64, height=64)


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory):
    """200 pictures: enough for a split and a few steps."""
    return make_shapes(tmp_path_factory.mktemp("data") / "tiny", num_images=200, width=48, height=48)


@pytest.fixture(scope="session")
def tiny_run(shapes_dir, tmp_path_factory):
    """A tiny model trained for 6 epochs on shapes_dir (about 20 s): (run directory, returned metrics)."""
    import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    metrics = train.main(TINY + ["--data-dir", str(shapes_dir), "--run-dir", str(run), "--epochs", "6"])
    return run, metrics


HEADER = b"image_name| comment_number| comment\n"


def caption_folder(tmp_path, name: str, content: bytes, images=()):
    """A data folder in Flickr30k's layout: images/ with a small noise JPEG for each name in `images`, and the
    caption file `name` holding `content`."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        (folder / "images" / image).parent.mkdir(parents=True, exist_ok=True)  # names may hold subfolders
        Image.fromarray(pixels).save(folder / "images" / image, "JPEG")
    (folder / name).write_bytes(content)
    return folder
