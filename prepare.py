"""From a Kaggle zip (downloaded, or given) to a verified data folder in the format captions.py and dataset.py read.

A prepared folder holds the caption file exactly as Kaggle ships it (captions.py repairs it in memory), one image
folder `images/`, `prepare_report.json` (counts, repaired / dropped / duplicate caption rows with line numbers, images
that cannot be decoded) and, with --split-file, `splits.json`. Every step can be interrupted and rerun:
  download  kaggle resumes a partial zip; a zip without its central directory (written last) is fetched again
  extract   one copy of the captions and images (Kaggle's Flickr30k zip nests a redundant second copy) goes to a
            staging folder, then is moved into place; a staging folder left behind means "extract again"
  verify    every image is decoded in parallel exactly as training decodes it; the report is written last, with a
            fingerprint of the files, so an unchanged folder is recognised in a moment next time
"""

import os
import re
import shutil
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from shlex import quote

from tqdm import tqdm

from captions import CAPTION_FILES, IMAGE_DIRS, IMAGE_EXTS, find_layout, image_files_in, is_data_folder, read_captions
from dataset import SPLITS, check_splits, read_json_file, split_names
from images import find_bad_images, fingerprint
from utils import not_utf8, write_json

REPORT = "prepare_report.json"
STAGING = ".extracting"


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    slug: str  # Kaggle owner/dataset
    caption_file: str  # its name in the zip, kept in the prepared folder
    images: int  # expected counts: a mismatch means a changed upload or a broken file (a warning, not an error)
    captions: int

    @property
    def url(self) -> str:
        return f"https://www.kaggle.com/datasets/{self.slug}"

    @property
    def zip_name(self) -> str:  # what the kaggle client names the download
        return self.slug.split("/")[1] + ".zip"


DATASETS = {
    "flickr30k": DatasetSpec("flickr30k", "hsankesara/flickr-image-dataset", "results.csv", 31_783, 158_915),
    "flickr8k": DatasetSpec("flickr8k", "adityajn105/flickr8k", "captions.txt", 8_091, 40_455),
}


# --- download and extract ---

