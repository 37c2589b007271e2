"""search.py on a tiny model trained here: ranking against a second computation, index reuse and rebuild, folders of
your own images, the pictures, and the error messages."""

import json
import os
import shutil
import time

import pytest
import torch
from PIL import Image

import checkpoint
import evaluate
import search
import train
import utils
from conftest import TINY
from dataset import CaptionData, legacy_train_names
from evaluate import retrieval_metrics

JPEG_LIMIT = 300_000  # bytes: results/ pictures must stay small enough for a README


def tiny_run(tmp_path_factory, shapes_dir):
    """One tiny model trained on the shapes fixture, shared by the search and notebook tests of a session."""
    run = tmp_path_factory.getbasetemp() / "search-tiny-run"
    if not (run / "best" / "checkpoint.json").exists():
        train.main(TINY + ["--data-dir", str(shapes_dir), "--run-dir", str(run), "--epochs", "3"])
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_dir):
    return tiny_run(tmp_path_factory, shapes_dir)


@pytest.fixture(scope="module")
def searcher(run):
    return search.load_searcher(run / "best", "cpu")


@pytest.fixture(scope="module")
def index(searcher, shapes_dir):
    return search.dataset_index(searcher, shapes_dir, "test")


def copy_data(src, dst):
    """A private copy of a data folder, for tests that change files (the fixture's is shared)."""
    return shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache", "tokenizer"))


def test_top_k_ranks_by_cosine_and_bounds_k():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    query = torch.nn.functional.normalize(torch.tensor([1.0, 1.0]), dim=0)
    ranked = search.top_k(query, emb, 3)
    assert [row for row, _ in ranked] == [1, 0, 2] or [row for row, _ in ranked] == [1, 2, 0]  # rows 0, 2 tie
    assert ranked[0][1] == pytest.approx((0.6 + 0.8) / 2 ** 0.5)
    for k in (0, 5):
        with pytest.raises(ValueError, match="between 1 and the 4 items"):
            search.top_k(query, emb, k)


def test_index_holds_the_split_as_evaluation_sees_it(index, run, shapes_dir):
    assert index.image_emb.shape[0] == len(index.paths) == 40
    assert index.text_emb.shape[0] == len(index.captions) == len(index.caption_image) == 200
    assert all(os.path.isfile(p) for p in index.paths)
    assert torch.allclose(index.image_emb.norm(dim=1), torch.ones(40), atol=1e-5)
    # training evaluated the best checkpoint on the same split through the image cache; the index decodes the files
    ours = retrieval_metrics(index.image_emb, index.text_emb, index.caption_image)
    theirs = json.loads((run / "test_metrics.json").read_text())
    for key in ["i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "t2i_R@10"]:
        assert ours[key] == pytest.approx(theirs[key], abs=1.0), key


def test_queries_embed_exactly_as_the_index_does(searcher, index):
    """A query caption or image goes through the same path as the collection, so self-similarity is exact."""
    for c in (0, 57, 199):
        assert torch.allclose(search.embed_text(searcher, index.captions[c]), index.text_emb[c], atol=1e-4)
    for i in (0, 21):
        assert torch.allclose(search.embed_image(searcher, index.paths[i]), index.image_emb[i], atol=1e-4)


def test_text_search_ranks_the_captioned_image(searcher, index):
    """Test captions as queries: their images are marked, and the hit rate is evaluation's text -> image recall."""
    queries = list(range(0, len(index.captions), 4))  # 50: every 4th caption, so all five styles appear
    found = 0
    for c in queries:
        hits = search.search_text(searcher, index, index.captions[c], k=5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        # short captions ("a picture with a large red circle") can describe several images: all of them match
        own = {int(index.caption_image[d]) for d, other in enumerate(index.captions) if other == index.captions[c]}
        assert [h.match for h in hits] == [h.row in own for h in hits]
        assert all(h.item == index.paths[h.row] for h in hits)
        found += int(index.caption_image[c]) in [h.row for h in hits]
    recall = retrieval_metrics(index.image_emb, index.text_emb[queries], index.caption_image[queries])["t2i_R@5"]
    assert 100 * found / len(queries) == pytest.approx(recall, abs=2.0)  # one query may flip on a near tie
    assert recall > 40  # chance is 5 of 40 images, 12.5%: the tiny model has learnt something


def test_image_search_marks_the_images_own_captions(searcher, index, tmp_path):
    """Images as queries: own captions are marked, and the best caption is the naive argmax over all captions."""
    for i in range(0, 40, 4):
        hits = search.search_image(searcher, index, index.paths[i], k=5)
        own = set((index.caption_image == i).nonzero().flatten().tolist())
        assert [h.match for h in hits] == [h.row in own for h in hits]
        assert [h.item for h in hits] == [index.captions[h.row] for h in hits]
        assert hits[0].row == int((index.text_emb @ index.image_emb[i]).argmax())
    stranger = shutil.copy(index.paths[7], tmp_path / "copy.jpg")  # same pixels, but not an image of the index
    hits = search.search_image(searcher, index, stranger, k=5)
    assert [h.row for h in hits] == [h.row for h in search.search_image(searcher, index, index.paths[7], k=5)]
    assert not any(h.match for h in hits)


def test_index_is_reused_until_an_image_or_caption_changes(searcher, shapes_dir, tmp_path, monkeypatch):
    data = copy_data(shapes_dir, tmp_path / "data")
    first = search.dataset_index(searcher, data)
    assert first.built and first.file.parent == searcher.folder
    stamp = first.file.stat().st_mtime_ns

    def no_embedding(*args, **kwargs):
        raise AssertionError("the index was embedded again")

    with monkeypatch.context() as m:
        m.setattr(search, "embed_images", no_embedding)
        again = search.dataset_index(searcher, data)
    assert not again.built and again.file.stat().st_mtime_ns == stamp
    assert torch.equal(again.image_emb, first.image_emb) and again.captions == first.captions

    touched = first.paths[3]
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))
    assert search.dataset_index(searcher, data).built
    assert not search.dataset_index(searcher, data).built

    csv = data / "results.csv"
    caption = first.captions[0]
    csv.write_text(csv.read_text().replace(f"| {caption}\n", "| a caption that was rewritten\n", 1))
    rebuilt = search.dataset_index(searcher, data)
    assert rebuilt.built and "a caption that was rewritten" in rebuilt.captions


