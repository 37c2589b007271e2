"""Broken and odd inputs, one kind per test: images that are converted or excluded at prepare time, caption rows
that are repaired or reported with their line numbers, split files that are refused with the file named."""

import errno
import io
import json
import os
import re
import unicodedata

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import download
import prepare as prepare_module
from captions import read_captions
from dataset import CaptionData, split_names
from images import build_cache, check_image, load_rgb
from prepare import prepare
from conftest import HEADER, caption_folder
from tokenizer import load_tokenizer

RED, BLUE = (230, 20, 20), (20, 20, 230)


def save(path, img: Image.Image, fmt: str = "JPEG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def noise(size=(48, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


# --- images that cannot be decoded: a reason, never an exception ---

def test_corrupt_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage" * 50)
    assert "cannot identify image file" in check_image(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)  # a JPEG header, then nonsense
    assert check_image(tmp_path / "b.jpg").startswith("OSError")


def test_truncated_image(tmp_path):
    data = jpeg_bytes(noise())
    (tmp_path / "a.jpg").write_bytes(data[:len(data) // 2])
    assert check_image(tmp_path / "a.jpg").startswith("OSError")


def test_zero_byte_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    assert check_image(tmp_path / "a.jpg") == "empty file (0 bytes)"


def test_one_pixel_image(tmp_path):
    assert check_image(save(tmp_path / "a.jpg", Image.new("RGB", (1, 1)))) == "too small (1x1)"


# --- images that are converted to RGB as they are loaded ---

def test_grayscale_image(tmp_path):
    path = save(tmp_path / "a.jpg", Image.new("L", (16, 16), 90))
    img = load_rgb(path)
    assert check_image(path) is None and img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - 90).max() <= 2


def test_cmyk_image(tmp_path):
    path = save(tmp_path / "a.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))  # pure red in CMYK
    r, g, b = np.asarray(load_rgb(path)).reshape(-1, 3).mean(0)
    assert check_image(path) is None and r > 200 and g < 60 and b < 60


def test_png_named_jpg(tmp_path):
    img = noise(seed=1)
    path = save(tmp_path / "a.jpg", img, "PNG")
    assert check_image(path) is None and np.array_equal(np.asarray(load_rgb(path)), np.asarray(img))


def test_exif_rotated_image(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path / "a.jpg", stored, exif=exif.tobytes(), quality=95)
    shown = np.asarray(load_rgb(path)).astype(int)
    assert check_image(path) is None and shown.shape == (40, 20, 3)  # portrait now
    assert np.abs(shown[5, 10] - RED).max() < 30 and np.abs(shown[35, 10] - BLUE).max() < 30  # red on top


def test_prepare_excludes_broken_images_and_keeps_convertible_ones(tmp_path, capsys):
    images = tmp_path / "data" / "images"
    good = [save(images / f"{i}.jpg", noise(seed=i)).name for i in range(12)]
    convertible = [save(images / "gray.jpg", Image.new("L", (16, 16), 9)).name,
                   save(images / "cmyk.jpg", Image.new("CMYK", (16, 16), (9, 9, 9, 9))).name,
                   save(images / "png.jpg", noise(seed=99), "PNG").name]
    (images / "corrupt.jpg").write_bytes(b"not an image")
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(jpeg_bytes(noise(seed=5))[:300])
    names = good + convertible + ["corrupt.jpg", "empty.jpg", "truncated.jpg"]
    (tmp_path / "data" / "results.csv").write_text(
        "image_name| comment_number| comment\n" + "".join(f"{n}| 0| picture {n}\n" for n in names))
    assert download.main(["--prepare", str(tmp_path / "data"), "--workers", "2"]) == 0
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["bad_images"] == ["corrupt.jpg", "empty.jpg", "truncated.jpg"]
    assert report["bad_image_reasons"]["empty.jpg"] == "empty file (0 bytes)"
    assert "excluded 3 images that cannot be decoded" in capsys.readouterr().out
    # training never meets them, even when it decodes JPEGs on the fly
    data = CaptionData(tmp_path / "data", verbose=False)
    assert data.names == sorted(good + convertible)
    data.open_images(24, mode="off")
    assert data.source.get(np.arange(len(data.names))).shape == (len(data.names), 24, 24, 3)


def test_prepare_decodes_every_image_again_even_where_the_folder_looks_unchanged(tmp_path):
    """--prepare DIR is how a folder is checked again: an image damaged in place, its size and time kept, is found."""
    names = ["0.jpg", "1.jpg", "2.jpg"]
    rows = b"".join(b"%s| 0| a picture\n" % n.encode() for n in names)
    folder = caption_folder(tmp_path, "results.csv", HEADER + rows, names)
    assert download.main(["--prepare", str(folder), "--workers", "1"]) == 0
    damaged = folder / "images" / names[0]
    before = damaged.stat()
    with open(damaged, "r+b") as f:
        f.write(bytes(before.st_size))
    os.utime(damaged, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert download.main(["--prepare", str(folder), "--workers", "1"]) == 0
    assert json.loads((folder / "prepare_report.json").read_text())["bad_images"] == [names[0]]


def test_the_report_counts_the_splits_training_uses_when_images_are_broken(tmp_path):
    """Splits are drawn over every captioned image on disk, then broken ones drop out where they fell."""
    images = tmp_path / "data" / "images"
    names = [save(images / f"{i:03d}.jpg", noise(size=(8, 8), seed=i)).name for i in range(60)]
    for name in split_names(names, tmp_path / "data")["test"][:2]:  # break two of the test images
        (images / name).write_bytes(b"not an image")
    (tmp_path / "data" / "results.csv").write_text(
        "image_name| comment_number| comment\n" + "".join(f"{n}| 0| picture {n}\n" for n in names))
    assert download.main(["--prepare", str(tmp_path / "data"), "--workers", "2"]) == 0
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    training = {s: len(split) for s, split in CaptionData(tmp_path / "data", verbose=False).splits.items()}
    assert report["splits"] == training == {"train": 54, "val": 3, "test": 1}


# --- caption rows ---

def test_missing_delimiters_are_repaired(tmp_path):
    folder = caption_folder(tmp_path, "results.csv", HEADER + b"a.jpg| 0| A cat .\n"
                            b"a.jpg| 4   A dog runs .\n"  # line 3: second '|' missing (the real file has one)
                            b"a.jpg 3| A bird sings .\n"  # line 4: first '|' missing
                            b"a.jpg| A fish\n")  # line 5: no comment number either: not repairable
    rows, report = read_captions(folder)
    assert [(line, caption) for line, _, caption in rows] == [(2, "A cat ."), (3, "A dog runs ."),
                                                              (4, "A bird sings .")]
    assert [r["line"] for r in report.repaired_rows] == [3, 4]
    assert [r["line"] for r in report.dropped_rows] == [5]


def test_missing_comma_is_repaired(tmp_path):
    folder = caption_folder(tmp_path, "captions.csv", b"image,caption\na.jpg,A cat\na.jpg A cow eats grass\n")
    rows, report = read_captions(folder)
    assert rows[1] == (3, "a.jpg", "A cow eats grass") and report.repaired_rows[0]["line"] == 3


def test_an_image_spelled_as_a_path_to_it_is_found(tmp_path):
    """`./a.jpg` and `images/a.jpg` (the image folder's own name) name a.jpg in images/; a real subfolder does not."""
    folder = caption_folder(tmp_path, "captions.csv", b"image,caption\n./a.jpg,A cat\nimages/b.jpg,A dog\n"
                            b"sub/c.jpg,A cow\nd.jpg,A hen\ne.jpg,A fox\n", ["a.jpg", "b.jpg", "sub/c.jpg", "d.jpg",
                                                                              "e.jpg"])
    assert [image for _, image, _ in read_captions(folder)[0]] == ["a.jpg", "b.jpg", "sub/c.jpg", "d.jpg", "e.jpg"]
    data = CaptionData(folder, verbose=False)
    assert sorted(name for split in data.splits.values() for name in split.images) == ["a.jpg", "b.jpg", "d.jpg",
                                                                                       "e.jpg"]


def test_empty_caption_is_dropped_with_its_line(tmp_path):
    folder = caption_folder(tmp_path, "results.csv", HEADER + b"a.jpg| 0| A cat .\na.jpg| 1|   \n")
    rows, report = read_captions(folder)
    assert len(rows) == 1 and report.dropped_rows == [{"line": 3, "reason": "empty caption", "text": "a.jpg",
                                                       "file": "results.csv"}]


def test_non_utf8_line_is_decoded_and_reported(tmp_path):
    folder = caption_folder(tmp_path, "results.csv", HEADER + "a.jpg| 0| A café .\n".encode()
                            + "a.jpg| 1| A crêpe stand .\n".encode("cp1252"))
    rows, report = read_captions(folder)
    assert rows[1][2] == "A crêpe stand ."
    assert [(r["line"], r["fix"]) for r in report.repaired_rows] == [(3, "not UTF-8, decoded as Windows-1252")]


def test_results_csv_without_header_keeps_its_first_row(tmp_path):
    rows, _ = read_captions(caption_folder(tmp_path, "results.csv", b"a.jpg| 0| A cat .\na.jpg| 1| A dog .\n"))
    assert [line for line, _, _ in rows] == [1, 2]


def test_csv_columns_commas_and_stray_quotes(tmp_path):
    folder = caption_folder(tmp_path, "captions.csv", b"caption,image,source\n"
                            b"A man, a plan,a.jpg,web\n"  # unquoted comma in the caption
                            b'"A ""quoted"" word",b.jpg,web\n'
                            b'"A stray quote,c.jpg,web\n'  # must not swallow the next line
                            b"A dog,d.jpg,web\n")
    rows, report = read_captions(folder)
    assert rows == [(2, "a.jpg", "A man, a plan"), (3, "b.jpg", 'A "quoted" word'), (5, "d.jpg", "A dog")]
    assert [r["line"] for r in report.dropped_rows] == [4]


def test_a_caption_longer_than_the_csv_module_reads_drops_its_row_alone(tmp_path):
    """Python's csv reader stops at fields of 131,072 characters, with an error naming neither file nor line."""
    folder = caption_folder(tmp_path, "captions.csv", b"image,caption\na.jpg,A cat\nb.jpg," + b"x" * 200_000
                            + b"\nc.jpg,A dog\n")
    rows, report = read_captions(folder)
    assert rows == [(2, "a.jpg", "A cat"), (4, "c.jpg", "A dog")]
    assert [(r["line"], r["reason"], r["file"]) for r in report.dropped_rows] == [
        (3, "a field of over 131,072 characters", "captions.csv")]


def test_a_quoted_caption_over_several_lines_is_joined_and_reported(tmp_path):
    """A line break typed into a spreadsheet cell: the caption is kept whole, not cut at the break (the rest of it
    dropped as a row of too few columns)."""
    folder = caption_folder(tmp_path, "captions.csv", b'image,caption\r\n'
                            b'a.jpg,"A dog on a beach,\nrunning\n\nafter a ball"\r\n'
                            b'b.jpg,A 5" screen\r\n'  # one quote, and the next line is a row: nothing joined
                            b"c.jpg,A cat\r\n")
    rows, report = read_captions(folder)
    assert rows == [(2, "a.jpg", "A dog on a beach, running after a ball"), (6, "b.jpg", 'A 5" screen'),
                    (7, "c.jpg", "A cat")]
    assert [(r["line"], r["fix"]) for r in report.repaired_rows] == [(2, "a quoted caption over lines 2-5, joined")]
    assert report.dropped_rows == []


@pytest.mark.parametrize("separator, named", [(";", "semicolons (';')"), ("\t", "tabs")])
def test_csv_with_another_separator_says_the_columns_need_commas(tmp_path, separator, named):
    folder = caption_folder(tmp_path, "captions.csv", f"image{separator}caption\na.jpg{separator}A cat\n".encode(),
                            images=["a.jpg"])
    message = rf"captions.csv: its columns are separated by {re.escape(named)}.*commas"
    with pytest.raises(SystemExit, match=message):
        download.main(["--prepare", str(folder), "--workers", "1"])
    with pytest.raises(ValueError, match=message):  # train.py, evaluate.py and search.py read it the same way
        CaptionData(folder, verbose=False)


def test_captions_for_missing_images_and_images_without_captions_are_reported(tmp_path):
    names = [f"{i}.jpg" for i in range(8)]
    folder = caption_folder(tmp_path, "results.csv", HEADER + "".join(
        f"{n}| 0| picture {n}\n" for n in [*names[:-1], "ghost.jpg"]).encode(), images=names)
    report = prepare(folder, workers=1)
    assert report["dropped_rows"] == [{"line": 9, "reason": "no image ghost.jpg in images/", "file": "results.csv"}]
    assert report["images_without_captions"] == ["7.jpg"] and report["images"] == 7


def test_images_lying_beside_the_caption_file_are_told_to_move_into_images(tmp_path):
    """A folder of pictures with captions.csv among them: the error says the image folder is what is missing (the
    caption file was found), and where the pictures must go; a listing of the first ten pictures alone said neither."""
    for i in range(12):
        save(tmp_path / "mine" / f"{i:02d}.jpg", noise(seed=i))
    (tmp_path / "mine" / "captions.csv").write_text("image,caption\n00.jpg,a picture\n")
    with pytest.raises(FileNotFoundError) as e:
        CaptionData(tmp_path / "mine")
    assert "needs an image folder (one of ['images'," in str(e.value) and "caption file" not in str(e.value)
    assert f"move its 12 image files into {tmp_path / 'mine' / 'images'}" in str(e.value)
    (tmp_path / "mine" / "captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs a caption file \(one of .*\) and an image folder"):
        CaptionData(tmp_path / "mine")



def test_a_path_inside_a_data_folder_says_to_pass_the_data_folder(tmp_path):
    """The image folder was told to move its pictures into images/images, and the caption file or an image was said
    not to exist ("create it with download.py --out DATA/results.csv"): each now names the data folder to pass."""
    folder = caption_folder(tmp_path, "results.csv", HEADER + b"0.jpg| 0| a picture\n", images=["0.jpg", "1.jpg"])
    with pytest.raises(FileNotFoundError) as e:
        CaptionData(folder / "images")
    assert str(e.value) == f"{folder / 'images'} is the image folder of the data folder {folder}; pass {folder}"
    for inside in (folder / "results.csv", folder / "images" / "0.jpg"):
        with pytest.raises(FileNotFoundError) as e:
            CaptionData(inside)
        assert str(e.value) == (f"data folder {inside} is a file, not a folder; pass {folder}, the data folder it "
                                f"lies in")
    (tmp_path / "notes.txt").write_text("not a data folder\n")
    with pytest.raises(FileNotFoundError, match=r"notes.txt is a file, not a folder; pass the folder that holds a "
                                                r"caption file \(one of \['results.csv'"):
        CaptionData(tmp_path / "notes.txt")
    (folder / "results.csv").unlink()  # no longer a data folder: an image folder named `images` is told what it lacks
    with pytest.raises(FileNotFoundError, match=r"needs a caption file .*; move its 2 image files into"):
        CaptionData(folder / "images")

# --- split files ---

def test_split_file_with_an_image_in_two_splits_is_refused(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"],
                                                      "test": ["a.jpg"]}))
    with pytest.raises(ValueError, match="splits.json: image a.jpg is in both the train and the test split"):
        split_names(["a.jpg", "b.jpg", "c.jpg"], tmp_path)


def test_unreadable_split_file_names_itself(tmp_path):
    (tmp_path / "splits.json").write_text("{not json")
    with pytest.raises(ValueError, match="splits.json is not valid JSON.*--split-file"):
        split_names(["a.jpg"], tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a.jpg"], "val": ["x.jpg"], "test": ["b.jpg"]}))
    with pytest.raises(ValueError, match="none of the 1 val images it names is a usable image"):
        split_names(["a.jpg", "b.jpg"], tmp_path)


# --- images and names that used to go wrong quietly ---

def test_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)  # 0 to 65535, left to right
    path = save(tmp_path / "a.png", Image.fromarray(ramp), "PNG")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(path)).astype(int)
    assert check_image(path) is None and pixels.shape == (16, 64, 3) and (pixels == pixels[:, :, :1]).all()  # gray
    row = pixels[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) > 0)  # the whole range, rising
    assert np.abs(row - np.linspace(0, 255, 64)).max() <= 2  # in step with the 16-bit values, not black then white