def zip_is_complete(path) -> bool:
    """Whether `path` is a readable zip: its central directory comes last, so a download cut short fails this."""
    try:
        with zipfile.ZipFile(path) as zf:
            return bool(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def download_zip(spec: DatasetSpec, out: Path, connect) -> Path:
    """OUT/<name>.zip from Kaggle unless a complete one is there; `connect()` gives an object with kaggle's
    `dataset_download_files` (tests pass a fake), and is called only when something must be downloaded."""
    path = out / spec.zip_name
    if zip_is_complete(path):
        print(f"{path} is already downloaded")
        return path
    api = connect()  # first: a missing credential must not follow a line that announces a download
    if path.exists():
        print(f"{path} is incomplete ({path.stat().st_size / 1e9:.2f} GB); continuing the download")
    print(f"downloading {spec.slug} from Kaggle ({spec.url})")
    for force in (False, True):  # kaggle resumes a partial file; if that still is no whole zip, start over
        try:
            api.dataset_download_files(spec.slug, path=str(out), force=force, quiet=False, unzip=False)
        except Exception as e:  # the client raises its own and requests' exception types
            raise PrepareError(f"could not download {spec.slug} from Kaggle: {type(e).__name__}: {e}\n"
                               f"Check your connection and that you can open {spec.url} while logged in; or "
                               f"download the zip there by hand and run `python download.py --dataset {spec.name} "
                               f"--zip PATH --out {quote(str(out))}`") from None
        if zip_is_complete(path):
            return path
        print(f"{path} is not a complete zip after downloading; downloading it again from the start")
    raise PrepareError(f"{path} is still not a complete zip after downloading it twice; download it by hand from "
                       f"{spec.url} and run `python download.py --dataset {spec.name} --zip PATH --out "
                       f"{quote(str(out))}`")


def depth(name: str) -> int:
    return len(PurePosixPath(name).parts)


def locate(names: list[str], spec: DatasetSpec, source) -> tuple[str, list[str], list[str]]:
    """(caption file, its images, skipped image folders) in a zip's listing: the shallowest caption file, and the
    folder with the most images (the shallowest among equals). Kaggle's Flickr30k zip holds a redundant nested copy
    of both; one is kept."""
    names = [n for n in names if not n.startswith("__MACOSX/") and not PurePosixPath(n).name.startswith("._")]
    captions = sorted((n for n in names if PurePosixPath(n).name == spec.caption_file), key=depth)
    images = [n for n in names if PurePosixPath(n).suffix.lower() in IMAGE_EXTS]
    folders = Counter(str(PurePosixPath(n).parent) for n in images)
    if not captions or not folders:
        others = sorted({PurePosixPath(n).name for n in names} & set(CAPTION_FILES))
        guess = [f"--dataset {d.name}" for d in DATASETS.values() if d.caption_file in others]
        hint = f" It holds {others}: is it another data set ({' or '.join(guess) or '--dataset'})?" if others else ""
        raise PrepareError(f"{source} holds no {spec.caption_file} or no images, so it is not Kaggle's "
                           f"{spec.name} zip ({spec.url}).{hint} First entries: {names[:5]}")
    folder = min(folders, key=lambda f: (-folders[f], depth(f)))
    return captions[0], [n for n in images if str(PurePosixPath(n).parent) == folder], sorted(set(folders) - {folder})


def named_elsewhere(zf: zipfile.ZipFile, caption: str, images: list[str], skipped: list[str]) -> list[str]:
    """Images the caption file names that the chosen folder lacks but a skipped one holds (a zip that splits its
    images over several folders), one zip member per name."""
    exts = "|".join(re.escape(e[1:]) for e in sorted(IMAGE_EXTS))
    named = {m.decode("utf-8", "replace")
             for m in re.findall(rb"[^\s|,;\"'/\\]+\.(?:" + exts.encode() + rb")\b", zf.read(caption), re.I)}
    have, extra = {PurePosixPath(n).name for n in images}, {}
    for member in zf.namelist():
        path = PurePosixPath(member)
        if str(path.parent) in skipped and path.name in named and path.name not in have:
            extra.setdefault(path.name, member)
    return list(extra.values())


def refuse_partial_out(out: Path, spec: DatasetSpec) -> None:
    """OUT holding a caption file or an image folder but no complete data set is the user's to sort out: said before
    a download (4 GB for Flickr30k), not after. An interrupted extraction of ours is redone instead."""
    present = [p.name for p in (out / "images", out / spec.caption_file) if p.exists()]
    if present and not (out / STAGING).exists():
        try:
            find_layout(out)
            what = ""
        except FileNotFoundError as e:
            what = f" ({e})"
        raise PrepareError(f"{out} already holds {present} but no complete data set{what}; complete it by hand, "
                           f"move them away, or choose another --out")


def extract_member(zf: zipfile.ZipFile, name: str, target: Path) -> None:
    with zf.open(name) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)  # the zip checks each member's CRC as it is read to the end


def is_extracted(out: Path) -> bool:
    """A caption file and an image folder, and no staging folder left by an interrupted extraction."""
    return is_data_folder(out) and not (out / STAGING).exists()