def test_index_is_rebuilt_for_a_changed_checkpoint(run, shapes_dir, tmp_path):
    ckpt = shutil.copytree(run / "best", tmp_path / "ckpt", ignore=shutil.ignore_patterns("index-*", "training_*"))
    assert search.dataset_index(search.load_searcher(ckpt, "cpu"), shapes_dir).built
    assert not search.dataset_index(search.load_searcher(ckpt, "cpu"), shapes_dir).built
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
    assert search.dataset_index(search.load_searcher(ckpt, "cpu"), shapes_dir).built


def test_a_checkpoint_keeps_its_most_recently_used_indexes(run, shapes_dir, tmp_path, monkeypatch, capsys):
    """Each split or folder searched leaves an index in the checkpoint folder: beyond KEEP_INDEXES, the least recently
    used (built or reused) one goes, with a note naming what it held."""
    monkeypatch.setattr(search, "KEEP_INDEXES", 2)
    ckpt = shutil.copytree(run / "best", tmp_path / "ckpt", ignore=shutil.ignore_patterns("index-*", "training_*"))
    stale, live = ckpt / ".index-0123456789ab.safetensors.x1.tmp", ckpt / ".index-0123456789ab.safetensors.x2.tmp"
    stale.write_bytes(b"a killed search's half-written index")
    live.write_bytes(b"another search writing now")
    os.utime(stale, (time.time() - 2 * search.STALE_TMP_SECONDS,) * 2)
    s = search.load_searcher(ckpt, "cpu")
    test = search.dataset_index(s, shapes_dir, "test")
    assert not stale.exists() and live.exists()
    val = search.dataset_index(s, shapes_dir, "val")
    assert not search.dataset_index(s, shapes_dir, "test").built  # reused: now more recently used than val
    capsys.readouterr()
    folder = search.folder_index(s, os.path.dirname(test.paths[0]))
    assert sorted(ckpt.glob("index-*")) == sorted([test.file, folder.file])
    assert f"removed the search index of the val split of {shapes_dir} from {ckpt} ({val.file.name})" in \
        capsys.readouterr().out


