"""The real recipe's Hub paths exist and, offline, fail fast with a message saying what to do."""

import time

import pytest

import train
from modules import ImageEncoder, build_text_config, hub_repos
from tokenizer import load_tokenizer
from utils import hub_error


def test_pretrained_image_weights_offline_name_the_repo_and_the_way_out():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        ImageEncoder("resnet50", pretrained=True, image_size=224)
    message = str(e.value)
    assert "resnet50" in message and "HF_HOME" in message and "hf download timm/resnet50" in message
    assert "--no-image-pretrained" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" not in message  # --image-model takes timm names only: the copied cache is the way
    assert time.monotonic() - start < 30  # no retry loop against an unreachable Hub


def test_hub_tokenizer_and_text_model_offline():
    with pytest.raises(RuntimeError, match="distilbert-base-uncased.*\n.*HF_HOME(.|\n)*--tokenizer local"):
        load_tokenizer("", "distilbert-base-uncased", ".", lambda: [], 100)
    with pytest.raises(RuntimeError, match="(.|\n)*--no-text-pretrained --text-model distilbert"):
        build_text_config("distilbert-base-uncased", True, 0, 0, 0, 100, 48)


def test_hints_name_the_architecture_the_user_asked_for():
    """Offline, `--no-text-pretrained --text-model bert-base-uncased` still needs the Hub for the architecture; the
    model type `bert` does not. A model type names no tokenizer at all."""
    with pytest.raises(RuntimeError) as e:
        build_text_config("bert-base-uncased", False, 2, 64, 2, 100, 48)
    assert "--text-model bert: with --no-text-pretrained, a model type builds" in str(e.value)
    assert "point --text-model at a local folder" in str(e.value)
    with pytest.raises(RuntimeError, match=r"--no-text-pretrained --text-model roberta \(random"):
        build_text_config("FacebookAI/roberta-base", True, 0, 0, 0, 100, 48)
    with pytest.raises(ValueError, match="--text-model distilbert is a model type, which comes with no tokenizer"):
        load_tokenizer("", "distilbert", ".", lambda: [], 100)


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"--image-model 'resnet5O'.*'resnet50'"):
        ImageEncoder("resnet5O", pretrained=False, image_size=64)
    with pytest.raises(ValueError, match=r"'/tmp/weights' is not a timm model name; see timm.list_models\(\)"):
        ImageEncoder("/tmp/weights", pretrained=False, image_size=64)


def test_default_recipe_stops_before_training(tiny_shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match="train.py: error: .*distilbert-base-uncased(.|\n)*--no-image-pretrained "
                       "--no-text-pretrained --text-model distilbert --tokenizer local"):
        train.main(["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run").exists()


def test_a_failed_start_names_everything_the_run_loads_from_the_hub(tiny_shapes_dir, tmp_path):
    """The tokenizer fails first; its message also names the image weights, so one trip to a machine with internet
    fetches both. A tower trained from scratch or a tokenizer of the captions needs nothing."""
    with pytest.raises(SystemExit, match="all that this run loads from the Hub: hf download timm/resnet50.a1_in1k; "
                                         "hf download distilbert-base-uncased$"):
        train.main(["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert hub_repos("resnet50", False, "distilbert-base-uncased", False, "local") == []
    assert hub_repos("resnet50", True, "bert-base-uncased", False, "local") == ["timm/resnet50.a1_in1k"]
    assert hub_repos("resnet50", False, str(tmp_path), True, "") == []  # a local folder


def test_offline_hub_errors_say_how_to_fail_fast_where_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # only the message is built here: nothing reaches for the Hub
    assert "set HF_HUB_OFFLINE=1, and this comes at once" in str(hub_error("x", "text model", "", OSError()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "set HF_HUB_OFFLINE=1" not in str(hub_error("x", "text model", "", OSError()))
