"""Flags come from the dataclass, presets apply first, bad settings fail before any work with the flag named; the
device, precision and seed that settings pick take effect."""

import argparse
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from config import PRESETS, Config, build_parser, config_from_dict, field_notes, parse_config
from utils import autocast, inference_precision, pick_device, pick_precision, seed_everything


def test_defaults_are_the_flickr30k_recipe():
    cfg = parse_config([])
    assert (cfg.image_model, cfg.text_model, cfg.image_size, cfg.projection_dim) == \
        ("resnet50", "distilbert-base-uncased", 224, 256)
    assert (cfg.lr_image, cfg.lr_text, cfg.lr_head) == (1e-4, 1e-5, 1e-3)
    assert cfg.image_pretrained and cfg.text_pretrained


def test_every_field_is_a_flag_and_flags_beat_the_preset():
    cfg = parse_config(["--preset", "shapes", "--epochs", "3", "--lr-head", "0.01", "--no-channels-last",
                        "--text-pooling", "cls", "--run-dir", "runs/x"])
    assert cfg.epochs == 3 and cfg.lr_head == 0.01 and not cfg.channels_last and cfg.text_pooling == "cls"
    assert cfg.image_model == PRESETS["shapes"]["image_model"] and cfg.image_pretrained is False
    assert cfg.run_dir == "runs/x"


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "3", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr-image", "-0.1"], "--lr-image must be a finite number >= 0"),
    (["--lr-head", "nan"], "--lr-head must be a finite number >= 0, got nan"),
    (["--init-temperature", "0.001"], "--init-temperature must be at least 0.01"),
    (["--batch-size", "1"], "batches of one pair"),
    (["--batch-size", "8", "--accum-steps", "8"], "--accum-steps 8 makes (micro-)batches of one pair"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--batch-size", "10", "--accum-steps", "3"], "divisible by --accum-steps"),
    (["--num-workers", "100000"], "--num-workers 100000 is far more"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--compile-mode", "reduce-overhead"], "only applies with --compile"),
    (["--no-image-pretrained", "--image-freeze-bn-stats"], "drop one of the two flags"),
    (["--vocab-size", "0"], "--vocab-size must be positive"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0, got inf"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--warmup-frac", "1"], "--warmup-frac must be in [0, 1)"),
    (["--crop-scale-min", "0"], "--crop-scale-min must be in (0, 1]"),
    (["--epoch", "2"], "unrecognized arguments: --epoch"),  # a prefix of --epochs is a typo, not an abbreviation
    (["--preset", "shapes", "--image-freeze-bn-stats"],
     "drop one of the two flags (--preset shapes set --no-image-pretrained; a flag of your own overrides it)"),
    (["--preset", "shapes", "--batch-size", "12", "--accum-steps", "5"], "divisible by --accum-steps 5\n"),
    (["--seed", "-1"], "--seed must be in [0, 2**31), got -1"),
    # a pretrained text tower has its own size: the flags would be saved in config.json and silently not apply
    (["--text-layers", "4"], "--text-layers 4 only size a text tower built with random weights; --text-pretrained "
                             "loads --text-model distilbert-base-uncased at the size it was trained at"),
    (["--preset", "shapes", "--text-pretrained"], "--text-layers 2, --text-width 128, --text-heads 4 only size"),
])
def test_bad_flags_fail_with_the_flag_named(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_the_closed_ends_of_each_range_are_accepted():
    """--crop-scale-min 1 (no crop), a temperature of exactly 0.01 (the cap), no warm-up, decay to the full rate."""
    cfg = parse_config(["--crop-scale-min", "1", "--init-temperature", "0.01", "--dropout", "0", "--warmup-frac", "0",
                        "--min-lr-frac", "1", "--grad-clip", "0"])
    assert (cfg.crop_scale_min, cfg.init_temperature, cfg.min_lr_frac) == (1.0, 0.01, 1.0)


def test_a_config_built_in_code_or_loaded_is_validated_like_the_flags(monkeypatch):
    """Config objects do not pass through argparse's choices (checkpoints, notebooks): validate() checks them too."""
    for name, bad in [("text_pooling", "max"), ("precision", "fp8"), ("image_cache", "yes")]:
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be one of"):
            config_from_dict({**Config().to_dict(), name: bad}).validate()
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    Config(num_workers=8).validate()  # up to four per CPU
    with pytest.raises(ValueError, match="--num-workers 9 is far more than this machine's 2 CPUs"):
        Config(num_workers=9).validate()


def test_saved_config_round_trips_and_unknown_fields_are_refused():
    cfg = parse_config(["--preset", "shapes", "--epochs", "2"])
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="mystery"):
        config_from_dict({**cfg.to_dict(), "mystery": 1})
    assert Config().to_dict() == parse_config([]).to_dict()