def test_a_folder_of_your_own_images(searcher, index, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    for i in range(4):
        shutil.copy(index.paths[i], folder / f"{i}.jpg")
    Image.open(index.paths[4]).resize((300, 170)).save(folder / "holiday" / "wide.PNG")  # any size, any case
    shutil.copy(index.paths[5], folder / ".thumbnails" / "hidden.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")

    built = search.folder_index(searcher, folder)
    assert "skipping 1 files" in capsys.readouterr().out
    names = [os.path.relpath(p, folder) for p in built.paths]
    assert names == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", os.path.join("holiday", "wide.PNG")]
    assert built.built and built.captions == [] and built.text_emb.shape[0] == 0
    assert torch.allclose(built.image_emb[:4], index.image_emb[:4], atol=1e-4)  # same pixels, same embeddings

    assert not search.folder_index(searcher, folder).built
    assert f"skipping 1 files that are not readable images (found when it was built), e.g. {folder / 'broken.jpg'}" \
        in capsys.readouterr().out  # a search that reuses the index says so too
    shutil.copy(index.paths[6], folder / "holiday" / "new.jpg")
    grown = search.folder_index(searcher, folder)
    assert grown.built and len(grown.paths) == 6

    caption = index.captions[int((index.caption_image == 2).nonzero()[0])]
    hits = search.search_text(searcher, grown, caption, k=6)
    assert sorted(h.item for h in hits) == sorted(grown.paths) and not any(h.match for h in hits)
    with pytest.raises(ValueError, match="has none"):
        search.search_image(searcher, grown, index.paths[0])


def test_command_prints_ranks_and_draws_pictures(run, shapes_dir, tmp_path, capsys):
    base = ["--checkpoint", str(run / "best"), "--data-dir", str(shapes_dir), "--device", "cpu"]
    hits = search.main(base + ["--text", "a red circle", "--k", "9", "--out", str(tmp_path / "grid.jpg")])
    printed = capsys.readouterr().out
    assert len(hits) == 9 and "'a red circle'" in printed and "   9. " in printed
    assert 0 < (tmp_path / "grid.jpg").stat().st_size < JPEG_LIMIT
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"

    image = search.dataset_index(search.load_searcher(run / "best", "cpu"), shapes_dir, verbose=False).paths[0]
    hits = search.main(base + ["--image", image, "--out", str(tmp_path / "captions.png")])
    assert len(hits) == 5 and Image.open(tmp_path / "captions.png").format == "PNG"

    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(image, folder / "a.jpg")
    shutil.copy(image, folder / "b.jpg")
    hits = search.main(base[:2] + ["--images", str(folder), "--text", "a red circle", "--k", "2"])
    assert {os.path.basename(h.item) for h in hits} == {"a.jpg", "b.jpg"}


def test_make_results_writes_the_readme_pictures(run, shapes_dir, tmp_path):
    args = ["--checkpoint", str(run / "best"), "--data-dir", str(shapes_dir), "--device", "cpu", "--make-results"]
    written = search.main(args + [str(tmp_path / "a")])
    names = sorted(p.name for p in written)
    assert names == ["curves.png", "image2text_1.jpg", "image2text_2.jpg", "image2text_3.jpg",
                     "text2image_1.jpg", "text2image_2.jpg", "text2image_3.jpg"]
    assert all(0 < p.stat().st_size < JPEG_LIMIT for p in written)
    again = search.main(args + [str(tmp_path / "b")])  # deterministic: the same queries draw the same pictures
    for a, b in zip(written, again):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--text", "x", "--checkpoint", "{tmp}/nothing"], "nothing does not exist; pass a run's `best`"),
    (["--text", "x", "--checkpoint", "{tmp}/empty"], "empty is not a checkpoint (no checkpoint.json)"),
    (["--text", "x", "--checkpoint", "{tmp}/notes.txt"], "notes.txt is a file, not a checkpoint folder"),
    (["--checkpoint", "{run}"], "one of the arguments --text --image --make-results is required"),
    (["--checkpoint", "{run}", "--text", "x", "--image", "y.jpg"], "not allowed with argument"),
    (["--checkpoint", "{run}", "--text", "  "], "--text is empty"),
    (["--checkpoint", "{run}", "--text", "\u200b"], "the query '\\u200b' holds no words the tokenizer reads"),
    (["--checkpoint", "{run}", "--text", "x", "--out", ""], "argument --out: is empty (an unset shell variable?)"),
    (["--checkpoint", "{run}", "--data-dir", "", "--text", "x"], "argument --data-dir: is empty"),
    # a folder of pictures without captions is searched with --images, not read as a data set
    (["--checkpoint", "{run}", "--data-dir", "{tmp}/photos", "--text", "x"],
     "(to search a folder of pictures without captions: --images {tmp}/photos --text ...)"),
    (["--checkpoint", "{run}", "--text", os.fsdecode(b"caf\xe9")], "--text b'caf\\xe9' is not UTF-8 text"),
    (["--checkpoint", "{run}", "--image", "{tmp}/missing.jpg"], "no such file"),
    (["--checkpoint", "{run}", "--image", "{tmp}/notes.txt"], "notes.txt is not an image this can read"),
    (["--checkpoint", "{run}", "--image", "{tmp}/empty"], "empty is a folder; name one image file, or search"),
    (["--checkpoint", "{run}", "--images", "{tmp}", "--image", "{tmp}/x.jpg"], "--images FOLDER has none"),
    (["--checkpoint", "{run}", "--images", "{tmp}/nowhere", "--text", "x"], "is not a folder"),
    (["--checkpoint", "{run}", "--images", "{tmp}/empty", "--text", "x"], "holds no image files"),
    (["--checkpoint", "{run}", "--data-dir", "{data}", "--text", "x", "--k", "41"], "between 1 and the 40 items"),
    (["--checkpoint", "{run}", "--text", "x", "--k", "0"], "--k must be at least 1"),
    (["--checkpoint", "{run}", "--text", "x", "--out", "{tmp}/x.gif"], "name a .jpg, .jpeg or .png file"),
    (["--checkpoint", "{run}", "--make-results", "{tmp}", "--k", "3"], "drop --images, --k and --out"),
    (["--checkpoint", "{run}", "--images", "{tmp}", "--split", "val", "--text", "x"], "--split choose a data split"),
    (["--checkpoint", "{run}", "--text", "x", "--out", "{tmp}/empty"], "is a folder; name the picture"),
    (["--checkpoint", "{run}", "--text", "x", "--out", "{tmp}/notes.txt/x.jpg"],
     "notes.txt/x.jpg: could not write the picture"),
    (["--checkpoint", "{run}", "--make-results", "{tmp}/notes.txt"], "notes.txt: could not write the pictures"),
])
def test_clear_errors(argv, message, run, shapes_dir, tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.jpg")
    argv = [a.format(tmp=tmp_path, run=run / "best", data=shapes_dir) for a in argv]
    with pytest.raises(SystemExit) as e:
        search.main(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_query_of_no_words_is_refused_in_the_notebooks_calls_too(searcher, index):
    for text in ["", "   ", "\u200b", "\x00"]:  # it would rank as a blank query, looking like an answer
        with pytest.raises(ValueError, match="holds no words the tokenizer reads"):
            search.search_text(searcher, index, text)


def test_a_linked_subfolder_of_a_searched_folder_is_searched_once(tmp_path):
    """rglob does not enter linked folders (an external disk, a synced folder): their pictures went unsearched."""
    for folder, name in [("mine/real", "a.png"), ("disk", "b.png"), ("disk/.hidden", "c.png")]:
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / name)
    (tmp_path / "mine" / "linked").symlink_to(tmp_path / "disk")
    (tmp_path / "mine" / "again").symlink_to(tmp_path / "disk")  # the same folder twice: its pictures once
    (tmp_path / "disk" / "loop").symlink_to(tmp_path / "mine")  # a link back up the tree: no endless walk
    assert search.list_images(tmp_path / "mine") == [str(tmp_path / "disk" / "b.png"),
                                                     str(tmp_path / "mine" / "real" / "a.png")]


def test_damaged_checkpoint_files_and_bad_evaluate_flags_are_named(run, tmp_path, capsys):
    damaged = shutil.copytree(run / "best", tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit):
        search.main(["--checkpoint", str(damaged), "--text", "x", "--device", "cpu"])
    assert "model.safetensors is damaged" in capsys.readouterr().err
    (damaged / "checkpoint.json").write_text("{not json")
    for argv, message in [(["--checkpoint", str(damaged)], "checkpoint.json is damaged"),
                          (["--checkpoint", str(tmp_path / "nothing")], "nothing does not exist"),
                          (["--checkpoint", str(run / "best"), "--batch-size", "0"], "--batch-size must be at"),
                          (["--checkpoint", str(run / "best"), "--json", ""], "argument --json: is empty"),
                          (["--checkpoint", str(run / "best"), "--num-workers", "100000"],
                           "--num-workers 100000 is far more than this machine's")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--device", "cpu"])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_evaluate_json_that_cannot_be_written_is_named(run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    for target, message in [(tmp_path, "is a folder; name the file to write"),
                            (tmp_path / "notes.txt" / "m.json", "m.json: could not write the metrics")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(run / "best"), "--json", str(target), "--device", "cpu"])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_file_inside_a_checkpoint_folder_stands_for_the_folder(run, shapes_dir, capsys):
    """A file picker hands out best/model.safetensors or best/checkpoint.json: both mean best/, and the table's
    title names the folder that was evaluated."""
    for name in ("checkpoint.json", "model.safetensors"):
        assert checkpoint.resolve(run / "best" / name) == checkpoint.resolve(run / "best")
    metrics = evaluate.main(["--checkpoint", str(run / "best" / "model.safetensors"), "--device", "cpu"])
    assert metrics["checkpoint"] == str(checkpoint.resolve(run / "best"))
    assert f"checkpoint {run / 'best'}\n" in capsys.readouterr().out
    hits = search.main(["--checkpoint", str(run / "best" / "checkpoint.json"), "--data-dir", str(shapes_dir),
                        "--text", "a red circle", "--k", "3", "--device", "cpu"])
    assert len(hits) == 3


