"""The pretrained recipe's success path, short of the network: with the Hub's files already in a Hugging Face cache
(as `hf download` leaves them), `train.py` with its default `--image-pretrained --text-pretrained` and the text
model's own tokenizer loads those very weights, through the same timm and transformers calls that download them.

The cached files are small stand-ins written by this test (a random resnet10t, a 2-layer DistilBERT), under the real
repository names, so nothing here needs the internet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import DistilBertConfig, DistilBertModel

from conftest import tiny_config
from captions import read_captions
from tokenizer import train_wordpiece

ROOT = Path(__file__).resolve().parent.parent
IMAGE_MODEL, TEXT_MODEL = "resnet10t", "distilbert-base-uncased"


def snapshot(cache: Path, repo: str) -> Path:
    """The folder a Hub download of `repo` fills: HF_HUB_CACHE/models--org--name/snapshots/<commit>/."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


def prime_cache(cache: Path, captions: list[str]) -> tuple[dict, dict]:
    """Write the image and text repositories' files; return their weights as written."""
    torch.manual_seed(1)
    image = timm.create_model(IMAGE_MODEL, pretrained=False, num_classes=0).state_dict()
    image = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in image.items()}
    save_file(image, snapshot(cache, timm.models.get_pretrained_cfg(IMAGE_MODEL).hf_hub_id) / "model.safetensors")
    text_dir = snapshot(cache, TEXT_MODEL)
    tokenizer = train_wordpiece(captions, 300, text_dir)
    DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=64, hidden_dim=256, n_layers=2, n_heads=2,
                                     pad_token_id=tokenizer.pad_token_id)).save_pretrained(text_dir)
    return image, load_file(text_dir / "model.safetensors")


def test_default_recipe_loads_the_hubs_weights_from_a_primed_cache(tiny_shapes_dir, tmp_path):
    captions = [caption for _, _, caption in read_captions(tiny_shapes_dir)[0]]
    image, text = prime_cache(tmp_path / "hub", captions)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cfg = tiny_config()
    # Frozen towers keep their loaded weights (and batch-norm statistics), so the checkpoint shows what was loaded.
    subprocess.run([sys.executable, "train.py", "--data-dir", str(tiny_shapes_dir), "--run-dir", str(run),
                    "--image-model", IMAGE_MODEL, "--image-size", str(cfg.image_size), "--batch-size", "32",
                    "--epochs", "1", "--num-workers", "0", "--no-image-trainable", "--no-text-trainable"],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    saved = load_file(run / "best" / "model.safetensors")
    assert json.loads((run / "config.json").read_text())["image_pretrained"] is True
    loaded_image = {k.removeprefix("image_encoder.model."): v for k, v in saved.items()
                    if k.startswith("image_encoder.model.")}
    assert loaded_image.keys() == {k for k in image if not k.startswith("fc.")}
    assert all(torch.equal(loaded_image[k], image[k]) for k in loaded_image)
    loaded_text = {k.removeprefix("text_encoder.model."): v for k, v in saved.items()
                   if k.startswith("text_encoder.model.")}
    assert loaded_text and all(torch.equal(v, text[k]) for k, v in loaded_text.items())
    # the checkpoint rebuilds without the cache: its tokenizer and text architecture travel with it
    env.pop("HF_HUB_CACHE")
    out = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(run / "best"), "--device", "cpu"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    assert "image->text" in out
