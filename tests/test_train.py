"""End to end on CPU: a tiny model learns the built-in set, and an unseen data set in another format."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
import utils
from checkpoint import load_model
from clip import CLIPModel
from conftest import TINY
from dataset import CaptionData
from engine import lr_factor
from images import Pixels
from utils import read_jsonl


def untrained_test_recall(run):
    """Recall of a randomly initialised model of the run's architecture, on the run's test split."""
    _, cfg, tokenizer = load_model(run / "best")
    torch.manual_seed(0)
    model = CLIPModel(cfg, len(tokenizer)).eval()
    data = CaptionData(cfg.data_dir, verbose=False)
    pixels = Pixels.for_encoder(model.image_encoder.data_config, cfg.image_size)
    data.open_images(pixels.square)
    data.tokenize(tokenizer, cfg.max_length)
    return evaluate.evaluate(model, data.splits["test"], data.source, pixels, tokenizer.pad_token_id,
                             torch.device("cpu"), torch.float32, 128)


def test_tiny_model_learns_the_shapes_set(tiny_run):
    run, metrics = tiny_run
    before = untrained_test_recall(run)
    # 40 test images, 200 captions: chance R@5 is 12.5%
    assert before["i2t_R@5"] < 35 and before["t2i_R@5"] < 35
    for direction in ("i2t", "t2i"):
        assert metrics[f"test_{direction}_R@5"] >= 60, metrics
        assert metrics[f"test_{direction}_R@5"] >= 2 * before[f"{direction}_R@5"]
        assert metrics[f"test_{direction}_R@1"] >= 3 * 100 / 40  # three times chance at R@1
    history = read_jsonl(run / "metrics.jsonl")
    assert history[-1]["train_loss"] < 0.75 * history[0]["train_loss"]


def test_run_directory_holds_config_metrics_and_checkpoints(tiny_run):
    run, _ = tiny_run
    history = read_jsonl(run / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(h["step"] == 23 * h["epoch"] for h in history)  # 720 images / batch 32 -> 23 steps (last one small)
    saved = json.loads((run / "config.json").read_text())
    best = json.loads((run / "best" / "checkpoint.json").read_text())
    last = json.loads((run / "last" / "checkpoint.json").read_text())
    assert saved == best["config"] == last["config"] and saved["epochs"] == 6
    assert last["state"]["step"] == 138 and last["state"]["epoch"] == 6
    best_epoch = max(history, key=lambda h: h["val_mean_recall"])
    assert best["state"]["metrics"]["epoch"] == best_epoch["epoch"]
    for name in ("model.safetensors", "training_state.safetensors", "text_config.json", "tokenizer/tokenizer.json"):
        assert (run / "last" / name).exists(), name
    assert json.loads((run / "env.json").read_text())["torch"] == torch.__version__
    assert (run / "curves.png").stat().st_size > 10_000
    assert len(list((run / "checkpoints").iterdir())) <= 2  # superseded checkpoints are deleted


def test_the_recorded_code_version_marks_uncommitted_changes(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("commit", "-qm", "first")
    monkeypatch.setattr(utils, "REPO_DIR", tmp_path)
    sha = utils.git_sha()
    assert len(sha) == 40
    (tmp_path / "train.py").write_text("print(2)\n")
    assert utils.git_sha() == sha + "-dirty"


@pytest.mark.parametrize("val_scores", [(100.0, 50.0), (100.0, 100.0)])  # a tie keeps the earlier best
def test_the_test_split_is_scored_with_the_best_checkpoint_not_the_last(tiny_shapes_dir, tmp_path, monkeypatch,
                                                                        val_scores):
    real_evaluate, calls = train.evaluate, []

    def evaluate_with_epoch_1_best(model, *args, **kwargs):
        metrics = real_evaluate(model, *args, **kwargs)
        if "loss_batch_size" in kwargs:  # validation: the first epoch scores best, or no worse than the second
            calls.append("val")
            metrics["mean_recall"] = val_scores[len(calls) - 1]
        else:  # the test split
            calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return metrics

    monkeypatch.setattr(train, "evaluate", evaluate_with_epoch_1_best)
    run = tmp_path / "run"
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "2"])
    (best, _, _), (last, _, _) = load_model(run / "best"), load_model(run / "last")
    tested = calls[-1]
    assert calls[:2] == ["val", "val"] and set(tested) == set(best.state_dict())
    assert all(torch.equal(tested[k], v) for k, v in best.state_dict().items())
    assert not all(torch.equal(tested[k], v) for k, v in last.state_dict().items())


def test_the_seed_draws_the_initial_weights_and_the_warmup_reaches_the_schedule(tiny_shapes_dir, tmp_path, monkeypatch):
    real_make_optimizer, initial = train.make_optimizer, []

    def make_optimizer(model, *args):  # called on the model as built, before any step
        initial.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_make_optimizer(model, *args)

    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    for seed in (0, 1):
        run = tmp_path / str(seed)
        train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "1", "--seed",
                           str(seed), "--warmup-frac", "0.9"])
    assert not all(torch.equal(v, initial[1][k]) for k, v in initial[0].items())
    # 180 training images in batches of 32: 6 steps, the first 5 warming up, so the last is at the peak
    assert read_jsonl(run / "metrics.jsonl")[0]["lr_scale"] == pytest.approx(lr_factor(5, 6, 5)) == 1.0


def test_each_epochs_train_loss_is_the_mean_of_its_own_steps(tiny_shapes_dir, tmp_path, monkeypatch):
    real_step, losses = train.train_step, []

    def recorded_step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train, "train_step", recorded_step)
    run = tmp_path / "run"
    # the loss is read back every 4 steps: windows that end mid-epoch and at its end
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(run), "--epochs", "2", "--log-every", "4"])
    assert [row["train_loss"] for row in read_jsonl(run / "metrics.jsonl")] == \
        pytest.approx([np.mean(losses[:6]), np.mean(losses[6:])])  # 180 training images: 6 steps of 32 an epoch


def test_reloaded_checkpoint_reproduces_the_training_process_metrics(tiny_run, tmp_path):
    run, metrics = tiny_run
    out = tmp_path / "test.json"
    again = evaluate.main(["--checkpoint", str(run / "best"), "--split", "test", "--json", str(out)])
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert again[key] == pytest.approx(metrics[f"test_{key}"], abs=1e-9)
    written = json.loads(out.read_text())
    assert written["n_images"] == 40 and written["n_captions"] == 200 and "i2t_R@5" in written


def write_stripes(folder, n=400, seed=0):
    """A data set the preset has never seen, in the bring-your-own format (captions.csv, 2-3 captions each)."""
    colours = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 210, 30),
               "black": (10, 10, 10), "white": (245, 245, 245)}
    names = list(colours)
    rng = np.random.default_rng(seed)
    (folder / "photos").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        vertical = bool(rng.integers(2))
        width = int(rng.choice([4, 8]))
        idx = np.arange(48) // width % 2
        stripe = np.where(idx[None, :] if vertical else idx[:, None], 1, 0)
        img = np.where(stripe[..., None] == 1, colours[names[a]], colours[names[b]]).astype(np.uint8)
        img = np.broadcast_to(img, (48, 48, 3))
        Image.fromarray(np.ascontiguousarray(img)).save(folder / "photos" / f"s{i}.png")
        kind = "vertical" if vertical else "horizontal"
        thick = "thin" if width == 4 else "wide"
        rows += [f"s{i}.png,{thick} {kind} stripes of {names[a]} and {names[b]}",
                 f"s{i}.png,\"{names[b]} and {names[a]}, {kind}\""]
        if i % 2:
            rows.append(f"s{i}.png,a {kind} pattern in {names[a]}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    (folder / "images").symlink_to("photos")


def test_evaluation_warns_when_the_split_now_holds_training_images(tiny_run, shapes_dir, tmp_path, capsys):
    run, _ = tiny_run
    record = json.loads((run / "splits.json").read_text())
    assert {s: len(v) for s, v in record.items()} == {"train": 720, "val": 40, "test": 40}
    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data, ignore=shutil.ignore_patterns(".cache"))
    clean = evaluate.main(["--checkpoint", str(run / "best"), "--data-dir", str(data)])
    assert clean["seen_in_training"] == 0 and "WARNING" not in capsys.readouterr().err
    leaked = {"train": record["train"][5:] + record["test"][:5], "val": record["val"],
              "test": record["train"][:5] + record["test"][5:]}  # as if the folder's split had changed since
    (data / "splits.json").write_text(json.dumps(leaked))
    metrics = evaluate.main(["--checkpoint", str(run / "best"), "--data-dir", str(data)])
    assert metrics["seen_in_training"] == 5
    warning = capsys.readouterr().err
    assert "WARNING: 5 of the 40 test images" in warning and f"--split-file {run / 'splits.json'}" in warning

    (data / "splits.json").unlink()  # back to the split the run recorded, but the run trained on 3 of its test images
    changed = shutil.copytree(run, tmp_path / "changed-run", symlinks=True, ignore=shutil.ignore_patterns("index-*"))
    (changed / "splits.json").write_text(json.dumps({**record, "trained_earlier": record["test"][:3]}))
    metrics = evaluate.main(["--checkpoint", str(changed / "best"), "--data-dir", str(data)])
    assert metrics["seen_in_training"] == 3
    assert "even its own test split holds them: retrain" in capsys.readouterr().err


def test_the_same_preset_learns_an_unseen_data_set(tmp_path):
    data = tmp_path / "stripes"
    write_stripes(data)
    metrics = train.main(TINY + ["--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--epochs", "6"])
    # 20 test images: chance R@5 is 25%
    assert metrics["test_i2t_R@5"] >= 70 and metrics["test_t2i_R@5"] >= 60, metrics
    assert (data / "tokenizer" / "tokenizer.json").exists()  # trained from this folder's own captions


def test_compiled_training_matches_eager_training(tiny_shapes_dir, tmp_path, monkeypatch):
    """--compile (one batch shape, captions padded to --max-length, CUDA-graph mode where there is a GPU) trains the
    same model as eager mode: 180 training images in batches of 45, so both see the same four batches. The compiled
    run does compile (else it would match eager mode trivially): dynamo captures graphs, eager mode none."""
    calls = []
    compile_model = train.compile_model
    monkeypatch.setattr(train, "compile_model", lambda *a: calls.append(a[1:]) or compile_model(*a))
    common = TINY + ["--data-dir", str(tiny_shapes_dir), "--batch-size", "45", "--epochs", "1"]
    torch._dynamo.utils.counters.clear()
    train.main(common + ["--run-dir", str(tmp_path / "eager")])
    assert not calls and not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._inductor.config.patch(fallback_random=True):  # the text tower's dropout draws as in eager mode
        train.main(common + ["--run-dir", str(tmp_path / "compiled"), "--compile", "--compile-mode", "reduce-overhead"])
    assert [mode for mode, _ in calls] == ["reduce-overhead"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    (eager_log,), (compiled_log,) = read_jsonl(tmp_path / "eager" / "metrics.jsonl"), \
        read_jsonl(tmp_path / "compiled" / "metrics.jsonl")
    assert eager_log["step"] == compiled_log["step"] == 4
    assert compiled_log["train_loss"] == pytest.approx(eager_log["train_loss"], rel=5e-3)
    assert compiled_log["val_loss"] == pytest.approx(eager_log["val_loss"], rel=1e-2)


def test_the_notes_name_the_batch_a_small_training_set_allows(tiny_shapes_dir, tmp_path, capsys):
    """--batch-size 256 over 180 training images: each epoch is one batch of 180, in micro-batches of 90."""
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                       "--batch-size", "256", "--accum-steps", "2"])
    printed = capsys.readouterr().out
    n = int(printed.split(" train / ")[0].split()[-1])
    assert f"each epoch is one batch of {n}\n" in printed
    assert f"normalise micro-batches of {n // 2}, so gradients are close to, not equal to, one batch of {n}'s\n" \
        in printed


def test_cls_pooling_with_a_tokenizer_that_puts_no_cls_first_gets_a_note(tiny_shapes_dir, tmp_path, capsys):
    """As T5's tokenizer: the first position holds a word, so the note names --text-pooling mean. And a text tower
    whose padding reaches its real tokens gets a note of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CaptionData(tiny_shapes_dir, verbose=False).splits["train"].captions
                    for w in c.lower().replace(",", " ").replace(".", " ").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        tmp_path / "no-cls")
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                       "--tokenizer", str(tmp_path / "no-cls"), "--text-pooling", "cls"])
    out = capsys.readouterr().out
    assert "no [CLS] token first, so --text-pooling cls takes the first word's vector" in out
    assert "padding change" not in out  # DistilBERT's padding stays out of the real tokens
    train.main(TINY + ["--data-dir", str(tiny_shapes_dir), "--run-dir", str(tmp_path / "run2"), "--epochs", "1",
                       "--text-pooling", "cls", "--text-model", "convbert"])  # the local tokenizer starts with [CLS]
    out = capsys.readouterr().out
    assert "no [CLS] token" not in out
    assert "--text-model convbert lets a caption's padding change its own tokens' outputs" in out  # its convolutions