def test_a_run_stopped_before_its_first_best_names_its_last(run, tmp_path, capsys):
    """A run killed mid-epoch 1 has only `last`: evaluating the run says so and names it, and `last` itself works."""
    stopped = shutil.copytree(run, tmp_path / "se", symlinks=True, ignore=shutil.ignore_patterns("index-*"))
    (stopped / "best").unlink()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(stopped), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no `best` checkpoint yet" in err and f"is {stopped / 'last'}: pass that" in err
    evaluate.main(["--checkpoint", str(stopped / "last"), "--device", "cpu"])
    assert f"checkpoint {stopped / 'last'}\n" in capsys.readouterr().out


def test_a_checkpoint_shared_alone_loads_without_its_training_state_and_says_what_it_cannot_check(run, shapes_dir,
                                                                                                    tmp_path, capsys):
    """Copied out of its run and without training_state.safetensors (optimiser moments, most of its size): search and
    evaluation work, and evaluation says the overlap with its training images is unknown instead of staying silent."""
    alone = shutil.copytree(run / "best", tmp_path / "copied" / "best",
                            ignore=shutil.ignore_patterns("index-*", "training_state.safetensors"))
    metrics = evaluate.main(["--checkpoint", str(alone), "--device", "cpu"])
    assert metrics["n_images"] == 40 and "seen_in_training" not in metrics
    err = capsys.readouterr().err
    assert f"whether checkpoint {alone} trained on any of these test images cannot be checked" in err
    assert "no RUN/splits.json lies beside it" in err
    assert len(search.main(["--checkpoint", str(alone), "--text", "a red circle", "--k", "3", "--device", "cpu"])) == 3
    assert "cannot be checked" in capsys.readouterr().err  # searching the test split says it too


