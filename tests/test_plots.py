"""plots.py: curves from a metrics log however short or half-written, and the retrieval pictures' markings."""

import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import plots


def hit(rank, row, item, score, match):  # the fields of search.Hit that the pictures read
    return SimpleNamespace(rank=rank, row=row, item=item, score=score, match=match)


def epoch(n: int) -> dict:
    recall = {f"val_{d}_R@{k}": min(100.0, pace * n * k ** 0.5)
              for d, pace in (("i2t", 10.0), ("t2i", 8.0)) for k in (1, 5, 10)}  # the directions differ
    return {"epoch": n, "step": 10 * n, "train_loss": 3.0 / n, "logit_scale": 14.0 + n, "lr_scale": 1.0,
            "seconds": 1.0, "val_loss": 2.5 / n, "val_mean_recall": 10.0 * n, **recall}


def write_log(run_dir, rows, tail: str = "") -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_curves_plot_every_logged_value(tmp_path):
    rows = [epoch(n) for n in (1, 2, 3)]
    del rows[0]["val_loss"]  # a value an epoch did not log is left out, not drawn as a point
    loss, recall, scale = plots.curves_figure(rows).axes
    assert [list(line.get_xdata()) for line in loss.get_lines()] == [[1, 2, 3], [2, 3]]
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [[r["train_loss"] for r in rows],
                                                                      [r["val_loss"] for r in rows[1:]]]
    assert len(recall.get_lines()) == 6
    assert list(recall.get_lines()[5].get_ydata()) == [r["val_t2i_R@10"] for r in rows]
    assert list(scale.get_lines()[0].get_ydata()) == [r["logit_scale"] for r in rows]


def test_curves_png_from_one_epoch_and_a_half_written_line(tmp_path):
    write_log(tmp_path, [epoch(1), {"step": 20}, [2]], tail='{"epoch": 2, "step": 20, "train_lo')  # garbled, half
    assert plots.read_metrics(tmp_path) == [epoch(1)]
    path = plots.plot_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 500


def test_one_epoch_is_one_tick_not_fractions_of_epochs(tmp_path):
    """curves.png as training redraws it after its first epoch: matplotlib spreads ticks of 0.96 ... 1.04 around a
    single point."""
    for ax in plots.curves_figure([epoch(1)]).axes:
        assert list(ax.get_xticks()) == [1]
    ticks = plots.curves_figure([epoch(1), epoch(2), epoch(3)]).axes[0].get_xticks()
    assert all(t == int(t) for t in ticks) and {1, 2, 3} <= set(ticks)


def test_plot_curves_never_raises(tmp_path, capsys):
    assert plots.plot_curves(tmp_path / "no-such-run") is None  # no metrics yet
    assert "could not draw" in capsys.readouterr().out
    write_log(tmp_path, [], tail="garbage\n\n")
    assert plots.plot_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    write_log(tmp_path, [{"epoch": 1}])  # a line without any value still draws (empty panels)
    assert plots.plot_curves(tmp_path) == tmp_path / "curves.png"


def assert_apart(fig, texts, air: float = 2):
    """Draw `fig` and check that no two of `texts` come within `air` pixels; the renderer and the texts' boxes."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [t.get_window_extent(renderer) for t in texts]
    for (a, ta), (b, tb) in itertools.combinations(zip(boxes, texts), 2):
        assert not a.padded(air).overlaps(b), (ta.get_text(), tb.get_text())
    return renderer, boxes


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i in range(4):
        ramp = np.linspace(0, 255, 600, dtype=np.uint8)
        img = np.stack([np.tile(ramp, (400, 1)), np.full((400, 600), 60 * i, np.uint8), np.tile(ramp[::-1], (400, 1))],
                       axis=-1)
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(img).save(paths[-1])  # 600 x 400: drawn as a thumbnail whatever the size
    return paths


def test_text_to_image_grid_frames_the_true_match(pictures, tmp_path):
    hits = [hit(r + 1, r, str(p), 0.9 - 0.1 * r, r == 2) for r, p in enumerate(pictures)]
    fig = plots.text_to_image_figure("a red circle " * 12, hits, columns=3)
    axes = fig.axes
    assert "“a red circle" in fig._suptitle.get_text() and "\n" in fig._suptitle.get_text()  # wrapped
    assert axes[2].get_title().startswith("3. score 0.700") and "true match" in axes[2].get_title()
    assert axes[2].spines["left"].get_edgecolor()[:3] == pytest.approx((0x1a / 255, 0x96 / 255, 0x41 / 255))
    assert "true match" not in axes[0].get_title()
    assert [ax.axison for ax in axes] == [True] * 4 + [False] * 2  # the unused cells of the grid are blank
    assert max(axes[0].images[0].get_array().shape[:2]) == plots.THUMBNAIL  # a 600 x 400 photo, drawn smaller
    path = plots.save_figure(fig, tmp_path / "grid.jpg")
    assert 0 < path.stat().st_size < 300_000 and Image.open(path).format == "JPEG"


def test_grid_texts_never_touch_each_other_or_the_pictures(pictures, tmp_path):
    """As drawn: each file name clears the next row's title, a long name wraps instead of running into its
    neighbour's, and no text lies on a picture; for square pictures (the built-in set) as for wide ones."""
    square = tmp_path / "square.jpg"
    Image.open(pictures[0]).resize((400, 400)).save(square)
    long = tmp_path / ("holiday photo from the beach at sunset with the whole family " * 4 + ".jpg")  # 248 bytes
    long.write_bytes(square.read_bytes())  # no room to spare under a square picture
    for files in ([square] * 9, [long, long] + [square] * 4 + pictures[:3]):  # long names over square pictures
        hits = [hit(r + 1, r, str(f), 0.9 - 0.01 * r, r == 0) for r, f in enumerate(files)]
        fig = plots.text_to_image_figure("a small pink diamond on the left " * 4, hits)
        texts = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label) if t.get_text()]
        renderer, boxes = assert_apart(fig, texts)
        pictures_drawn = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
        for box, text in zip(boxes, texts):
            assert not any(box.overlaps(p) for p in pictures_drawn), text.get_text()