def extract(zip_path: Path, out: Path, spec: DatasetSpec) -> None:
    """One copy of the caption file (byte for byte) and the images from the zip into OUT/ and OUT/images/."""
    staging, targets = out / STAGING, [out / "images", out / spec.caption_file]
    if staging.exists():
        print(f"{out}: an earlier extraction was interrupted; extracting again")
        shutil.rmtree(staging)
        for path in targets:  # already moved out of the staging folder by that extraction
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    try:  # a half-filled OUT was refused before the download (fetch)
        with zipfile.ZipFile(zip_path) as zf:
            caption, images, skipped = locate(zf.namelist(), spec, zip_path)
            main_folder, extra = PurePosixPath(images[0]).parent, named_elsewhere(zf, caption, images, skipped)
            images += extra
            need, free = sum(zf.getinfo(n).file_size for n in [caption, *images]), shutil.disk_usage(out).free
            if need > free:
                raise PrepareError(f"extracting {zip_path} needs {need / 1e9:.1f} GB in {out}, but only "
                                   f"{free / 1e9:.1f} GB are free; free some space or choose another --out")
            (staging / "images").mkdir(parents=True)
            extract_member(zf, caption, staging / spec.caption_file)
            for name in tqdm(images, desc=f"extracting {zip_path.name}", unit="img"):
                extract_member(zf, name, staging / "images" / PurePosixPath(name).name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC, bad compressed data, a short member
        shutil.rmtree(staging, ignore_errors=True)  # a damaged zip fails again the same way: keep no partial copy
        raise PrepareError(f"{zip_path} is damaged ({e}); delete it and download it again") from None
    for path in targets:
        os.replace(staging / path.name, path)
    staging.rmdir()  # last: while the staging folder exists, the extraction counts as unfinished
    taken = sorted({str(PurePosixPath(n).parent) for n in extra})
    print(f"extracted {caption} and {len(images) - len(extra):,} images from {main_folder}/"
          + (f", and {len(extra):,} more that {spec.caption_file} names from {taken}" if extra else "")
          + (f"; skipped the redundant copies in {skipped}" if skipped and not extra else "")
          + (f"; skipped the other images in {skipped}, which it does not name" if extra else ""))


def same_images(a: Path, b: Path) -> bool:
    """Whether folder b holds exactly a's images, by name and size (a redundant copy)."""
    def listing(folder):
        return sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)

    return listing(a) == listing(b)


def adopt_unzipped(out: Path, spec: DatasetSpec) -> bool:
    """If OUT holds the zip unzipped by hand (Kaggle's nested layout), move one copy of the caption file and the
    image folder into place and delete the redundant copies, once checked to be copies. False if it does not."""
    if (out / STAGING).exists():
        return False
    try:
        caption, images, skipped = locate([str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()], spec, out)
    except PrepareError:
        return False
    folder, kept = out / PurePosixPath(images[0]).parent, out / "images"
    if folder.name not in IMAGE_DIRS:  # not a Kaggle layout: move nothing
        return False
    deleted = [other for other in skipped
               if not folder.is_relative_to(out / other) and same_images(folder, out / other)]
    for other in deleted:
        shutil.rmtree(out / other)
    for other in out.rglob(spec.caption_file):
        if other != out / caption and other.read_bytes() == (out / caption).read_bytes():
            other.unlink()
    os.replace(out / caption, out / spec.caption_file)
    if folder != kept:
        os.replace(folder, kept)
    for empty in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(empty.iterdir()):
            empty.rmdir()
    print(f"{out}: moved {caption} and {folder.relative_to(out)}/ ({len(images):,} images) into place"
          + (f"; deleted the redundant copies in {deleted}" if deleted else "")
          + (f"; kept {sorted(set(skipped) - set(deleted))}, which are not exact copies" if skipped != deleted else ""))
    return True


def data_sets_within(out: Path) -> list[str]:
    """Folders below OUT that are data sets of their own: prepared by download.py (a report), or laid out as it
    lays them out (images/ beside a caption file). Kaggle's zips hold neither; an unfinished extraction is ours."""
    found = {p.parent for p in out.rglob(REPORT)}
    found |= {p.parent for p in out.rglob("images") if p.is_dir() and any((p.parent / n).is_file() for n in
                                                                           CAPTION_FILES)}
    return sorted(str(f.relative_to(out)) for f in found if f != out and not f.is_relative_to(out / STAGING))