def test_a_copied_best_link_is_named_as_a_link(run, tmp_path, capsys):
    """`cp -r RUN/best elsewhere` copies the link, whose relative target then points nowhere."""
    (tmp_path / "best").symlink_to(os.readlink(run / "best"))
    with pytest.raises(SystemExit):
        search.main(["--checkpoint", str(tmp_path / "best"), "--text", "x", "--device", "cpu"])
    assert f"best is a link to {os.readlink(run / 'best')}, which is not there" in capsys.readouterr().err


def test_latest_checkpoint_is_the_newest_best(tmp_path, run):
    with pytest.raises(FileNotFoundError, match="train one with"):
        search.latest_checkpoint(tmp_path)
    for name, age in [("old", 100), ("new", 0)]:
        shutil.copytree(run / "best", tmp_path / name / "best", ignore=shutil.ignore_patterns("*.safetensors"))
        info = tmp_path / name / "best" / "checkpoint.json"
        os.utime(info, (info.stat().st_atime - age, info.stat().st_mtime - age))
    assert search.latest_checkpoint(tmp_path) == tmp_path / "new" / "best"


def test_small_folders_links_and_unknown_words(run, shapes_dir, tmp_path, capsys):
    image = search.dataset_index(search.load_searcher(run / "best", "cpu"), shapes_dir, verbose=False).paths[0]
    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(image, folder / name)
    (folder / "link.jpg").symlink_to(folder / "a.jpg")  # the same file twice: one hit
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")  # a spacer: too small for training, and for search too
    base = ["--checkpoint", str(run / "best"), "--images", str(folder), "--device", "cpu"]
    hits = search.main(base + ["--text", "a red circle"])  # fewer images than the default --k of 9
    assert sorted(os.path.basename(h.item) for h in hits) == ["a.jpg", "b.jpg"]
    printed = capsys.readouterr().out
    assert "over 2 images in" in printed and "vocabulary" not in printed
    assert "skipping 2 files" in printed and "dot.png (ValueError: too small (1x1))" in printed
    search.main(base + ["--text", "\U0001F534\U0001F53A"])  # emoji: [UNK] [UNK] to this tokenizer
    assert "vocabulary knows none of the words" in capsys.readouterr().out
    search.main(base + ["--text", "a red circle \U0001F534"])  # one unknown word among known ones
    assert "vocabulary lacks '\U0001F534': it reads as [UNK]" in capsys.readouterr().out
    search.main(base + ["--text", "a red circle " * 20 + "and a blue square"])  # beyond the preset's 32 tokens
    printed = capsys.readouterr().out
    assert "reads the first 32 tokens of a query (its max_length), so it ignores '" in printed
    assert "and a blue square'" in printed
    search.main(base + ["--text", "a red circle " * 10])  # 30 words, 32 tokens with [CLS] and [SEP]: all read
    assert "tokens of a query" not in capsys.readouterr().out