def test_image_to_text_panel_wraps_and_marks_captions(pictures):
    long = "a large red square in the top left, a small pink cross at the top and a large pink triangle at the bottom"
    hits = [hit(1, 0, long, 0.5, True), hit(2, 9, "a blue star", 0.4, False)] + [hit(r, r, long, 0.1, False)
                                                                                 for r in range(3, 6)]
    fig = plots.image_to_text_figure(pictures[0], hits)
    assert_apart(fig, fig.axes[1].texts)  # a wrapped caption pushes the next one down, its score beside it
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts[0].startswith("1. ✓ a large red square") and "\n" in texts[0]
    assert texts[1] == "0.500" and texts[2].startswith("2.") and "✓" not in texts[2]
    assert any("own captions" in t for t in texts)


def test_save_figure_names_the_formats(tmp_path):
    assert Image.open(plots.save_figure(plots.curves_figure([epoch(1)]), tmp_path / "x.JPG")).format == "JPEG"
    with pytest.raises(ValueError, match=r"\.jpg, \.jpeg or \.png"):
        plots.save_figure(plots.curves_figure([epoch(1)]), tmp_path / "x.gif")


def test_dollar_signs_are_drawn_as_typed_not_as_tex(pictures, tmp_path):
    odd = tmp_path / "price_$5_$6.jpg"
    odd.write_bytes(pictures[0].read_bytes())
    query = r"a $\frac{red$ circle for $5"  # unbalanced TeX: mathtext would raise while drawing
    fig = plots.text_to_image_figure(query, [hit(1, 0, str(odd), 0.9, False)])
    assert plots.save_figure(fig, tmp_path / "grid.png").stat().st_size > 0
    assert "$5" in fig._suptitle.get_text() and fig.axes[0].get_xlabel() == "price_$5_$6.jpg"
    panel = plots.image_to_text_figure(odd, [hit(1, 0, query, 0.5, False)])
    assert plots.save_figure(panel, tmp_path / "panel.png").stat().st_size > 0


@pytest.mark.filterwarnings("error:Glyph")  # a character the font lacks is drawn as an empty box: a failure here
def test_a_file_name_that_is_not_utf8_is_drawn_not_a_crash(pictures, tmp_path):
    """Python holds a name that is not UTF-8 on disk with surrogates, which matplotlib refuses to draw (a TypeError
    from set_text); the stray byte is drawn as U+FFFD instead, as a terminal shows it."""
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, as an old camera or zip may name it
    odd.write_bytes(pictures[0].read_bytes())
    grid = plots.text_to_image_figure("a red circle", [hit(1, 0, str(odd), 0.9, False)])
    assert grid.axes[0].get_xlabel() == "caf\N{REPLACEMENT CHARACTER}.jpg"
    assert plots.save_figure(grid, tmp_path / "grid.jpg").stat().st_size > 0
    panel = plots.image_to_text_figure(odd, [hit(1, 0, "a red circle", 0.5, False)])
    assert panel.axes[0].get_title() == "query: caf\N{REPLACEMENT CHARACTER}.jpg"
    assert plots.save_figure(panel, tmp_path / "panel.png").stat().st_size > 0
