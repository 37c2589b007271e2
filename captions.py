"""A data folder's layout and its caption file: where the images and captions are, and the caption formats read
the same way, with what had to be repaired or dropped on the way (line by line, for prepare_report.json).

- Kaggle Flickr30k: `results.csv` (`image_name| comment_number| comment`, `|`-separated with leading spaces) beside
  an image folder; the built-in shapes set uses it too.
- Kaggle Flickr8k and bring-your-own: `captions.txt` or `captions.csv` with an `image,caption` header.
"""

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from shlex import quote

IMAGE_DIRS = ["images", "Images", "flickr30k_images", "flickr8k_images"]
CAPTION_FILES = ["results.csv", "captions.txt", "captions.csv"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ParseReport:
    """What reading a caption file had to fix or skip, with 1-based line numbers."""
    repaired_rows: list = field(default_factory=list)
    dropped_rows: list = field(default_factory=list)
    duplicate_rows: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.repaired_rows)} repaired, {len(self.dropped_rows)} dropped, "
                f"{len(self.duplicate_rows)} duplicate rows")


def find_layout(data_dir) -> tuple[Path, Path]:
    """(caption file, image folder) of a data folder, or an error saying what was expected."""
    root = Path(data_dir)
    if root.is_file():  # its caption file or one of its images (tab completion went one step too far), or a zip
        home = next((p for p in root.parents[:2] if is_data_folder(p)), None)
        where = (f"pass {home}, the data folder it lies in" if home else f"pass the folder that holds a caption "
                 f"file (one of {CAPTION_FILES}) and an image folder (one of {IMAGE_DIRS})")
        raise FileNotFoundError(f"data folder {root} is a file, not a folder; {where}")
    # the built-in set goes to a folder of its own, with the preset made for it (not the pretrained recipe)
    ways = (f"`python download.py --out {quote(str(root))}` downloads Flickr30k into it (Kaggle credentials: see the "
            f"README); or try the built-in set first: `python download.py --dataset shapes --out data/shapes`, then "
            f"train with `--preset shapes --data-dir data/shapes`")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; {ways}")
    if not any(root.iterdir()):
        raise FileNotFoundError(f"data folder {root} is empty (a download that did not finish?); {ways}")
    captions = next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
    images = next((root / n for n in IMAGE_DIRS if (root / n).is_dir()), None)
    if captions is None and images is not None and any((images / n).is_file() for n in CAPTION_FILES):
        # Kaggle's Flickr30k zip keeps its caption file inside its image folder, beside a nested copy of the images
        raise FileNotFoundError(f"{root} holds a Kaggle zip unzipped by hand (its caption file is in {images}); "
                                f"`python download.py --out {quote(str(root))}` moves one copy into place and "
                                f"prepares it")
    if (captions is None or images is None) and root.name in IMAGE_DIRS and is_data_folder(root.parent):
        raise FileNotFoundError(f"{root} is the image folder of the data folder {root.parent}; pass {root.parent}")
    if captions is None or images is None:
        lacks = ([f"a caption file (one of {CAPTION_FILES})"] if captions is None else []) + \
            ([f"an image folder (one of {IMAGE_DIRS})"] if images is None else [])
        loose = sum(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir())  # pictures beside the caption file
        hint = f"; move its {loose} image files into {root / 'images'}" if images is None and loose else ""
        raise FileNotFoundError(f"{root} needs {' and '.join(lacks)}{hint}; found "
                                f"{sorted(p.name for p in root.iterdir())[:10]}")
    return captions, images


def is_data_folder(path) -> bool:
    """Whether find_layout accepts `path`: for advice when a path inside a data folder was passed for it."""
    try:
        find_layout(path)
    except FileNotFoundError:
        return False
    return True


def image_files_in(image_dir) -> list[Path]:
    """The image files of a folder, sorted, by absolute path: what prepare_report.json's fingerprint covers (by their
    names relative to the folder), the same however the folder is named (data/x, ./data/x, /home/.../data/x)."""
    return sorted(p for p in Path(image_dir).resolve().iterdir() if p.suffix.lower() in IMAGE_EXTS)


