"""Splits by image, one caption per image per epoch, sharding across ranks, dynamic padding."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import download
from conftest import HEADER, caption_folder
from dataset import (CaptionData, Split, TrainBatches, epoch_plan, legacy_train_names, record_split, split_names,
                     text_batch, trained_images)
from tokenizer import load_tokenizer


def make_split(n_images, captions_per_image=5):
    counts = np.full(n_images, captions_per_image) if np.isscalar(captions_per_image) else np.array(captions_per_image)
    start = np.concatenate([[0], np.cumsum(counts)])
    captions = [f"caption {j} of image {i}" for i, c in enumerate(counts) for j in range(c)]
    return Split("train", [f"{i}.jpg" for i in range(n_images)], np.arange(n_images), captions, start)


def test_no_image_in_two_splits_and_all_captions_follow_their_image(shapes_dir):
    data = CaptionData(shapes_dir, verbose=False)
    sets = {name: set(s.images) for name, s in data.splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == 800
    assert len(sets["test"]) == len(sets["val"]) == 40  # 5% each
    for split in data.splits.values():
        for i, name in enumerate(split.images):  # every caption of an image sits in that image's split
            assert split.captions[split.start[i]:split.start[i + 1]] == data.captions[name]
        assert len(split.captions) == 5 * len(split)


def test_split_is_deterministic_and_independent_of_listing_order():
    names = [f"{i}.jpg" for i in range(500)]
    a = split_names(names, "nowhere")
    b = split_names(list(reversed(names)), "nowhere")
    assert a == b
    assert len(a["test"]) == 25 and len(a["train"]) == 450


def test_the_default_split_barely_moves_when_images_come_and_go():
    """A checkpoint trained before images were removed or added must not meet its training images in the test split
    after: each change moves at most two other images, one split along (three where the 5% count changes with it)."""
    names = [f"{i}.jpg" for i in range(3000)]  # 150 test, 150 val
    before = split_names(names, "nowhere")
    gone = set(np.random.default_rng(0).choice(names, 10, replace=False))
    after = split_names([n for n in names if n not in gone], "nowhere")
    assert not set(after["test"]) & set(before["train"]) and not set(after["test"]) & set(before["val"]) - set(
        before["val"][:10])
    moved = sum(len(set(after[s]) - set(before[s])) for s in after)
    assert moved <= 2 * 10
    added = split_names(names + [f"new-{i}.jpg" for i in range(10)], "nowhere")
    assert set(added["test"]) <= set(before["test"]) | {f"new-{i}.jpg" for i in range(10)}
    assert set(added["val"]) <= set(before["val"]) | set(before["test"]) | {f"new-{i}.jpg" for i in range(10)}


@pytest.mark.parametrize("n", [8091, 8090, 3000])  # Flickr8k's count sits where 5% rounds the other way
def test_no_single_change_moves_a_training_image_into_the_test_split(n):
    names = [f"{i}.jpg" for i in range(n)]
    before = split_names(names, "nowhere")
    for gone in np.random.default_rng(n).choice(n, 20, replace=False):
        for after in (split_names(names[:gone] + names[gone + 1:], "nowhere"),
                      split_names(names + ["new.jpg"], "nowhere")):
            assert not set(after["test"]) & set(before["train"])
            assert sum(len(set(after[s]) - set(before[s]) - {"new.jpg"}) for s in after) <= 3


def test_split_file_overrides_the_seeded_split(tmp_path):
    (tmp_path / "splits.json").write_text('{"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"], "test": ["d.jpg", "x.jpg"]}')
    got = split_names(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], tmp_path)
    assert got == {"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"], "test": ["d.jpg"]}  # x.jpg is not on disk


def test_each_epoch_yields_each_image_once_with_one_of_its_own_captions():
    split = make_split(103, [5] * 100 + [1, 2, 7])
    owner = split.caption_image
    seen_choices = set()
    for epoch in range(3):
        plan = epoch_plan(split, batch_size=16, seed=1, epoch=epoch)
        captions = np.concatenate(plan)
        images = owner[captions]
        assert sorted(images.tolist()) == list(range(103))  # every image exactly once
        for batch in plan:
            assert len(set(owner[batch].tolist())) == len(batch)  # never two captions of one image in a batch
        seen_choices.add(tuple(captions[np.argsort(images)].tolist()))
        assert [len(b) for b in plan] == [16] * 6 + [7]
    assert len(seen_choices) == 3  # a different caption draw every epoch


def test_a_last_batch_too_small_to_contrast_is_dropped():
    """One pair has no negatives (its loss and gradient are 0) and batch norm cannot normalise one image."""
    assert [len(b) for b in epoch_plan(make_split(97), 16, seed=0, epoch=0)] == [16] * 6
    assert [len(b) for b in epoch_plan(make_split(98), 16, seed=0, epoch=0)] == [16] * 6 + [2]
    # gradient caching in 4 micro-batches asks for 2 pairs each
    assert [len(b) for b in epoch_plan(make_split(103), 16, seed=0, epoch=0, min_pairs=8)] == [16] * 6
    assert [len(b) for b in epoch_plan(make_split(104), 16, seed=0, epoch=0, min_pairs=8)] == [16] * 6 + [8]
    # two ranks: a last global batch of 3 would leave each rank one pair; of 4, two pairs each
    assert [len(b) for b in epoch_plan(make_split(35), 16, seed=0, epoch=0, world=2)] == [16]
    assert [len(b) for b in epoch_plan(make_split(36), 16, seed=0, epoch=0, world=2)] == [16, 2]


def test_plan_is_deterministic_and_drop_last_keeps_shapes_fixed():
    split = make_split(50)
    a = epoch_plan(split, 8, seed=3, epoch=2)
    b = epoch_plan(split, 8, seed=3, epoch=2)
    assert all((x == y).all() for x, y in zip(a, b))
    assert [len(x) for x in epoch_plan(split, 8, seed=3, epoch=2, drop_last=True)] == [8] * 6


@pytest.mark.parametrize("n_images,world", [(64, 2), (70, 2), (61, 4)])
def test_ranks_shard_the_global_batches_without_overlap(n_images, world):
    split = make_split(n_images)
    single = epoch_plan(split, 8 * world, seed=0, epoch=1)
    shards = [epoch_plan(split, 8, seed=0, epoch=1, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    for step, global_batch in enumerate(single):
        parts = [shards[r][step] for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal sizes, so features can be all-gathered
        joined = np.concatenate(parts)
        # rank-major concatenation is the one-process batch (minus at most world-1 leftovers in a last batch)
        assert (joined == global_batch[:len(joined)]).all() and len(global_batch) - len(joined) < world


def test_text_batch_pads_only_to_the_longest_caption_rounded_to_8():
    split = make_split(3, 1)
    split.tokens = np.zeros((3, 48), dtype=np.int32)
    split.lengths = np.array([3, 11, 5], dtype=np.int32)
    for i, n in enumerate(split.lengths):
        split.tokens[i, :n] = np.arange(1, n + 1) + 100 * i
    batch = text_batch(split, np.array([0, 2]), pad_id=0)
    assert batch["input_ids"].shape == (2, 8)  # longest is 5 -> 8
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert text_batch(split, np.array([0, 1]), pad_id=0)["input_ids"].shape == (2, 16)
    assert text_batch(split, np.array([0]), pad_id=0, fixed_length=48)["input_ids"].shape == (1, 48)
    padded = text_batch(split, np.array([0, 1]), pad_id=7)
    assert (padded["input_ids"][~padded["attention_mask"]] == 7).all()


def test_local_tokenizer_is_trained_again_when_its_vocab_size_or_captions_change(tmp_path):
    captions = [f"a {c} {s} on the {p}" for c in ("red", "green", "blue", "yellow", "purple")
                for s in ("circle", "square", "triangle", "star") for p in ("left", "right", "top", "bottom")]
    big = load_tokenizer("local", "distilbert", tmp_path, lambda: captions, 120)
    stamp = (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert len(load_tokenizer("local", "distilbert", tmp_path, lambda: captions, 120)) == len(big)
    assert (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp  # unchanged: reused as it is
    small = load_tokenizer("local", "distilbert", tmp_path, lambda: captions, 50)
    assert len(small) <= 50 < len(big)
    grown = load_tokenizer("local", "distilbert", tmp_path, lambda: captions + ["an orange hexagon"] * 20, 120)
    assert "hexagon" in grown.get_vocab() and "hexagon" not in big.get_vocab()


def small_data_set(folder, n=40):
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "images" / f"{i:03d}.jpg")
    rows = "".join(f"{i:03d}.jpg| {j}| picture {i} caption {j}\n" for i in range(n) for j in range(2))
    (folder / "results.csv").write_text("image_name| comment_number| comment\n" + rows)
    return folder


def test_a_split_left_without_images_is_an_error_that_names_it(tmp_path):
    data = small_data_set(tmp_path / "data")
    test_images = CaptionData(data, verbose=False).splits["test"].images  # 2 of 40
    (data / "prepare_report.json").write_text(json.dumps({"bad_images": test_images}))
    with pytest.raises(ValueError, match="no usable image is left in the test split"):
        CaptionData(data, verbose=False)


def test_images_changed_after_prepare_are_checked_again_before_training_decodes_them(tmp_path):
    data = small_data_set(tmp_path / "data")
    assert download.main(["--prepare", str(data), "--workers", "1"]) == 0
    victim = CaptionData(data, verbose=False).splits["train"].images[0]
    (data / "images" / victim).write_bytes((data / "images" / victim).read_bytes()[:200])  # truncated after prepare
    loaded = CaptionData(data, verbose=False)
    assert not loaded.report_is_current()
    loaded.open_images(16, mode="off", workers=1)  # JPEG decoding: would crash mid-epoch on the truncated file
    assert victim not in loaded.splits["train"].images
    rows = np.concatenate([s.rows for s in loaded.splits.values()])
    assert loaded.source.get(rows).shape == (len(rows), 16, 16, 3)


def test_a_run_records_its_split_and_keeps_what_it_trained_on_across_a_changed_resume(tmp_path):
    folder = small_data_set(tmp_path / "data")
    data = CaptionData(folder, verbose=False)
    file = tmp_path / "run" / "splits.json"
    assert record_split(file, data, resume=False) == []
    assert json.loads(file.read_text()) == {name: split.images for name, split in data.splits.items()}
    first_train = data.splits["train"].images
    moved = {"train": first_train[1:] + data.splits["val"].images, "val": first_train[:1],
             "test": data.splits["test"].images}
    (folder / "splits.json").write_text(json.dumps(moved))  # the folder's split changed mid-run
    changed = CaptionData(folder, verbose=False)
    assert record_split(file, changed, resume=True) == first_train[:1]  # trained on before, validated on now
    assert sorted(trained_images(file)) == sorted(first_train + data.splits["val"].images)
    assert record_split(file, changed, resume=False) == [] and sorted(trained_images(file)) == sorted(moved["train"])
    assert trained_images(tmp_path / "none.json") is None


def test_resuming_a_run_from_before_split_records_remembers_the_old_default_split(tmp_path):
    data = CaptionData(small_data_set(tmp_path / "data", n=400), verbose=False)
    file = tmp_path / "run" / "splits.json"
    seen = record_split(file, data, resume=True)  # no record yet: the run began with the shuffled default split
    old_train = set(legacy_train_names(list(data.captions)))
    assert seen == sorted(old_train & set(data.splits["val"].images + data.splits["test"].images)) and len(seen) > 20
    assert set(trained_images(file)) == old_train | set(data.splits["train"].images)


def test_a_cache_that_cannot_be_built_with_image_cache_on_is_one_line(tmp_path, monkeypatch):
    import errno

    import dataset

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    data = CaptionData(small_data_set(tmp_path / "data"), verbose=False)
    monkeypatch.setattr(dataset, "build_cache", read_only)
    with pytest.raises(ValueError, match="--image-cache on: could not build the image cache .*Read-only file system"):
        data.open_images(16, mode="on")
    victim = tmp_path / "data" / "images" / data.splits["train"].images[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated, and no prepare report: nobody checked it yet
    data.open_images(16, mode="auto")  # auto decodes JPEGs instead, checking them first as --image-cache off does
    assert victim.name not in data.splits["train"].images
    assert data.source.get(data.splits["train"].rows).shape == (len(data.splits["train"]), 16, 16, 3)


def test_a_report_made_through_another_spelling_of_the_folder_is_current(tmp_path, monkeypatch):
    small_data_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert download.main(["--prepare", "data", "--workers", "1"]) == 0
    assert CaptionData(tmp_path / "data", verbose=False).report_is_current()
    assert CaptionData("./data/", verbose=False).report_is_current()


def test_one_image_cache_serves_every_spelling_of_the_folder(tmp_path, monkeypatch):
    small_data_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    CaptionData("data", verbose=False).open_images(16)
    (cache,) = (tmp_path / "data" / ".cache").glob("*.npy")
    built = cache.stat().st_mtime_ns
    CaptionData(tmp_path / "data", verbose=False).open_images(16)  # as the notebook names it: not rebuilt
    assert [p.name for p in (tmp_path / "data" / ".cache").glob("*.npy")] == [cache.name]
    assert cache.stat().st_mtime_ns == built


def test_a_stray_nul_byte_does_not_make_a_caption_file_utf16(tmp_path):
    folder = small_data_set(tmp_path / "data")
    text = (folder / "results.csv").read_text().replace("picture 3 caption 0", "picture 3 caption\x00 0")
    (folder / "results.csv").write_text(text)
    assert len(CaptionData(folder, verbose=False).names) == 40


def test_split_file_repeats_are_kept_once(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a.jpg", "b.jpg", "a.jpg"], "val": ["c.jpg"],
                                                      "test": ["d.jpg"]}))
    assert split_names(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], tmp_path)["train"] == ["a.jpg", "b.jpg"]


def test_captions_of_images_missing_on_disk_never_reach_a_split(tmp_path):
    rows = "".join(f"{i}.jpg| 0| picture {i}\n" for i in range(30)) + "ghost.jpg| 0| a ghost\n"
    data = CaptionData(caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)]),
                       verbose=False)
    assert "ghost.jpg" not in data.names and "ghost.jpg" not in data.captions
    assert all("ghost.jpg" not in s.images for s in data.splits.values())


def test_captioned_images_missing_on_disk_are_named(tmp_path, capsys):
    """Training says which names it could not find (a caption file written with full paths finds none), not only
    how many."""
    rows = "".join(f"{i}.jpg| 0| picture {i}\n" for i in range(30)) + "ghost.jpg| 0| a ghost\n"
    CaptionData(caption_folder(tmp_path / "a", "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)]))
    assert "skipping 1 captioned images missing on disk (e.g. ['ghost.jpg'])" in capsys.readouterr().out
    rows = "".join(f"/home/me/photos/{i}.jpg| 0| picture {i}\n" for i in range(30))
    folder = caption_folder(tmp_path / "b", "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)])
    with pytest.raises(ValueError, match=r"30 naming images that are not in .*, e.g. \['/home/me/photos/0.jpg', "):
        CaptionData(folder)


def test_commands_suggested_for_a_folder_with_a_space_in_its_path_can_be_pasted(tmp_path, capsys):
    rows = "".join(f"{i}.jpg| 0| picture {i}\n" for i in range(30)) + "0.jpg| 1| \n"  # an empty caption: reported
    folder = caption_folder(tmp_path / "my photos", "results.csv", HEADER + rows.encode(),
                            [f"{i}.jpg" for i in range(30)])
    CaptionData(folder)
    assert f"`python download.py --prepare '{folder}'`" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=f"`python download.py --out '{tmp_path}/no such'` downloads "):
        CaptionData(tmp_path / "no such")
    (tmp_path / "empty").mkdir()  # the built-in set is offered in a folder of its own, with its own preset
    with pytest.raises(FileNotFoundError, match=r"is empty .*`python download.py --dataset shapes --out data/shapes`, "
                                                r"then train with `--preset shapes --data-dir data/shapes`"):
        CaptionData(tmp_path / "empty")


def test_tokenize_pads_every_split_to_max_length_so_fixed_length_batches_have_it(tmp_path):
    rows = "".join(f"{i}.jpg| 0| a red circle number {i}\n" for i in range(30))
    data = CaptionData(caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)]),
                       verbose=False)
    tok = load_tokenizer("local", "distilbert", tmp_path, lambda: data.splits["train"].captions, 60)
    data.tokenize(tok, 32)
    for split in data.splits.values():
        assert split.tokens.shape == (len(split.captions), 32)
        batch = text_batch(split, np.arange(len(split.captions)), tok.pad_token_id, fixed_length=32)
        assert batch["input_ids"].shape == (len(split.captions), 32)


def test_captions_are_padded_on_the_right_whatever_the_tokenizers_default(tmp_path):
    # Gemma's, Llama's and XLNet's tokenizers pad on the left; batches keep each caption's first `length` tokens
    rows = "".join(f"{i}.jpg| 0| a red circle number {i}\n" for i in range(30))
    data = CaptionData(caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)]),
                       verbose=False)
    tok = load_tokenizer("local", "distilbert", tmp_path, lambda: data.splits["train"].captions, 60)
    tok.padding_side = "left"
    data.tokenize(tok, 32)
    split = data.splits["train"]
    batch = text_batch(split, np.arange(len(split.captions)), tok.pad_token_id)
    for ids, mask, caption in zip(batch["input_ids"], batch["attention_mask"], split.captions):
        assert tok.decode(ids[mask.bool()], skip_special_tokens=True) == caption
        assert ids[0] == tok.cls_token_id


@pytest.mark.parametrize("max_length", [1, 2])
def test_a_max_length_with_no_room_past_the_special_tokens_is_refused(tmp_path, max_length):
    # 1 crashed in numpy (the tokenizer cannot cut below [CLS] [SEP]); 2 made every caption the same [CLS] [SEP]
    rows = "".join(f"{i}.jpg| 0| a red circle number {i}\n" for i in range(30))
    data = CaptionData(caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)]),
                       verbose=False)
    tok = load_tokenizer("local", "distilbert", tmp_path, lambda: data.splits["train"].captions, 60)
    with pytest.raises(ValueError, match=rf"--max-length {max_length} leaves no room for words.* at least 3"):
        data.tokenize(tok, max_length)
    data.tokenize(tok, 3)
    assert (data.splits["train"].tokens[:, 1] != tok.sep_token_id).all()  # [CLS], a word, [SEP]


class BlankSource:
    size = 16

    def get(self, rows):
        return np.zeros((len(rows), 16, 16, 3), dtype=np.uint8)


def tokenized_split(n=50):
    start = np.arange(0, 5 * n + 1, 5)
    split = Split("train", [f"{i}.jpg" for i in range(n)], np.arange(n), ["c"] * (5 * n), start)
    split.lengths = np.full(5 * n, 4, dtype=np.int32)
    split.tokens = np.where(np.arange(8)[None, :] < 4, 7, 0).repeat(5 * n, 0).astype(np.int32)
    return split


def test_run_indices_resume_mid_epoch_and_run_whole_later_epochs():
    batches = TrainBatches(tokenized_split(), BlankSource(), 8, 0, 0.9, seed=0)
    n = len(batches)
    assert n == 7  # 6 full batches and a last one of 2
    assert batches.run_indices(3, 1, 2) == [(1, i) for i in range(2, n)] + [(2, i) for i in range(n)]
    assert batches.run_indices(2) == [(e, i) for e in range(2) for i in range(n)]


def test_crops_are_drawn_afresh_every_epoch():
    batches = TrainBatches(tokenized_split(), BlankSource(), 8, 0, 0.5, seed=0)
    assert torch.equal(batches[0, 0]["boxes"], batches[0, 0]["boxes"])  # deterministic given (seed, epoch, i)
    assert not torch.equal(batches[0, 0]["boxes"], batches[1, 0]["boxes"])


def test_each_rank_draws_crops_of_its_own():
    """Without the rank in the crop seed, every process would crop its images with the same boxes, step by step."""
    ranks = [TrainBatches(tokenized_split(), BlankSource(), 4, 0, 0.5, seed=0, rank=r, world=2) for r in (0, 1)]
    boxes = [b[0, 0]["boxes"] for b in ranks]
    assert boxes[0].shape == boxes[1].shape and not torch.equal(*boxes)
