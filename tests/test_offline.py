"""The real recipe's Hub paths exist and, offline, fail fast with a message saying what to do."""

import time

import pytest

import train
from modules import ImageEncoder, build_text_config
from tokenizer import load_tokenizer


def test_pretrained_image_weights_offline_name_the_repo_and_the_way_out():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        ImageEncoder("resnet50", pretrained=True, image_size=224)
    message = str(e.value)
    assert "resnet50" in message and "HF_HOME" in message and "hf download timm/resnet50" in message
    assert "--no-image-pretrained" in message and "HF_HUB_OFFLINE" in message
    assert time.monotonic() - start < 30  # no retry loop against an unreachable Hub


def test_hub_tokenizer_and_text_model_offline():
    with pytest.raises(RuntimeError, match="distilbert-base-uncased.*\n.*HF_HOME(.|\n)*--tokenizer local"):
        load_tokenizer("", "distilbert-base-uncased", ".", lambda: [], 100)
    with pytest.raises(RuntimeError, match="(.|\n)*--no-text-pretrained --text-model distilbert"):
        build_text_config("distilbert-base-uncased", True, 0, 0, 0, 100, 48)


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"--image-model 'resnet5O'.*'resnet50'"):
        ImageEncoder("resnet5O", pretrained=False, image_size=64)


def test_default_recipe_stops_before_training(tiny_shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match="train.py: error: .*distilbert-base-uncased(.|\n)*--no-image-pretrained "
                       "--no-text-pretrained --text-model distilbert --tokenizer local"):
        train.main(["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run").exists()