def decode_lines(raw: bytes, report: ParseReport, source: str) -> list[str]:
    """Lines as text; a line that is not UTF-8 is decoded as Windows-1252 (which maps every byte) and reported."""
    lines = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
            report.repaired_rows.append({"line": number, "fix": "not UTF-8, decoded as Windows-1252",
                                         "file": source})
    return lines


# A row that lost one or both `|` delimiters, e.g. the real Flickr30k file's `2199200615.jpg| 4   A dog runs across
# the grass .`: an image file name, the comment number, then the caption.
ROW_WITHOUT_DELIMITER = re.compile(r"^\s*([^|\s]+\.[A-Za-z]+)\s*\|?\s*(\d+)\s*\|?\s*(\S.*)$")
# An `image,caption` row that lost its comma: an image file name, whitespace, then the caption.
CSV_ROW_WITHOUT_DELIMITER = re.compile(r"^\s*([^,\s]+\.[A-Za-z]+)\s+(\S.*)$")


def is_image_name(name: str) -> bool:
    return Path(name.strip()).suffix.lower() in IMAGE_EXTS


def parse_pipe_rows(lines: list[str], report: ParseReport, source: str) -> list[tuple[int, str, str]]:
    """Flickr30k `results.csv` rows -> (line, image, caption); repairs rows that lost a delimiter.

    The first line is the header `image_name| comment_number| comment`, unless it already is a data row."""
    first = 1 if lines and is_image_name(lines[0].split("|")[0]) else 2
    rows = []
    for number, line in enumerate(lines[first - 1:], start=first):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) >= 3:
            image, caption = parts[0].strip(), "|".join(parts[2:]).strip()
        elif m := ROW_WITHOUT_DELIMITER.match(line):
            image, caption = m.group(1), m.group(3).strip()
            report.repaired_rows.append({"line": number, "fix": "missing '|' delimiter", "text": line,
                                         "file": source})
        else:
            report.dropped_rows.append({"line": number, "reason": "not `image| number| caption`", "text": line,
                                        "file": source})
            continue
        rows.append((number, image, caption))
    return rows


SEPARATORS = {";": "semicolons (';')", "\t": "tabs", "|": "'|'"}  # what an `image,caption` file may hold instead
CAPTION_LINES = 5  # a quoted caption may hold line breaks (typed into a spreadsheet cell), over at most this many lines


def csv_fields(line: str) -> list[str] | None:
    """One line's CSV fields; None where a field is longer than Python's csv module reads (131,072 characters)."""
    try:
        return next(csv.reader([line]), [])
    except csv.Error:
        return None


def join_broken_captions(lines: list[str], i_img: int, report: ParseReport, source: str) -> list[tuple[int, str]]:
    """(line, row) for each line after the header, where a quote opened on one line and closed on one of the next few
    joins those lines into one row. A quote that does not close, or a line between that starts a row of its own (an
    image name in its column), leaves the lines as they are: a stray quote never swallows the rows after it."""
    def starts_row(line):
        fields = csv_fields(line) or []
        return len(fields) > i_img and is_image_name(fields[i_img])

    out, i = [], 1
    while i < len(lines):
        end = i + 1
        if lines[i].count('"') % 2:
            for j in range(i + 1, min(i + CAPTION_LINES, len(lines))):
                if starts_row(lines[j]):
                    break
                if lines[j].count('"') % 2:
                    end = j + 1
                    report.repaired_rows.append({"line": i + 1, "fix": f"a quoted caption over lines {i + 1}-{end}, "
                                                 f"joined", "file": source})
                    break
        out.append((i + 1, " ".join(line for line in lines[i:end] if line.strip())))
        i = end
    return out