def test_32_bit_float_grayscale_is_scaled_not_black(tmp_path):
    """A float TIFF (scientific imaging) in [0, 1]: PIL's convert() truncates every value to 0 or 1 of 255."""
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1))
    path = tmp_path / "a.tif"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "F"
    row = np.asarray(load_rgb(path)).astype(int)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.abs(row - np.linspace(0, 255, 64)).max() <= 1
    Image.fromarray(ramp * 255).save(path)  # the same picture on an 8-bit scale
    assert np.abs(np.asarray(load_rgb(path)).astype(int)[0, :, 0] - row).max() <= 1


def test_file_name_that_is_not_utf8_is_named_in_the_report_and_the_rest_prepares(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    folder = caption_folder(tmp_path, "results.csv", HEADER + "".join(
        f"{n}| 0| picture {n}\n" for n in [*names, "café.jpg"]).encode(), images=names)
    odd = os.fsencode(folder / "images") + b"/caf\xe9.jpg"  # Latin-1 bytes, as an old camera or zip may name it
    with open(odd, "wb") as f:
        f.write(jpeg_bytes(noise(size=(8, 8))))
    assert download.main(["--prepare", str(folder), "--workers", "1"]) == 0
    report = json.loads((folder / "prepare_report.json").read_text())
    assert report["images"] == 30 and report["images_without_captions"] == [os.fsdecode(b"caf\xe9.jpg")]
    assert report["dropped_rows"][0]["reason"] == ("no image café.jpg in images/, but there is b'caf\\xe9.jpg', "
                                                   "whose name is not UTF-8; rename it to café.jpg")
    # and the name reaches the cache key and its fingerprint without a crash
    cache, failed = build_cache([os.fsdecode(odd), folder / "images" / "0.jpg"], 8, tmp_path / "cache")
    assert failed == [] and len(cache) == 2


def test_captions_naming_images_in_subfolders_say_images_lie_directly_in_the_folder(tmp_path, capsys):
    folder = caption_folder(tmp_path, "captions.csv", b"image,caption\ncats/0.jpg,a cat\ncats/1.jpg,a cat\n",
                            images=["cats/0.jpg", "cats/1.jpg"])
    with pytest.raises(SystemExit) as e:  # nothing usable: an error, not a report of 0 images
        download.main(["--prepare", str(folder), "--workers", "1"])
    assert e.value.code != 0 and "no usable image" in str(e.value.code)
    assert "cats/0.jpg is in a subfolder; images must lie directly in images/ (no subfolders)" in str(e.value.code)
    report = json.loads((folder / "prepare_report.json").read_text())
    assert [r["line"] for r in report["dropped_rows"]] == [2, 3] and report["images"] == 0
    with pytest.raises(SystemExit, match="no usable image"):  # and again: an unusable folder is never "prepared"
        download.main(["--prepare", str(folder)])
    with pytest.raises(prepare_module.PrepareError, match="no usable image"):
        prepare(folder)


def test_the_report_lists_rows_in_file_order_whichever_check_found_them(tmp_path):
    # line 2 is dropped when the images are matched, line 3 while parsing, which comes first
    folder = caption_folder(tmp_path, "captions.csv", b"image,caption\nnone.jpg,a cat\n0.jpg,\n0.jpg,a dog\n",
                            images=["0.jpg"])
    assert download.main(["--prepare", str(folder), "--workers", "1"]) == 0
    report = json.loads((folder / "prepare_report.json").read_text())
    assert [r["line"] for r in report["dropped_rows"]] == [2, 3]


def test_image_name_in_another_unicode_form_names_both_spellings(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café.jpg"), unicodedata.normalize("NFD", "café.jpg")
    names = [f"{i}.jpg" for i in range(30)]
    folder = caption_folder(tmp_path, "results.csv", HEADER + "".join(
        f"{n}| 0| picture {n}\n" for n in [*names, nfc]).encode(), images=[*names, nfd])  # a zip made on a Mac
    report = prepare(folder, workers=1)
    reason = report["dropped_rows"][0]["reason"]
    assert f"no image {nfc} in images/, but there is {nfd!r}" in reason and "NFC vs NFD" in reason
    assert (folder / "images" / nfd).exists() and not (folder / "images" / nfc).exists()  # nothing renamed


def test_image_name_in_another_case_names_both_spellings(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    folder = caption_folder(tmp_path, "captions.csv", ("image,caption\n" + "".join(
        f"{n},picture {n}\n" for n in [*names, "IMG_1.jpg"])).encode(), images=[*names, "IMG_1.JPG"])  # from Windows
    reason = prepare(folder, workers=1)["dropped_rows"][0]["reason"]
    assert "no image IMG_1.jpg in images/, but there is 'IMG_1.JPG': file names differ in upper and lower" in reason


def test_caption_rows_count_the_rows_dropped_while_parsing(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    folder = caption_folder(tmp_path, "results.csv", HEADER + "".join(
        f"{n}| 0| picture {n}\n" for n in names).encode() + b"a line that is no caption row\n", images=names)
    report = prepare(folder, workers=1)
    assert len(report["dropped_rows"]) == 1 and report["caption_rows"] == 31  # every row of the file


def test_utf16_caption_file_says_save_it_as_utf8(tmp_path):
    text = "image,caption\n" + "".join(f"{i}.jpg,picture {i}\n" for i in range(30))
    folder = caption_folder(tmp_path, "captions.csv", text.encode("utf-16"),  # Excel's "Unicode text"
                            images=[f"{i}.jpg" for i in range(30)])
    with pytest.raises(SystemExit, match="captions.csv is UTF-16 text.*save it as UTF-8"):
        download.main(["--prepare", str(folder), "--workers", "1"])
    with pytest.raises(ValueError, match="captions.csv is UTF-16 text.*save it as UTF-8"):  # what train.py reads
        CaptionData(folder, verbose=False)


# --- a data folder that cannot be written ---

def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", "/data/.prepare_report.json.x1y2.tmp")


def test_prepare_in_a_read_only_folder_is_one_line_naming_the_file(tmp_path, monkeypatch):
    names = [f"{i}.jpg" for i in range(30)]
    folder = caption_folder(tmp_path, "results.csv", HEADER + "".join(
        f"{n}| 0| picture {n}\n" for n in names).encode(), images=names)
    monkeypatch.setattr(prepare_module, "write_json", read_only)  # as root, chmod would not stop the write
    with pytest.raises(SystemExit) as e:
        download.main(["--prepare", str(folder), "--workers", "1"])
    message = str(e.value.code)
    assert message == (f"error: could not write {folder / 'prepare_report.json'} (Read-only file system); make "
                       f"{folder} writable, or copy the folder somewhere writable and prepare the copy")


def test_local_tokenizer_trains_from_memory_when_the_data_folder_is_read_only(tmp_path, monkeypatch, capsys):
    captions = [f"a {c} {s} in the {p}" for c in ("red", "blue", "green") for s in ("circle", "star")
                for p in ("middle", "top left", "bottom")]
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", read_only)
    kept = load_tokenizer("local", "distilbert", tmp_path / "data", lambda: captions, 60)
    printed = capsys.readouterr().out
    assert f"could not save the tokenizer to {tmp_path / 'data' / 'tokenizer'} (Read-only file system)" in printed
    assert not (tmp_path / "data").exists()
    # it works as the copy a checkpoint saves and loads again
    monkeypatch.undo()
    kept.save_pretrained(tmp_path / "checkpoint-tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "checkpoint-tokenizer")
    assert len(kept) == len(loaded) and kept.pad_token_id == loaded.pad_token_id
    assert kept(captions + ["a purple hexagon"])["input_ids"] == loaded(captions + ["a purple hexagon"])["input_ids"]


def test_a_caption_holding_a_pipe_keeps_it(tmp_path):
    rows, _ = read_captions(caption_folder(tmp_path, "results.csv", HEADER + b"0.jpg| 0| a sign that reads A|B .\n",
                                            ["0.jpg"]))
    assert rows == [(2, "0.jpg", "a sign that reads A|B .")]


def test_a_duplicate_row_with_capitals_is_reported(tmp_path):
    twice = HEADER + b"0.jpg| 0| A Cat .\n0.jpg| 0| A Cat .\n"
    rows, report = read_captions(caption_folder(tmp_path, "results.csv", twice, ["0.jpg"]))
    assert len(rows) == 1 and report.duplicate_rows == [{"line": 3, "first_line": 2, "file": "results.csv"}]


def test_an_undecodable_uncaptioned_file_is_bad_not_uncaptioned(tmp_path):
    rows = "".join(f"{i}.jpg| 0| picture {i}\n" for i in range(30))
    folder = caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)])
    (folder / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    report = prepare_module.prepare(folder, workers=1)
    assert report["bad_images"] == ["broken.jpg"] and report["images_without_captions"] == []


def test_an_edited_caption_file_is_reported_again(tmp_path):
    rows = "".join(f"{i}.jpg| 0| picture {i}\n" for i in range(30))
    folder = caption_folder(tmp_path, "results.csv", HEADER + rows.encode(), [f"{i}.jpg" for i in range(30)])
    assert prepare_module.prepare(folder, workers=1)["captions"] == 30
    again = "".join(f"{i}.jpg| 1| again {i}\n" for i in range(30))
    (folder / "results.csv").write_bytes(HEADER + (rows + again).encode())
    assert prepare_module.prepare(folder, workers=1)["captions"] == 60