def fetch(spec: DatasetSpec, out: Path, zip_path=None, connect=None, keep_zip: bool = False) -> None:
    """Make OUT a data folder of `spec`: from `zip_path` if given (never deleted), else from the zip unzipped by
    hand in OUT, else from Kaggle (the download is deleted after a successful extraction unless keep_zip). Does
    nothing when OUT already holds the data."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only disk, a folder of another user's
        raise PrepareError(f"cannot create {out} ({e.strerror or e}); choose a folder you can write to with --out") \
            from None
    if is_extracted(out):
        if zip_path is not None:  # never replace a data set the user may have worked on
            print(f"note: --zip {zip_path} was not used: {out} already holds a data set; to prepare from the zip "
                  f"instead, pass another --out, or delete {out} first")
        return
    nested = data_sets_within(out)
    if nested:  # `--out data` for `--out data/flickr30k`: adopting would take those data sets apart
        raise PrepareError(f"{out} holds data sets of its own ({', '.join(nested[:3])}), so it is not one data set's "
                           f"folder; nothing was moved. --out names the folder of one data set: for instance --out "
                           f"{quote(str(out / spec.name))}")
    if zip_path is None and adopt_unzipped(out, spec):
        return
    refuse_partial_out(out, spec)
    if zip_path is not None and Path(zip_path).is_dir():
        raise PrepareError(f"--zip {zip_path} is a folder, not a zip file; name the .zip itself, or move an unzipped "
                           f"download into --out and run without --zip")
    if zip_path is not None and not Path(zip_path).is_file():
        raise PrepareError(f"--zip {zip_path}: no such file")
    if zip_path is not None and not zip_is_complete(zip_path):
        raise PrepareError(f"--zip {zip_path} is not a complete zip file; download it again from {spec.url}")
    downloaded = zip_path is None
    zip_path = Path(zip_path) if zip_path else download_zip(spec, out, connect)
    extract(zip_path, out, spec)
    if downloaded and not keep_zip:
        zip_path.unlink()
        print(f"deleted {zip_path} (pass --keep-zip to keep it)")


# --- splits ---

def read_name_list(path: Path) -> list[str]:
    """Image names from a split list: one per line, first field (`name.jpg,caption`, `name.jpg#0 caption`, or a
    bare Flickr id, which gets `.jpg`); a header line and repeats are skipped."""
    names = []
    for line in path.read_text(errors="surrogateescape").splitlines():  # names not UTF-8 as the disk's are read
        first = re.split(r"[,\s#]", line.strip(), maxsplit=1)[0]
        if Path(first).suffix.lower() in IMAGE_EXTS:
            names.append(first)
        elif first.isdigit():
            names.append(first + ".jpg")
    if not names:
        raise PrepareError(f"--split-file: {path} lists no image names")
    return list(dict.fromkeys(names))


def read_split_file(path) -> dict[str, list[str]]:
    """{"train", "val", "test": image names} from Karpathy's dataset_flickr30k.json ("restval" counts as train), a
    splits.json of ours, or the three flickr30k_{train,val,test}_karpathy.txt lists (name one; the other two are
    found beside it)."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"--split-file {path}: no such file")
    if path.suffix == ".json":
        data = read_json_file(path, "pass Karpathy's dataset_flickr30k.json or a {\"train\": [...], ...} file")
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            splits = {s: [] for s in SPLITS}
            for i, image in enumerate(data["images"]):
                if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
                    raise PrepareError(f"--split-file {path}: images[{i}] is {str(image)[:80]}, not an entry with a "
                                       f"\"filename\" and a \"split\" as in Karpathy's dataset_flickr30k.json")
                split = {"restval": "train"}.get(image.get("split"), image.get("split"))
                if split in splits:
                    splits[split].append(image["filename"])
            data = splits
        return check_splits(data, path)
    m = re.search(r"(?<![a-z])(train|val|test)(?![a-z])", path.name)
    if not m:
        raise PrepareError(f"--split-file {path}: expected a .json file or a list named like "
                           f"flickr30k_train_karpathy.txt (with its val and test siblings beside it)")
    files = {s: path.with_name(path.name[:m.start()] + s + path.name[m.end():]) for s in SPLITS}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise PrepareError(f"--split-file {path}: the other split lists are missing: {missing}")
    return check_splits({s: read_name_list(f) for s, f in files.items()}, path)


# --- verify and report ---

def count_mismatches(spec: DatasetSpec | None, image_files: int, caption_rows: int, data_dir: Path) -> list[str]:
    if spec is None:
        return []
    found = {"images": (image_files, spec.images), "captions": (caption_rows, spec.captions)}
    return [f"expected {want:,} {what} for {spec.name} ({spec.url}), found {got:,}; if {data_dir} holds data of "
            f"your own, not {spec.name}, `python download.py --prepare {quote(str(data_dir))}` (no --dataset) checks "
            f"no counts"
            for what, (got, want) in found.items() if got != want]


def spelling(name: str) -> str:
    """A file name as a caption row would spell it: NFC (zips made on a Mac may hold NFD names), and a name that
    is not UTF-8 read as Windows-1252, as captions.py reads caption lines that are not UTF-8."""
    if not_utf8(name):
        name = os.fsencode(name).decode("cp1252", errors="replace")
    return unicodedata.normalize("NFC", name)