def test_evaluation_of_a_run_from_before_split_records_checks_the_split_of_its_time(run, shapes_dir, tmp_path,
                                                                                     capsys):
    old = shutil.copytree(run, tmp_path / "old-run", symlinks=True, ignore=shutil.ignore_patterns("index-*"))
    (old / "splits.json").unlink()
    data = CaptionData(shapes_dir, verbose=False)
    expected = set(data.splits["test"].images) & set(legacy_train_names(list(data.captions)))
    assert len(expected) > 20  # the old shuffle put most of today's test images into training
    metrics = evaluate.main(["--checkpoint", str(old / "best"), "--device", "cpu", "--json",
                             str(tmp_path / "new" / "folder" / "test.json")])  # a folder that does not exist yet
    assert metrics["seen_in_training"] == len(expected)
    assert f"WARNING: {len(expected)} of the 40 test images" in capsys.readouterr().err
    assert json.loads((tmp_path / "new" / "folder" / "test.json").read_text())["seen_in_training"] == len(expected)
    search.dataset_index(search.load_searcher(old / "best", "cpu"), split="test")  # the notebook's path says it too
    assert "predates RUN/splits.json" in capsys.readouterr().err


def test_a_run_from_before_split_records_is_not_checked_against_the_old_default_on_a_folder_with_a_split_file(
        tiny_shapes_dir, tmp_path):
    """The default split of its time applied only to folders without splits.json: with one, what such a run trained
    on cannot be known (None), and no overlap is made up from the old shuffle."""
    data_dir = copy_data(tiny_shapes_dir, tmp_path / "data")
    splits = CaptionData(data_dir, verbose=False).splits
    (data_dir / "splits.json").write_text(json.dumps({s: list(splits[s].images) for s in ("train", "val", "test")}))
    checkpoint = tmp_path / "old-run" / "checkpoints" / "best"  # a run folder without RUN/splits.json
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.json").write_text(json.dumps({"config": {"data_dir": str(data_dir)}}))
    assert evaluate.seen_in_training(checkpoint, CaptionData(data_dir, verbose=False), "test") is None