def test_a_config_saved_with_a_retired_field_still_loads():
    """Runs saved while --image-stem-channels existed (it changed kernels, not results) load as they were."""
    cfg = parse_config(["--preset", "shapes"])
    assert config_from_dict({**cfg.to_dict(), "image_stem_channels": 4}) == cfg


def test_every_flag_explains_itself_in_help():
    notes = field_notes()
    fields = [f.name for f in dataclasses.fields(Config)]
    assert [name for name in fields if not notes.get(name)] == []
    assert notes["crop_scale_min"].endswith("(so no flips or colour jitter either), as in open_clip")  # two lines
    text = " ".join(build_parser().format_help().split())  # unwrapped
    assert "contrastive batch per process" in text and "99% of Flickr30k captions fit in 40" in text


def test_every_flag_of_every_command_explains_itself_in_help(monkeypatch, capsys):
    import bench
    import download
    import evaluate
    import search
    import train
    silent, add = [], argparse.ArgumentParser.add_argument

    def spy(parser, *names, **kwargs):
        if not kwargs.get("help"):
            silent.append(names[0])
        return add(parser, *names, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", spy)
    for command in (train, evaluate, search, download, bench):
        with pytest.raises(SystemExit):
            command.main(["--help"])
        assert "usage:" in capsys.readouterr().out
    assert silent == []


def test_a_run_trained_in_fp16_evaluates_on_a_cpu():
    """Training refuses fp16 on a CPU; evaluation and search fall back to the CPU's own precision."""
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="--precision fp16 is not supported on the CPU"):
        pick_precision("fp16", cpu)
    assert inference_precision("fp16", cpu) == torch.float32
    assert inference_precision("bf16", cpu) == torch.bfloat16  # the run's own precision wherever the device has it


def test_a_checkpoints_relative_data_folder_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """Configs keep data/shapes as train.py was given it; search and evaluation started elsewhere (a notebook
    kernel, a script in another folder) find it in the repo."""
    (tmp_path / "repo" / "data" / "shapes").mkdir(parents=True)
    monkeypatch.setattr(utils, "REPO_DIR", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    assert utils.trained_data_dir("data/shapes") == tmp_path / "repo" / "data" / "shapes"
    monkeypatch.chdir(tmp_path / "repo")
    assert utils.trained_data_dir("data/shapes") == Path("data/shapes")  # as given, where that works


@pytest.mark.parametrize("name, message", [
    ("gpu0", "--device 'gpu0' is not a device torch knows"),
    pytest.param("cuda", "asked for CUDA, but torch sees no CUDA GPU here; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_device_that_cannot_be_used_is_a_flag_error(name, message):
    with pytest.raises(ValueError, match=message):
        pick_device(name)


def test_autocast_computes_in_the_chosen_precision():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), torch.float32):
        assert (a @ b).dtype == torch.float32


def test_the_seed_repeats_python_numpy_and_torch_draws():
    def draws():
        return random.random(), np.random.rand(), torch.rand(()).item()

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)  # and each generator follows the seed given
    assert all(a != b for a, b in zip(draws(), first))