def missing_image(image: str, image_dir: Path, spellings: dict[str, str], cases: dict[str, str]) -> str:
    """Why a caption row's image is not among the images, as precisely as the folder allows."""
    if "/" in image and (image_dir / image).is_file():
        return f"{image} is in a subfolder; images must lie directly in {image_dir.name}/ (no subfolders)"
    other = spellings.get(spelling(image))
    if other is not None and not_utf8(other):
        return (f"no image {image} in {image_dir.name}/, but there is {os.fsencode(other)!r}, whose name is not "
                f"UTF-8; rename it to {image}")
    if other is not None:
        return (f"no image {image} in {image_dir.name}/, but there is {other!r}: the same name in another Unicode "
                f"form (NFC vs NFD, as in zips made on a Mac); rename the file or fix the caption file to match")
    other = cases.get(spelling(image).casefold())  # a caption file made where names ignore case (Windows, macOS)
    if other is not None:
        return (f"no image {image} in {image_dir.name}/, but there is {other!r}: file names differ in upper and lower "
                f"case here; rename the file or fix the caption file to match")
    return f"no image {image} in {image_dir.name}/"


def build_report(data_dir: Path, spec: DatasetSpec | None, image_files: list[Path], bad: dict[str, str]) -> dict:
    """What the folder holds and what was wrong with it: the contents of prepare_report.json."""
    caption_file, image_dir = find_layout(data_dir)
    rows, parsed = read_captions(data_dir)
    caption_rows = len(rows) + len(parsed.duplicate_rows) + len(parsed.dropped_rows)  # every row of the file
    on_disk = {p.name for p in image_files}
    spellings = {spelling(name): name for name in on_disk}
    cases = {spelling(name).casefold(): name for name in on_disk}
    captions, captioned = Counter(), set()
    for line, image, _ in rows:
        if image not in on_disk:
            parsed.dropped_rows.append({"line": line, "reason": missing_image(image, image_dir, spellings, cases),
                                        "file": caption_file.name})
            continue
        captioned.add(image)
        if image not in bad:
            captions[image] += 1
    warnings = count_mismatches(spec, len(image_files), caption_rows, data_dir)
    try:
        members = split_names(sorted(captioned), data_dir)  # as training draws them: bad images drop out after
        splits = {s: sum(n not in bad for n in members[s]) for s in SPLITS}
        # the default split places every image; a split file may name only some, and the rest train nowhere
        in_no_split = sorted(captioned - set(bad) - {n for s in SPLITS for n in members[s]})
    except ValueError as e:
        splits, in_no_split, warnings = None, [], warnings + [f"no usable split: {e}"]
    return {
        "dataset": spec.name if spec else None,
        "caption_file": caption_file.name, "image_dir": image_dir.name,
        "images": len(captions), "captions": sum(captions.values()),  # usable: decodable, captioned, on disk
        "image_files": len(image_files), "caption_rows": caption_rows,  # found
        "warnings": warnings,
        **{k: sorted(getattr(parsed, k), key=lambda r: r["line"])  # in file order, whichever check found them
           for k in ("repaired_rows", "dropped_rows", "duplicate_rows")},
        "bad_images": sorted(bad), "bad_image_reasons": bad,
        "images_without_captions": sorted(on_disk - {image for _, image, _ in rows} - set(bad)),
        "splits": splits, "images_in_no_split": in_no_split,
        "split_rule": "splits.json" if (data_dir / "splits.json").exists() else
        "default: captioned images ranked by a hash of their file name, 5% (at most 1,000) each for test and "
        "val; images that cannot be decoded then drop out of the split they fell in",
    }


