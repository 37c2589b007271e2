"""download.py end to end against a fake Kaggle API that "downloads" a zip built here in the real layouts."""

import dataclasses
import io
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import download
import kaggle_auth
import prepare
import shapes
import train
from conftest import TINY, caption_folder
from dataset import CaptionData
from shapes import make_shapes

SLUG = "hsankesara/flickr-image-dataset"
KEY = "f3e9c1d2b4a65877kagglekey0042"
N_GOOD = 40  # decodable images, among them one grayscale and one CMYK JPEG
CORRUPT = "1000000040.jpg"
MALFORMED = "2199200615.jpg| 4   A dog runs across the grass ."  # as in the real results.csv


def jpeg(colour, mode: str = "RGB", size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def flickr30k_files() -> tuple[dict[str, bytes], bytes, dict]:
    """Images, results.csv bytes, and the line numbers of the rows that need attention."""
    images = {f"{1000000000 + i}.jpg": jpeg((6 * i, 255 - 6 * i, (37 * i) % 256)) for i in range(N_GOOD - 2)}
    images["2199200615.jpg"] = jpeg(90, mode="L")
    images["1000000039.jpg"] = jpeg((0, 255, 255, 0), mode="CMYK")
    images[CORRUPT] = b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20
    lines = ["image_name| comment_number| comment"]
    for name in images:
        for j in range(5):
            lines.append(f"{name}| {j}| picture {name[:-4]} caption number {j} .")
    malformed = lines.index("2199200615.jpg| 4| picture 2199200615 caption number 4 .")
    lines[malformed] = MALFORMED
    lines.append(lines[7])  # a duplicate row
    rows = {"malformed": malformed + 1, "duplicate": len(lines), "original": 8}
    return images, ("\n".join(lines) + "\n").encode(), rows


def kaggle_flickr30k_zip(path: Path) -> Path:
    """Kaggle's layout: flickr30k_images/{results.csv, flickr30k_images/}, plus a redundant nested copy of both."""
    images, results, _ = flickr30k_files()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for top in ["flickr30k_images", "flickr30k_images/flickr30k_images"]:
            zf.writestr(f"{top}/results.csv", results)
            for name, data in images.items():
                zf.writestr(f"{top}/flickr30k_images/{name}", data)
    return path


class FakeKaggle:
    """Kaggle's dataset_download_files: writes <dataset>.zip into `path`; the first `broken` calls write half of it."""

    def __init__(self, zip_file: Path, broken: int = 0):
        self.data, self.broken, self.calls = zip_file.read_bytes(), broken, []

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append((dataset, force))
        data = self.data[:len(self.data) // 2] if len(self.calls) <= self.broken else self.data
        (Path(path) / (dataset.split("/")[1] + ".zip")).write_bytes(data)


@pytest.fixture(autouse=True)
def no_real_credentials(tmp_path, monkeypatch):
    """A HOME without Kaggle files, no Kaggle variables, no terminal, no kaggle.json in the repo folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ["KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setattr("kaggle_auth.REPO_DIR", tmp_path / "repo")


@pytest.fixture
def kaggle_zip(tmp_path) -> Path:
    return kaggle_flickr30k_zip(tmp_path / "built.zip")


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KEY)


def run(argv, fake: FakeKaggle | None = None, seen: list | None = None) -> int:
    def connect(creds):
        if fake is None:
            raise AssertionError("nothing should have been downloaded")
        if seen is not None:
            seen.append(creds)
        return fake

    return download.main(argv, connect=connect)


def report_of(folder: Path) -> dict:
    return json.loads((folder / "prepare_report.json").read_text())


def test_download_prepares_flickr30k(tmp_path, kaggle_zip, with_key, capsys):
    out, fake, seen = tmp_path / "flickr30k", FakeKaggle(kaggle_zip), []
    assert run(["--out", str(out), "--workers", "2"], fake, seen) == 0
    printed = capsys.readouterr().out
    images, results, rows = flickr30k_files()

    assert fake.calls == [(SLUG, False)]
    assert seen[0].username == "alice" and "KAGGLE_USERNAME and KAGGLE_KEY" in printed and KEY not in printed
    # one copy, in our format; the caption file byte for byte; the download deleted after extraction
    assert sorted(p.name for p in out.iterdir()) == ["images", "prepare_report.json", "results.csv"]
    assert (out / "results.csv").read_bytes() == results
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(images)
    report = report_of(out)
    assert report["repaired_rows"][0]["line"] == rows["malformed"] and len(report["repaired_rows"]) == 1
    assert report["duplicate_rows"] == [{"line": rows["duplicate"], "first_line": rows["original"],
                                         "file": "results.csv"}]
    assert report["dropped_rows"] == []
    assert report["bad_images"] == [CORRUPT] and "excluded 1 images that cannot be decoded" in printed
    assert (report["images"], report["captions"]) == (N_GOOD, 5 * N_GOOD)  # grayscale and CMYK are usable
    assert (report["image_files"], report["caption_rows"]) == (N_GOOD + 1, 5 * (N_GOOD + 1) + 1)
    assert report["splits"] == {"train": N_GOOD - 4, "val": 2, "test": 2}  # 5% each for val and test
    # the real data set's counts are checked: this tiny zip is reported as not matching them
    assert any("expected 31,783 images" in w for w in report["warnings"]) and "WARNING: expected" in printed
    # and the repaired row trains with its caption
    data = CaptionData(out, verbose=False)
    assert "A dog runs across the grass ." in data.captions["2199200615.jpg"]
    assert CORRUPT not in data.names


def test_counts_matching_the_data_set_give_no_warning(tmp_path, kaggle_zip, monkeypatch):
    spec = dataclasses.replace(prepare.DATASETS["flickr30k"], images=N_GOOD + 1, captions=5 * (N_GOOD + 1) + 1)
    monkeypatch.setitem(prepare.DATASETS, "flickr30k", spec)
    assert run(["--zip", str(kaggle_zip), "--out", str(tmp_path / "d")]) == 0
    assert report_of(tmp_path / "d")["warnings"] == []


def test_counts_are_checked_only_against_a_data_set_named_for_this_run(tmp_path, kaggle_zip, capsys):
    # your own data in a captions.txt (the name Flickr8k's file has too), once prepared with --dataset flickr8k
    names = [f"{i}.jpg" for i in range(20)]
    mine = caption_folder(tmp_path, "captions.txt", "".join(["image,caption\n", *(f"{n},picture {n}\n"
                                                                                   for n in names)]).encode(), names)
    assert run(["--dataset", "flickr8k", "--prepare", str(mine), "--workers", "1"]) == 0
    warning = report_of(mine)["warnings"][0]
    assert warning.startswith("expected 8,091 images for flickr8k") and f"`python download.py --prepare {mine}`" \
        in warning  # says how to silence it
    capsys.readouterr()
    assert run(["--prepare", str(mine), "--workers", "1"]) == 0  # the data set is not remembered from the report
    assert (report_of(mine)["dataset"], report_of(mine)["warnings"]) == (None, [])
    assert "WARNING" not in capsys.readouterr().out
    # a download always checks, even where a plain --prepare rewrote the report since
    out = tmp_path / "flickr30k"
    assert run(["--zip", str(kaggle_zip), "--out", str(out)]) == 0 and run(["--prepare", str(out)]) == 0
    assert run(["--zip", str(kaggle_zip), "--out", str(out)]) == 0
    assert report_of(out)["dataset"] == "flickr30k" and "expected 31,783 images" in report_of(out)["warnings"][0]


def test_second_run_verifies_quickly_and_downloads_nothing(tmp_path, kaggle_zip, with_key, monkeypatch, capsys):
    out, fake = tmp_path / "flickr30k", FakeKaggle(kaggle_zip)
    run(["--out", str(out)], fake)
    stamp = (out / "prepare_report.json").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.delenv("KAGGLE_KEY")  # no credentials are needed for data that is already there
    monkeypatch.setattr(prepare, "find_bad_images", lambda *a: pytest.fail("images were decoded again"))
    assert run(["--out", str(out)], fake) == 0
    assert fake.calls == [(SLUG, False)]
    assert "already prepared and unchanged" in capsys.readouterr().out
    assert (out / "prepare_report.json").stat().st_mtime_ns == stamp


def test_a_moved_data_folder_is_still_prepared_and_unchanged(tmp_path, kaggle_zip, monkeypatch, capsys):
    """Moving a folder (on one file system) keeps every file's inode and times: its report still holds."""
    assert run(["--zip", str(kaggle_zip), "--out", str(tmp_path / "flickr30k")]) == 0
    os.rename(tmp_path / "flickr30k", tmp_path / "moved")
    assert CaptionData(tmp_path / "moved", verbose=False).report_is_current()
    capsys.readouterr()
    monkeypatch.setattr(prepare, "find_bad_images", lambda *a: pytest.fail("images were decoded again"))
    assert run(["--out", str(tmp_path / "moved")]) == 0  # (--prepare DIR re-verifies on purpose)
    assert "already prepared and unchanged" in capsys.readouterr().out


def test_interrupted_extraction_is_redone(tmp_path, kaggle_zip, with_key, monkeypatch, capsys):
    out, fake = tmp_path / "flickr30k", FakeKaggle(kaggle_zip)
    real, calls = prepare.extract_member, []

    def dies_midway(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(prepare, "extract_member", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run(["--out", str(out)], fake)
    assert (out / prepare.STAGING).exists() and not (out / "prepare_report.json").exists()
    monkeypatch.setattr(prepare, "extract_member", real)
    assert run(["--out", str(out)], fake) == 0
    assert "interrupted; extracting again" in capsys.readouterr().out
    assert fake.calls == [(SLUG, False)]  # the complete zip was kept for the second try
    assert len(list((out / "images").iterdir())) == N_GOOD + 1 and not (out / prepare.STAGING).exists()
    assert report_of(out)["images"] == N_GOOD and not (out / "flickr-image-dataset.zip").exists()


def test_partial_download_is_detected_and_redone(tmp_path, kaggle_zip, with_key, capsys):
    out, fake = tmp_path / "flickr30k", FakeKaggle(kaggle_zip, broken=1)
    out.mkdir()
    (out / "flickr-image-dataset.zip").write_bytes(kaggle_zip.read_bytes()[:1000])  # an earlier run cut short
    assert run(["--out", str(out), "--keep-zip"], fake) == 0
    printed = capsys.readouterr().out
    assert "is incomplete" in printed and "downloading it again from the start" in printed
    assert fake.calls == [(SLUG, False), (SLUG, True)]  # resume first, then from scratch
    assert (out / "flickr-image-dataset.zip").read_bytes() == kaggle_zip.read_bytes()  # --keep-zip
    assert report_of(out)["images"] == N_GOOD


def test_credentials_are_found_before_a_download_is_announced(tmp_path, kaggle_zip, monkeypatch, capsys):
    out = tmp_path / "flickr30k"
    out.mkdir()
    (out / "flickr-image-dataset.zip").write_bytes(kaggle_zip.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="no Kaggle credentials found"):
        run(["--out", str(out)])
    printed = capsys.readouterr().out
    assert "downloading" not in printed and "continuing the download" not in printed
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    assert run(["--out", str(out)], FakeKaggle(kaggle_zip)) == 0
    printed = capsys.readouterr().out
    assert printed.index("Kaggle credentials: ") < printed.index("continuing the download") < printed.index(
        f"downloading {SLUG}")


@pytest.mark.parametrize("offline", [False, True])
def test_credential_failures_name_the_zip_to_download_by_hand_and_the_command_for_it(tmp_path, offline, monkeypatch):
    def connect(creds):  # kaggle 2.x checks a token with Kaggle's servers: offline, that fails before any download
        raise kaggle_auth.CredentialsError("could not reach Kaggle to check the credentials")

    if offline:
        monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    out = tmp_path / "my data"
    with pytest.raises(SystemExit) as e:
        download.main(["--dataset", "flickr8k", "--out", str(out)], connect=connect)
    message = str(e.value)
    assert ("could not reach Kaggle" if offline else "no Kaggle credentials found") in message
    assert "https://www.kaggle.com/datasets/adityajn105/flickr8k" in message
    assert f"python download.py --dataset flickr8k --zip PATH --out '{out}'" in message


def test_zip_flag_needs_no_credentials_and_keeps_the_zip(tmp_path, kaggle_zip):
    out = tmp_path / "flickr30k"
    assert run(["--zip", str(kaggle_zip), "--out", str(out)]) == 0  # the fake fails the test if called
    assert kaggle_zip.exists() and report_of(out)["images"] == N_GOOD


@pytest.mark.parametrize("copy_differs", [False, True])
def test_zip_unzipped_by_hand_is_moved_into_place(tmp_path, kaggle_zip, copy_differs):
    out = tmp_path / "flickr30k"
    with zipfile.ZipFile(kaggle_zip) as zf:
        zf.extractall(out)
    nested = out / "flickr30k_images" / "flickr30k_images" / "flickr30k_images"
    if copy_differs:
        (nested / CORRUPT).write_bytes(b"not the same file")
    assert run(["--out", str(out)]) == 0  # nothing downloaded: the fake fails the test if called
    # one copy moved into place; the nested one deleted only if it really is a copy
    assert (out / "results.csv").read_bytes() == flickr30k_files()[1] and report_of(out)["images"] == N_GOOD
    assert sorted(p.name for p in (out / "images").iterdir() if p.is_file()) == sorted(flickr30k_files()[0])
    left = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*") if p.is_file())
    assert len(left) == (2 * N_GOOD + 2 if copy_differs else N_GOOD + 1)
    assert sorted(p.name for p in out.iterdir()) == ["images", "prepare_report.json", "results.csv"]


@pytest.mark.parametrize("prepared", [True, False])
def test_out_above_data_sets_takes_none_of_them_apart(tmp_path, kaggle_zip, prepared):
    """`--out data` for `--out data/flickr30k`, where data/ holds data sets (prepared, or laid out as ours and not
    yet prepared): unzipping by hand is not assumed, nothing is moved or deleted, and the message names --out."""
    data = tmp_path / "data"
    assert run(["--zip", str(kaggle_zip), "--out", str(data / "flickr30k")]) == 0
    shutil.copytree(data / "flickr30k", data / "copy")  # a redundant copy, as adopting would delete
    if not prepared:
        for folder in ("flickr30k", "copy"):
            (data / folder / "prepare_report.json").unlink()
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    with pytest.raises(SystemExit, match=r"holds data sets of its own \(copy, flickr30k\).*nothing was moved.*--out "
                                         r".*data/flickr30k"):
        run(["--out", str(data)])  # the fake Kaggle fails the test if a download starts
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before


def test_prepare_on_the_kaggle_zip_unzipped_by_hand_points_to_out(tmp_path, kaggle_zip):
    with zipfile.ZipFile(kaggle_zip) as zf:
        zf.extractall(tmp_path / "unzipped")
    with pytest.raises(SystemExit, match=r"unzipped by hand.*python download.py --out .*unzipped"):
        run(["--prepare", str(tmp_path / "unzipped")])
    assert sorted(p.name for p in (tmp_path / "unzipped").iterdir()) == ["flickr30k_images"]  # --prepare moves nothing


def test_damaged_zip_is_refused_and_left_unchanged(tmp_path, kaggle_zip):
    data = bytearray(kaggle_zip.read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = bytes(64)  # bytes lost in the middle of the images
    kaggle_zip.write_bytes(data)
    with pytest.raises(SystemExit, match="built.zip is damaged"):
        run(["--zip", str(kaggle_zip), "--out", str(tmp_path / "d")])
    assert kaggle_zip.read_bytes() == data and not (tmp_path / "d" / "prepare_report.json").exists()
    assert not (tmp_path / "d").exists()  # no hidden staging folder of half the images is left behind


def test_full_disk_is_said_before_extracting(tmp_path, kaggle_zip, monkeypatch):
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
    with pytest.raises(SystemExit, match=r"needs 0.0 GB in .*, but only 0.0 GB are free"):
        run(["--zip", str(kaggle_zip), "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d" / prepare.STAGING).exists()


def test_zip_of_another_data_set_says_so(tmp_path):
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as zf:
        zf.writestr("captions.txt", "image,caption\na.jpg,a dog\n")
        zf.writestr("Images/a.jpg", jpeg((1, 2, 3)))
    with pytest.raises(SystemExit, match=r"no results.csv.*\['captions.txt'\].*--dataset flickr8k"):
        run(["--zip", str(tmp_path / "archive.zip"), "--out", str(tmp_path / "d")])


# --- splits ---

def karpathy_json(path: Path, splits: dict) -> Path:
    """Karpathy's dataset_flickr30k.json: one entry per image with its split, sentences and ids."""
    images = [{"filename": name, "split": split, "sentences": [{"raw": "a caption", "tokens": ["a", "caption"]}]}
              for split, names in splits.items() for name in names]
    for i, image in enumerate(images):
        image.update(imgid=i, sentids=[5 * i + j for j in range(5)])
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return path


def karpathy_txt(folder: Path, splits: dict) -> Path:
    """flickr30k_{split}_karpathy.txt: a header, then `image,caption` rows, five per image, commas in captions."""
    folder.mkdir(exist_ok=True)
    for s, names in splits.items():
        rows = [f"{n},A man, in a hat, number {j} ." for n in names for j in range(5)]
        (folder / f"flickr30k_{s}_karpathy.txt").write_text("\n".join(["image,caption", *rows]) + "\n")
    return folder / "flickr30k_test_karpathy.txt"


NAMES = [f"{1000000000 + i}.jpg" for i in range(12)]
KARPATHY = {"train": NAMES[:6], "restval": NAMES[6:8], "val": NAMES[8:10], "test": NAMES[10:]}
EXPECTED = {"train": NAMES[:8], "val": NAMES[8:10], "test": NAMES[10:]}


def test_karpathy_json_split(tmp_path):
    assert prepare.read_split_file(karpathy_json(tmp_path / "dataset_flickr30k.json", KARPATHY)) == EXPECTED


def test_karpathy_txt_lists(tmp_path):
    # name any one of the three lists; the others are found beside it
    splits = {"train": EXPECTED["train"], "val": EXPECTED["val"], "test": EXPECTED["test"]}
    assert prepare.read_split_file(karpathy_txt(tmp_path / "lists", splits)) == EXPECTED
    (tmp_path / "lists" / "flickr30k_val_karpathy.txt").unlink()
    with pytest.raises(prepare.PrepareError, match="flickr30k_val_karpathy.txt"):
        prepare.read_split_file(tmp_path / "lists" / "flickr30k_train_karpathy.txt")


@pytest.mark.parametrize("images, message", [
    ([{"split": "train", "file": "1.jpg"}], r"images\[0\] is \{'split': 'train', 'file': '1.jpg'\}, not an entry "
                                            r"with a \"filename\""),
    ([{"filename": "1.jpg", "split": "train"}, "2.jpg"], r"images\[1\] is 2.jpg, not an entry"),
])
def test_a_malformed_karpathy_json_names_its_entry(tmp_path, images, message):
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(prepare.PrepareError, match=r"--split-file .*dataset_flickr30k.json: " + message):
        prepare.read_split_file(tmp_path / "dataset_flickr30k.json")


def test_split_lists_with_a_name_that_is_not_utf8_are_read(tmp_path):
    splits = {"train": EXPECTED["train"], "val": EXPECTED["val"], "test": EXPECTED["test"]}
    listed = karpathy_txt(tmp_path / "lists", splits)
    (tmp_path / "lists" / "flickr30k_train_karpathy.txt").write_bytes(b"caf\xe9.jpg,a cafe\n")  # Windows-1252
    assert prepare.read_split_file(listed)["train"] == [os.fsdecode(b"caf\xe9.jpg")]  # as the disk spells it


def test_split_file_sizes_reach_the_report_and_training_data(tmp_path, kaggle_zip):
    names = sorted(flickr30k_files()[0])
    splits = {"train": names[:30], "val": names[30:35], "test": [*names[35:], "9999999999.jpg"]}
    out = tmp_path / "flickr30k"
    split_file = karpathy_json(tmp_path / "dataset_flickr30k.json", splits)
    assert run(["--zip", str(kaggle_zip), "--out", str(out), "--split-file", str(split_file)]) == 0
    # the corrupt image and the one missing here leave the test split
    expected = {"train": 30, "val": 5, "test": len(names) - 35 - 1}
    assert CORRUPT in splits["test"] and report_of(out)["splits"] == expected
    assert report_of(out)["split_rule"] == "splits.json"
    assert {s: len(split) for s, split in CaptionData(out, verbose=False).splits.items()} == expected

    # a split file naming none of this folder's val images is refused, and the one that works stays in place
    unusable = karpathy_json(tmp_path / "other.json", {**splits, "val": ["1.jpg", "2.jpg"]})
    with pytest.raises(SystemExit, match="--split-file .*other.json does not fit"):
        run(["--prepare", str(out), "--split-file", str(unusable)])
    assert {s: len(split) for s, split in CaptionData(out, verbose=False).splits.items()} == expected


def test_captioned_images_a_split_file_leaves_out_are_counted(tmp_path, capsys):
    names = [f"{i:02d}.jpg" for i in range(12)]
    folder = caption_folder(tmp_path, "captions.csv", "".join(["image,caption\n", *(f"{n},picture {n}\n"
                                                                                   for n in names)]).encode(), names)
    split_file = tmp_path / "few.json"
    split_file.write_text(json.dumps({"train": names[:2], "val": names[2:3], "test": names[3:4]}))
    assert run(["--prepare", str(folder), "--split-file", str(split_file), "--workers", "1"]) == 0
    assert "note: 8 captioned images are in none of the split file's splits, so no run uses them" \
        in capsys.readouterr().out
    assert report_of(folder)["images_in_no_split"] == names[4:]
    split_file.write_text(json.dumps({"train": names[:10], "val": names[10:11], "test": names[11:]}))
    assert run(["--prepare", str(folder), "--split-file", str(split_file), "--workers", "1"]) == 0  # every image
    assert "note" not in capsys.readouterr().out and report_of(folder)["images_in_no_split"] == []


def test_a_bad_split_file_stops_the_run_before_anything_is_downloaded(tmp_path, kaggle_zip, with_key):
    out, fake = tmp_path / "flickr30k", FakeKaggle(kaggle_zip)
    with pytest.raises(SystemExit, match="--split-file .*nope.json: no such file"):
        run(["--out", str(out), "--split-file", str(tmp_path / "nope.json")], fake)
    (tmp_path / "two.json").write_text(json.dumps({"train": ["a.jpg"], "val": ["a.jpg"], "test": ["b.jpg"]}))
    with pytest.raises(SystemExit, match="two.json: image a.jpg is in both the train and the val split"):
        run(["--out", str(out), "--split-file", str(tmp_path / "two.json")], fake)
    assert fake.calls == [] and not out.exists()


def test_an_empty_data_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is empty .*python download.py"):
        CaptionData(tmp_path, verbose=False)


# --- other formats feed train.py ---

def shapes_as_csv(tmp_path, n: int, captions_per_image) -> tuple[list[str], list[tuple[str, str]]]:
    """Shapes pictures and their captions as (image, caption) rows, with `captions_per_image(i)` captions each."""
    src = make_shapes(tmp_path / "src", num_images=n, width=32, height=32)
    by_image = {}
    for line in (src / "results.csv").read_text().splitlines()[1:]:
        image, _, caption = (f.strip() for f in line.split("|"))
        by_image.setdefault(image, []).append(caption)
    rows = [(image, caps[j % 5]) for i, (image, caps) in enumerate(by_image.items())
            for j in range(captions_per_image(i))]
    return list(by_image), rows


def csv_text(rows) -> str:
    """`image,caption` with a header; captions with commas quoted, as pandas writes them."""
    return "image,caption\n" + "".join(f'{image},"{caption}"\n' if "," in caption else f"{image},{caption}\n"
                                       for image, caption in rows)


def train_one_epoch(data_dir: Path, run_dir: Path, *extra) -> dict:
    return train.main(TINY + ["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--epochs", "1", *extra])


def test_flickr8k_zip_feeds_training(tmp_path):
    images, rows = shapes_as_csv(tmp_path, 30, lambda i: 5)
    with zipfile.ZipFile(tmp_path / "flickr8k.zip", "w") as zf:  # Kaggle's adityajn105/flickr8k layout
        zf.writestr("captions.txt", csv_text(rows))
        for name in images:
            zf.write(tmp_path / "src" / "images" / name, f"Images/{name}")
    out = tmp_path / "flickr8k"
    assert run(["--dataset", "flickr8k", "--zip", str(tmp_path / "flickr8k.zip"), "--out", str(out)]) == 0
    report = report_of(out)
    assert (report["images"], report["captions"], report["caption_file"]) == (30, 150, "captions.txt")
    assert any("expected 8,091 images for flickr8k" in w for w in report["warnings"])
    metrics = train_one_epoch(out, tmp_path / "run")
    assert (metrics["test_n_images"], metrics["test_n_captions"]) == (2, 10)


def test_bring_your_own_folder_feeds_training(tmp_path, capsys):
    images, rows = shapes_as_csv(tmp_path, 30, lambda i: 1 + i % 4)  # 1 to 4 captions per image
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "src" / "images").rename(mine / "images")
    (mine / "captions.csv").write_text(csv_text(rows))
    assert run(["--prepare", str(mine)]) == 0
    report = report_of(mine)
    assert (report["images"], report["captions"]) == (30, len(rows)) and report["warnings"] == []
    assert report["dataset"] is None  # your own data: no expected counts
    data = CaptionData(mine, verbose=False)
    test_captions = sum(len(data.captions[n]) for n in data.splits["test"].images)
    metrics = train_one_epoch(mine, tmp_path / "run")
    assert (metrics["test_n_images"], metrics["test_n_captions"]) == (2, test_captions)


def test_kaggle_key_never_reaches_logs_metrics_or_checkpoints(tmp_path, kaggle_zip, with_key, capsys):
    out, run_dir = tmp_path / "flickr30k", tmp_path / "run"
    run(["--out", str(out), "--workers", "1"], FakeKaggle(kaggle_zip))
    # JPEGs decoded every step: the corrupt one must have been excluded at prepare time, or this would crash
    metrics = train_one_epoch(out, run_dir, "--image-cache", "off")
    assert metrics["test_n_images"] == 2
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "checkpoint.json" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    assert [p for p in files if KEY.encode() in p.read_bytes()] == []


@pytest.mark.parametrize("argv, message", [
    (["--num-images", "100"], "--num-images does not apply to a Kaggle data set: it is for --dataset shapes"),
    (["--dataset", "flickr8k", "--seed", "1"], "--seed does not apply to a Kaggle data set"),
    (["--prepare", "data/x", "--image-size", "32x32"], "--image-size does not apply to --prepare"),
    (["--dataset", "shapes", "--split-file", "splits.json"], "--split-file does not apply to the built-in set"),
    (["--dataset", "shapes", "--zip", "x.zip"], "--zip does not apply to the built-in set"),
    (["--dataset", "shapes", "--keep-zip"], "--keep-zip does not apply to the built-in set"),
])
def test_a_flag_for_another_kind_of_data_set_is_refused_not_ignored(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run([*argv, "--out", str(tmp_path / "out")] if "--prepare" not in argv else argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_kaggle_json_may_name_the_folder_that_holds_it(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "kaggle.json").write_text(json.dumps({"username": "alice", "key": KEY}))
    creds = kaggle_auth.resolve_credentials(str(folder), interactive=False)
    assert (creds.username, creds.key) == ("alice", KEY) and str(folder / "kaggle.json") in creds.describe()
    with pytest.raises(kaggle_auth.CredentialsError, match="is a folder without a kaggle.json; name the file"):
        kaggle_auth.resolve_credentials(str(tmp_path), interactive=False)


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "128"], "--image-size must look like 128x128"),
    (["--image-size", "0x0"], "drawn at 16 to 4096 pixels a side"),
    (["--image-size=-5x10"], "drawn at 16 to 4096 pixels a side"),
    (["--image-size", "200x8"], "drawn at 16 to 4096 pixels a side"),  # each side
    (["--image-size", "16x100000"], "drawn at 16 to 4096 pixels a side"),  # PIL fails on it mid-draw
    (["--num-images", "5"], "--num-images must be at least 20"),
    (["--workers", "-1"], "--workers must not be negative"),
    (["--workers", "100000"], "--workers 100000 is far more than this machine's"),  # each starts in seconds
    (["--prepare", "data/mine"], "--prepare DIR works on DIR as it is; it takes no --zip or --out"),
])
def test_bad_flags_are_refused_before_drawing(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        download.main(["--dataset", "shapes", "--out", str(tmp_path / "shapes"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()


@pytest.mark.parametrize("flag", ["--prepare", "--out", "--zip", "--split-file", "--kaggle-json"])
def test_an_empty_path_is_refused_not_read_as_the_flag_left_out(flag, tmp_path, monkeypatch, capsys):
    """`--prepare "$DIR"` with DIR unset must not fall through to downloading 4 GB, nor `--out ''` draw into the
    default folder."""
    monkeypatch.chdir(tmp_path)
    connect = []
    with pytest.raises(SystemExit) as e:
        download.main([flag, ""], connect=connect.append)
    assert e.value.code == 2 and f"argument {flag}: is empty (an unset shell variable?)" in capsys.readouterr().err
    assert connect == [] and list(tmp_path.iterdir()) == []


def test_shapes_are_drawn_once_per_request_and_redrawn_clean_for_another(tmp_path, capsys):
    out = tmp_path / "shapes"
    args = ["--dataset", "shapes", "--out", str(out), "--image-size", "32x32"]
    assert download.main(args + ["--num-images", "30"]) == 0
    stamp = (out / "results.csv").stat().st_mtime_ns
    assert download.main(args + ["--num-images", "30"]) == 0
    assert "already holds this set" in capsys.readouterr().out and (out / "results.csv").stat().st_mtime_ns == stamp
    assert download.main(args + ["--num-images", "25"]) == 0  # another set: no image of the old one stays behind
    assert len(list((out / "images").iterdir())) == 25 and len(CaptionData(out, verbose=False).names) == 25
    assert f"note: {out} holds another shapes set ({{'num_images': 30, " in capsys.readouterr().out  # and says so
    captions = (out / "results.csv").read_text()
    assert download.main(args + ["--num-images", "25", "--seed", "1"]) == 0
    assert (out / "results.csv").read_text() != captions  # another seed, another set
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        download.main(args + ["--num-images", "20"])
    assert "holds files a shapes set does not make (['notes.txt'])" in capsys.readouterr().err


def test_an_interrupted_first_shapes_draw_is_redrawn_on_rerun(tmp_path, monkeypatch):
    out, real = tmp_path / "shapes", download.make_shapes

    def dies_midway(out_dir, *args, **kwargs):
        (Path(out_dir) / "images").mkdir(parents=True)
        (Path(out_dir) / "images" / "0.png").write_bytes(b"half drawn")
        raise KeyboardInterrupt

    args = ["--dataset", "shapes", "--out", str(out), "--num-images", "20", "--image-size", "32x32"]
    monkeypatch.setattr(download, "make_shapes", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        download.main(args)
    monkeypatch.setattr(download, "make_shapes", real)
    assert download.main(args) == 0  # the folder is ours: redrawn, not refused as another data set
    assert len(list((out / "images").iterdir())) == 20 and len(CaptionData(out, verbose=False).names) == 20


def test_shapes_never_overwrite_another_data_set(tmp_path, kaggle_zip, capsys):
    out = tmp_path / "flickr30k"
    assert run(["--zip", str(kaggle_zip), "--out", str(out)]) == 0
    (out / "tokenizer").mkdir()  # what training adds: still only names a shapes folder holds too
    before = sorted(p.name for p in (out / "images").iterdir())
    with pytest.raises(SystemExit) as e:
        download.main(["--dataset", "shapes", "--out", str(out), "--num-images", "20", "--image-size", "32x32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{out} already holds images/ or results.csv" in err and "another --out" in err
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert (out / "results.csv").read_bytes() == flickr30k_files()[1]


def test_zip_given_for_a_folder_that_already_holds_a_data_set_is_not_used_and_says_so(tmp_path, kaggle_zip, capsys):
    out = tmp_path / "flickr30k"
    assert run(["--zip", str(kaggle_zip), "--out", str(out)]) == 0
    other = kaggle_flickr30k_zip(tmp_path / "newer.zip")
    capsys.readouterr()
    assert run(["--zip", str(other), "--out", str(out)]) == 0  # the data set there is kept, not replaced
    printed = capsys.readouterr().out
    assert f"--zip {other} was not used: {out} already holds a data set" in printed and "another --out" in printed


def test_out_naming_a_file_says_so_and_points_a_zip_to_zip(tmp_path, kaggle_zip, capsys):
    for argv in [["--out", str(kaggle_zip)], ["--dataset", "shapes", "--out", str(kaggle_zip)]]:
        with pytest.raises(SystemExit) as e:
            download.main(argv, connect=lambda creds: pytest.fail("connected"))
        assert e.value.code == 2 and f"--out {kaggle_zip} is a file, not a folder" in capsys.readouterr().err
    assert kaggle_zip.read_bytes()[:2] == b"PK"


def test_out_that_cannot_be_created_is_one_line_not_a_traceback(tmp_path, kaggle_zip, monkeypatch):
    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(SystemExit, match=r"error: cannot create .*flickr30k \(Permission denied\); choose"):
        run(["--zip", str(kaggle_zip), "--out", str(tmp_path / "ro" / "flickr30k")])


def test_zip_flag_naming_a_folder_says_so(tmp_path):
    (tmp_path / "unzipped").mkdir()
    with pytest.raises(SystemExit, match="--zip .*unzipped is a folder, not a zip file"):
        run(["--zip", str(tmp_path / "unzipped"), "--out", str(tmp_path / "d")])


def test_a_failed_download_leaves_no_empty_folder_behind(tmp_path, kaggle_zip):
    with pytest.raises(SystemExit, match="no Kaggle credentials found"):
        run(["--out", str(tmp_path / "new" / "flickr30k")])
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(SystemExit, match="no such file"):
        run(["--zip", str(tmp_path / "missing.zip"), "--out", str(existing)])
    assert existing.is_dir()  # a folder that was there before stays


def test_the_folder_with_most_images_wins_over_a_shallower_one():
    names = ["top/results.csv", "top/sample.jpg", "top/flickr30k_images/1.jpg", "top/flickr30k_images/2.jpg"]
    caption, images, skipped = prepare.locate(names, prepare.DATASETS["flickr30k"], "x.zip")
    assert images == ["top/flickr30k_images/1.jpg", "top/flickr30k_images/2.jpg"] and skipped == ["top"]


def test_no_two_shapes_pictures_share_a_description(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "_draw_one", lambda job: None)  # captions only; drawing is not under test
    out = shapes.make_shapes(tmp_path / "s", num_images=3000, width=16, height=16, seed=0)
    lines = (out / "results.csv").read_text().splitlines()[1:]
    assert len(lines) == 5 * 3000
    scenes = set()
    for line in lines[::5]:  # caption 0: every object with size, colour and position, and the background
        body, background = re.fullmatch(r"\S+\| 0\| (.*) on an? (\w+) background", line).groups()
        scenes.add((background, tuple(sorted(re.split(r", | and ", body)))))
    assert len(scenes) == 3000


def test_a_shapes_picture_and_its_captions_say_the_same():
    """A large orange circle at the top right and a small blue square at the bottom: drawn there, in those colours
    and sizes, and so described."""
    things = (shapes.Thing("circle", "orange", "large", (2, 0)), shapes.Thing("square", "blue", "small", (1, 2)))
    pixels = np.asarray(shapes.draw("white", things, 96, 96, random.Random(0))).astype(int)
    orange, blue = (np.abs(pixels - shapes.COLOURS[c]).max(axis=-1) < 30 for c in ("orange", "blue"))
    assert orange[16, 80] and blue[80, 48]  # (row, column): the middles of the top-right and bottom-middle cells
    assert orange.sum() > 2 * blue.sum()  # large against small
    full, _, counted, biggest, colours = shapes.captions("white", things, random.Random(0))
    assert full == "a large orange circle in the top right and a small blue square at the bottom on a white background"
    assert counted in ("two shapes: a large orange circle and a small blue square",
                       "two shapes: a small blue square and a large orange circle")
    assert re.fullmatch(r"a picture with an? (large|big|huge) orange (circle|disc|round shape) .*", biggest)
    assert re.fullmatch(r"a white image showing an orange (circle|disc|round shape) and a blue (square|box|block)",
                        colours)


def test_shapes_scenes_put_one_object_in_a_cell_and_captions_use_every_word_for_a_shape():
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng) for _ in range(300)]
    assert all(len({t.cell for t in things}) == len(things) for _, things in scenes)
    background, things = next(scene for scene in scenes if len(scene[1]) == 1)
    assert shapes.captions(background, things, rng)[2].startswith(f"one shape: {shapes.article(things[0].size)} ")
    circle = (shapes.Thing("circle", "red", "small", (1, 1)),)
    words = {re.search("circle|disc|round shape", shapes.captions("grey", circle, random.Random(i))[1]).group()
             for i in range(20)}
    assert words == set(shapes.SHAPES["circle"])


def test_a_folder_holding_part_of_a_data_set_is_refused_before_the_download(tmp_path, with_key):
    """Captions and loose pictures put in --out by hand: said at once, not after 4 GB of download."""
    out = tmp_path / "flickr30k"
    out.mkdir()
    images, results, _ = flickr30k_files()
    (out / "results.csv").write_bytes(results)
    for name in list(images)[:3]:
        (out / name).write_bytes(images[name])
    fake = FakeKaggle(kaggle_flickr30k_zip(tmp_path / "kaggle.zip"))
    with pytest.raises(SystemExit) as e:
        run(["--out", str(out)], fake)
    assert fake.calls == []
    assert f"{out} already holds ['results.csv'] but no complete data set" in str(e.value)
    assert f"move its 3 image files into {out / 'images'}" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.csv", *list(images)[:3]])  # nothing moved


def test_a_zip_that_splits_its_images_over_folders_loses_none_its_captions_name(tmp_path, capsys):
    images, results, _ = flickr30k_files()
    names = list(images)
    split = tmp_path / "split.zip"
    with zipfile.ZipFile(split, "w") as zf:
        zf.writestr("flickr30k/results.csv", results)
        for i, name in enumerate(names):
            zf.writestr(f"flickr30k/part{1 + (i >= len(names) * 2 // 3)}/{name}", images[name])
        zf.writestr("flickr30k/part2/sample.jpg", images[names[0]])  # named by no caption: stays behind
    out = tmp_path / "data"
    assert run(["--zip", str(split), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)
    rest = len(names) - len(names) * 2 // 3
    assert f", and {rest} more that results.csv names from ['flickr30k/part2']" in capsys.readouterr().out