def parse_csv_rows(lines: list[str], report: ParseReport, source: str) -> list[tuple[int, str, str]]:
    """`image,caption` rows (Flickr8k's captions.txt, bring-your-own captions.csv) -> (line, image, caption).

    Quoted fields are allowed, a quoted caption over a few lines too; a stray quote cannot swallow the lines after it.
    Extra columns are allowed; an unquoted comma inside a caption is glued back; a row that lost its comma is
    repaired."""
    header = [h.strip().lower() for h in csv_fields(lines[0]) or []] if lines else []
    if "image" not in header or "caption" not in header:
        if not lines:
            raise ValueError(f"{source} is empty")
        for separator, named in SEPARATORS.items():  # Excel saves ';' where the comma is the decimal mark
            if {"image", "caption"} <= {h.strip(' "').lower() for h in lines[0].split(separator)}:
                raise ValueError(f"{source}: its columns are separated by {named} (header {lines[0].strip()!r}), but "
                                 f"they must be separated by commas, as in `image,caption`; save it as comma-separated "
                                 f"CSV (in Excel: \"CSV UTF-8 (Comma delimited)\"), with captions that hold commas "
                                 f"quoted")
        raise ValueError(f"{source}: the first line must be a header naming the columns `image` and `caption`, "
                         f"got {lines[0][:80]!r}")
    i_img, i_cap = header.index("image"), header.index("caption")
    rows = []
    for number, line in join_broken_captions(lines, i_img, report, source):
        if not line.strip():
            continue
        fields = csv_fields(line)
        if fields is None:
            report.dropped_rows.append({"line": number, "reason": f"a field of over {csv.field_size_limit():,} "
                                        f"characters", "text": line[:200], "file": source})
            continue
        extra = len(fields) - len(header)  # > 0: the caption held unquoted commas
        if extra < 0 and (m := CSV_ROW_WITHOUT_DELIMITER.match(line)) and header[:2] == ["image", "caption"]:
            report.repaired_rows.append({"line": number, "fix": "missing ',' delimiter", "text": line, "file": source})
            rows.append((number, m.group(1), m.group(2).strip()))
        elif len(fields) <= max(i_img, i_cap):
            report.dropped_rows.append({"line": number, "reason": "too few columns", "text": line, "file": source})
        else:
            extra = max(extra, 0)
            image = fields[i_img + extra if i_img > i_cap else i_img]
            rows.append((number, image.strip(), ",".join(fields[i_cap:i_cap + 1 + extra]).strip()))
    return rows


def plain_name(image: str, image_dir: str) -> str:
    """A caption row's image as a path to it may spell it: `./x.jpg` or `images/x.jpg` is `x.jpg` in images/."""
    path = PurePosixPath(image)  # drops the `.` of `./x.jpg`
    if len(path.parts) == 2 and path.parts[0] == image_dir:
        return path.name
    return str(path) if path.parts else image


def read_captions(data_dir) -> tuple[list[tuple[int, str, str]], ParseReport]:
    """All usable (line, image name, caption) rows of a data folder's caption file, and what was fixed on the way."""
    caption_file, image_dir = find_layout(data_dir)
    report = ParseReport()
    raw = caption_file.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw[:4096].count(0) > len(raw[:4096]) // 4:  # every other byte
        raise ValueError(f"{caption_file} is UTF-16 text (Excel's \"Unicode text\"?), not UTF-8; save it as UTF-8 "
                         f"(in Excel: \"CSV UTF-8\") and run again")
    lines = decode_lines(raw, report, caption_file.name)
    parse = parse_pipe_rows if caption_file.name == "results.csv" else parse_csv_rows
    rows, seen = [], {}
    for number, image, caption in parse(lines, report, caption_file.name):
        image = plain_name(image, image_dir.name)
        if not caption:
            report.dropped_rows.append({"line": number, "reason": "empty caption", "text": image,
                                        "file": caption_file.name})
        elif not is_image_name(image):
            report.dropped_rows.append({"line": number, "reason": f"{image!r} is not an image file name",
                                        "file": caption_file.name})
        elif (image, caption) in seen:
            report.duplicate_rows.append({"line": number, "first_line": seen[(image, caption)],
                                          "file": caption_file.name})
        else:
            seen[(image, caption)] = number
            rows.append((number, image, caption))
    return rows, report