def summarize(data_dir: Path, report: dict) -> None:
    rows = {k: len(report[k]) for k in ("repaired_rows", "dropped_rows", "duplicate_rows")}
    print(f"{data_dir}: {report['images']:,} usable images with {report['captions']:,} captions; caption file: "
          f"{rows['repaired_rows']} repaired, {rows['dropped_rows']} dropped, {rows['duplicate_rows']} duplicate "
          f"rows; {len(report['images_without_captions'])} images without captions")
    if report["bad_images"]:
        print(f"excluded {len(report['bad_images'])} images that cannot be decoded, e.g. "
              f"{report['bad_images'][:3]} (all in {REPORT}, `bad_images`)")
    if report["splits"]:
        print(f"splits ({report['split_rule']}): " + " / ".join(f"{n:,} {s}" for s, n in report["splits"].items()))
    if report.get("images_in_no_split"):  # .get: an older report has no such entry
        print(f"note: {len(report['images_in_no_split']):,} captioned images are in none of the split file's splits, "
              f"so no run uses them (all in {REPORT}, `images_in_no_split`)")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")


def read_old_report(data_dir: Path) -> dict:
    try:
        old = read_json_file(data_dir / REPORT, "") if (data_dir / REPORT).exists() else {}
    except ValueError:
        old = {}  # unreadable: it is simply made again
    return old if isinstance(old, dict) else {}


def save_json(path: Path, obj) -> None:
    """write_json, where a folder that cannot be written (read-only, full) ends in one line naming the file."""
    try:
        write_json(path, obj)
    except OSError as e:
        raise PrepareError(f"could not write {path} ({e.strerror or e}); make {path.parent} writable, or copy the "
                           f"folder somewhere writable and prepare the copy") from None


def prepare(data_dir, spec: DatasetSpec | None = None, split_file=None, workers: int = 0,
            reverify: bool = False, splits: dict[str, list[str]] | None = None) -> dict:
    """Verify a data folder and write DATA/prepare_report.json (and DATA/splits.json from `split_file`).

    Images are decoded again only if they changed since the last report (or `reverify`); a folder unchanged in
    every file since its report, and checked against the same `spec`, is left as it is. workers: processes for
    decoding (0 = one per CPU). splits: split_file as read_split_file read it, where the caller read it already
    (download.py does, before fetching)."""
    data_dir = Path(data_dir)
    caption_file, image_dir = find_layout(data_dir)
    previous = (data_dir / "splits.json").read_bytes() if (data_dir / "splits.json").exists() else None
    if split_file:
        save_json(data_dir / "splits.json", splits or read_split_file(split_file))
    image_files = image_files_in(image_dir)
    root = image_dir.resolve()  # names relative to it: a moved folder (same inodes and times) is still unchanged
    images_stamp = fingerprint(image_files, root)
    splits_file = [data_dir / "splits.json"] if (data_dir / "splits.json").exists() else []
    stamp = fingerprint([caption_file.resolve(), *image_files, *(f.resolve() for f in splits_file)], root)
    old = read_old_report(data_dir)
    # the counts are checked against `spec` alone, never a data set remembered from the report: a folder once
    # prepared with --dataset may well be data of your own, which a plain --prepare must not warn about
    same_check = old.get("dataset") == (spec.name if spec else None)
    if old.get("fingerprint") == stamp and old.get("images") and same_check and not reverify:
        print(f"{data_dir} is already prepared and unchanged since its {REPORT}")
        summarize(data_dir, old)
        return old
    if old.get("images_fingerprint") == images_stamp and not reverify:
        bad = old.get("bad_image_reasons", {})
    else:
        bad = find_bad_images(image_files, workers or os.cpu_count() or 1)
    report = {**build_report(data_dir, spec, image_files, bad),
              "fingerprint": stamp, "images_fingerprint": images_stamp}
    if split_file and report["splits"] is None:  # keep no split file that training could not use
        if previous is None:
            (data_dir / "splits.json").unlink()
        else:
            (data_dir / "splits.json").write_bytes(previous)
        raise PrepareError(f"--split-file {split_file} does not fit {data_dir}: {report['warnings'][-1]}")
    save_json(data_dir / REPORT, report)
    summarize(data_dir, report)
    if not report["images"]:  # training could not start: an error, not a warning
        first = f"; the first dropped row: {report['dropped_rows'][0]['reason']}" if report["dropped_rows"] else ""
        raise PrepareError(f"{data_dir}: no usable image: none of its {len(image_files):,} image files is both "
                           f"captioned and decodable ({report['caption_rows']:,} caption rows, {len(bad):,} images "
                           f"that cannot be decoded){first}; all in {data_dir / REPORT}")
    return report