def test_unavailable_devices_are_named(run, capsys):
    for device, message in [("mps", "Apple's MPS"), ("cuda", "no CUDA GPU")]:
        if getattr(torch.backends, device if device == "mps" else "cudnn").is_available():
            continue
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(run / "best"), "--device", device])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_query_differing_only_in_case_and_spaces_still_marks_its_image(searcher, index):
    c = 57
    exact = search_marks(searcher, index, index.captions[c])
    loose = search_marks(searcher, index, "  " + index.captions[c].upper().replace(" ", "  ") + " ")
    assert any(exact.values()) and loose == exact


def search_marks(searcher, index, text):
    import search
    return {h.row: h.match for h in search.search_text(searcher, index, text, k=len(index.paths))}


def test_an_image_named_through_a_link_marks_its_own_captions(searcher, index, tmp_path):
    import search
    link = tmp_path / "link.jpg"
    link.symlink_to(index.paths[3])
    hits = search.search_image(searcher, index, str(link), k=len(index.captions))
    assert sum(h.match for h in hits) == int((index.caption_image == 3).sum()) == 5


def test_a_data_folder_moved_since_training_is_named_with_the_flag_to_find_it(run, tmp_path, capsys):
    """The checkpoint's data folder is gone (moved, renamed): evaluate.py and search.py say so and name --data-dir,
    rather than suggest downloading Flickr30k or drawing the shapes set into it."""
    moved = shutil.copytree(run / "best", tmp_path / "best", ignore=shutil.ignore_patterns("index-*"))
    info = json.loads((moved / "checkpoint.json").read_text())
    info["config"]["data_dir"] = str(tmp_path / "gone")
    (moved / "checkpoint.json").write_text(json.dumps(info))
    for main in (evaluate.main, search.main):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(moved), "--device", "cpu"] + (["--text", "x"] if main is search.main else []))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"trained on the data folder {tmp_path / 'gone'}, which is not there" in err
        assert "--data-dir" in err and "download.py" not in err


def test_evaluate_runs_the_kernels_training_ran(run, monkeypatch):
    """On CUDA, TF32 in the similarity matrix can flip near-ties: evaluate.py sets what train.py sets, so that it
    reproduces the run's test_metrics.json."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        utils.fast_cuda_kernels(torch.device("cpu"))
        assert not any((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                        torch.backends.cudnn.allow_tf32))
        utils.fast_cuda_kernels(torch.device("cuda", 0))  # setting the flags needs no GPU
        assert all((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags[:2]
        torch.backends.cudnn.allow_tf32 = flags[2]
    seen = []
    monkeypatch.setattr(evaluate, "fast_cuda_kernels", seen.append)
    evaluate.main(["--checkpoint", str(run / "best"), "--device", "cpu"])
    assert seen == [torch.device("cpu")]


def test_an_undecodable_image_leaves_the_rest_of_its_split_searchable(searcher, shapes_dir, tmp_path, capsys):
    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data, ignore=shutil.ignore_patterns(".cache", "prepare_report.json"))
    test = CaptionData(data, verbose=False).splits["test"]
    broken = test.images[3]
    (data / "images" / broken).write_bytes(b"not a picture")
    index = search.dataset_index(searcher, data, "test")
    assert f"skipping 1 images that failed to decode, e.g. ['{broken}']" in capsys.readouterr().out
    assert len(index.paths) == len(index.image_emb) == len(test.images) - 1
    assert str((data / "images" / broken).resolve()) not in index.paths
    assert len(index.captions) == len(index.caption_image) == len(test.captions) - 5
    assert len(search.search_text(searcher, index, "a red circle", 3)) == 3


def test_a_checkpoint_copied_without_its_tokenizer_says_what_is_missing(run, tmp_path, capsys):
    copy = tmp_path / "best"
    shutil.copytree(run / "best", copy, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(copy), "--device", "cpu"])
    assert f"{copy} lacks tokenizer: a checkpoint is its whole folder" in capsys.readouterr().err
    (copy / "tokenizer").mkdir()  # there, but empty
    with pytest.raises(ValueError, match=f"{copy / 'tokenizer'} is damaged"):
        checkpoint.read_tokenizer(copy)


def test_a_checkpoint_that_is_not_there_names_the_runs_there_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/shapes/best does not exist; .*no run has been trained here yet "
                                                r"\(`make demo` trains runs/shapes\)"):
        checkpoint.locate("runs/shapes/best")
    (tmp_path / "runs" / "mine" / "best").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"runs here: \['runs/mine/best'\]"):
        checkpoint.locate("runs/shapes/best")
