"""The cache gives the JPEG path's pixels; device-side augmentation matches its CPU definition."""

import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from images import (JpegSource, Pixels, build_cache, check_image, crop_resize, fingerprint, full_boxes, load_rgb,
                    reference_crop_resize, sample_boxes, square_size, square_transform, to_square)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(path, w, h, seed=0):
    """A smooth, photo-like test image (JPEG artefacts of pure noise would make everything flaky)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    channels = [np.sin(x / rng.uniform(5, 20) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 20)) for _ in range(3)]
    Image.fromarray((np.stack(channels, -1) * 120 + 128).astype(np.uint8)).save(path, quality=92)
    return path


def test_cache_holds_exactly_the_jpeg_paths_pixels(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 500, 375, i) for i in range(6)]
    cache, failed = build_cache(paths, 73, tmp_path / "cache")
    assert failed == []
    jpeg = JpegSource(paths, 73)
    order = np.array([4, 0, 5, 1])
    assert np.array_equal(cache.get(order), jpeg.get(order))
    assert cache.get(order).shape == (4, 73, 73, 3)


def test_cache_is_reused_while_files_are_unchanged_and_rebuilt_after(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 80, 60, i) for i in range(3)]
    first, _ = build_cache(paths, 32, tmp_path / "cache")
    stamp = (tmp_path / "cache" / first.file.split("/")[-1]).stat().st_mtime_ns
    again, _ = build_cache(paths, 32, tmp_path / "cache")
    assert again.file == first.file and (tmp_path / "cache" / first.file.split("/")[-1]).stat().st_mtime_ns == stamp
    photo(paths[1], 80, 60, seed=99)  # same name, new content
    rebuilt, _ = build_cache(paths, 32, tmp_path / "cache")
    assert np.array_equal(rebuilt.get([1])[0], to_square(paths[1], 32))


def test_a_cache_for_another_list_of_files_is_replaced_and_other_sizes_are_kept(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 80, 60, i) for i in range(3)]
    build_cache(paths, 32, tmp_path / "cache")
    build_cache(paths, 24, tmp_path / "cache")  # another model's resolution
    build_cache(paths[:2], 32, tmp_path / "cache")  # one image gone: the 3-image cache of 32 px is stale
    left = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir())
    assert left == ["24px", "24px", "32px", "32px"]  # one .npy and one .json each
    assert np.load(next((tmp_path / "cache").glob("images-32px-*.npy")), mmap_mode="r").shape[0] == 2


@pytest.mark.parametrize("found", [False, True])
def test_a_cache_still_in_use_survives_a_build_for_other_files_and_goes_once_released(tmp_path, found):
    """A training run reads its cache lazily (validation, data-loader workers); evaluate.py building a cache for a
    new list of files (a caption edit dropped an image) must not delete it from under the run."""
    paths = [photo(tmp_path / f"{i}.jpg", 80, 60, i) for i in range(3)]
    cache = tmp_path / "cache"
    if found:
        build_cache(paths, 32, cache)  # built by an earlier run, which has ended
    in_use, _ = build_cache(paths, 32, cache)  # holds its lock while it lives, as the training run's does
    build_cache(paths[:2], 32, cache)
    assert np.array_equal(in_use.get([2])[0], to_square(paths[2], 32))  # first opened only now, after the build
    assert len(list(cache.glob("images-32px-*.npy"))) == 2
    old = Path(in_use.file)
    del in_use  # the run ends: its lock goes with it
    build_cache(paths[:2], 32, cache)  # found, and the next call tidies up
    assert not old.exists() and not old.with_suffix(".json").exists()
    assert len(list(cache.glob("images-32px-*"))) == 2  # the 2-image cache's .npy and .json


def test_a_moved_data_folder_keeps_its_cache(tmp_path, monkeypatch):
    """The cache lives in the data folder (DATA/.cache): moving the folder on one file system keeps every inode and
    time, so nothing needs decoding again, and failed files are reported where they are now."""
    import images

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    paths = [photo(data / "images" / f"{i}.jpg", 80, 60, i) for i in range(3)] + [data / "images" / "broken.jpg"]
    paths[-1].write_bytes(b"not an image")
    before, _ = build_cache(paths, 32, data / ".cache")
    pixels = before.get([0, 1, 2])
    os.rename(data, tmp_path / "moved")

    def decode_again(*args):
        raise AssertionError("the cache of a moved folder was built again")

    monkeypatch.setattr(images, "_decode_into", decode_again)
    moved = [tmp_path / "moved" / p.relative_to(data) for p in paths]
    after, failed = build_cache(moved, 32, tmp_path / "moved" / ".cache")
    assert np.array_equal(after.get([0, 1, 2]), pixels) and failed == [str(moved[-1])]


def test_a_meta_file_cut_short_means_a_rebuild(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 80, 60, i) for i in range(2)]
    first, _ = build_cache(paths, 32, tmp_path / "cache")
    meta_file = Path(first.file).with_suffix(".json")
    meta_file.write_text(meta_file.read_text()[:20])  # the machine went down while it was written
    np.load(first.file, mmap_mode="r+")[:] = 0  # so that only a rebuild gives the right pixels
    rebuilt, failed = build_cache(paths, 32, tmp_path / "cache")
    assert failed == [] and np.array_equal(rebuilt.get([0, 1]), JpegSource(paths, 32).get([0, 1]))
    assert json.loads(meta_file.read_text())["count"] == 2


def test_cache_reports_files_that_do_not_decode(tmp_path):
    paths = [photo(tmp_path / "ok.jpg", 40, 40), tmp_path / "broken.jpg"]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    _, failed = build_cache(paths, 16, tmp_path / "cache")
    assert failed == [str(tmp_path / "broken.jpg")]


def test_a_cache_built_by_an_older_decoder_is_rebuilt(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 80, 60, i) for i in range(2)]
    first, _ = build_cache(paths, 32, tmp_path / "cache")
    meta_file = tmp_path / "cache" / first.file.split("/")[-1].replace(".npy", ".json")
    meta = json.loads(meta_file.read_text())
    np.load(first.file, mmap_mode="r+")[:] = 0  # what another decoder might have left
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "version"}))  # as version 1 wrote it
    rebuilt, _ = build_cache(paths, 32, tmp_path / "cache")
    assert np.array_equal(rebuilt.get([0, 1]), JpegSource(paths, 32).get([0, 1]))


def test_big_jpegs_decode_at_reduced_scale_to_nearly_the_same_square(tmp_path):
    small = photo(tmp_path / "small.png", 256, 192)  # detail a camera resolves: smooth at 1024 px
    path = tmp_path / "big.jpg"
    Image.open(small).convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC).save(path, quality=92)
    assert load_rgb(path).size == (1024, 768)
    assert load_rgb(path, min_side=128).size == (256, 192)  # 1/4 scale: 1/8 would leave the short side at 96 < 128
    assert load_rgb(photo(tmp_path / "flickr.jpg", 500, 375), min_side=256).size == (500, 375)
    full = square_transform(128)(image=np.asarray(load_rgb(path)))["image"].astype(int)
    drafted = to_square(path, 128).astype(int)
    assert drafted.shape == (128, 128, 3)
    assert np.abs(drafted - full).mean() < 1 and np.abs(drafted - full).max() <= 6  # measured: 0.58 and 3


def test_reduced_scale_decoding_still_applies_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = np.zeros((400, 800, 3), dtype=np.uint8)
    stored[:, 400:] = 255  # stored: black left half, white right half -> shown: black top, white bottom
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    img = load_rgb(tmp_path / "r.jpg", min_side=100)
    assert img.size == (100, 200)  # 1/4 scale, then portrait
    shown = np.asarray(img).astype(int)
    assert shown[:90].max() < 30 and shown[110:].min() > 225


def test_to_square_resizes_the_short_side_and_centre_crops(tmp_path):
    img = np.zeros((60, 120, 3), dtype=np.uint8)
    img[:, 30:90] = 255  # a white centre band exactly as wide as the centre square
    Image.fromarray(img).save(tmp_path / "band.png")
    square = to_square(tmp_path / "band.png", 30)
    assert square.shape == (30, 30, 3)
    assert square.min() >= 250  # the centre crop is all band


def test_device_crop_resize_matches_albumentations_definition(tmp_path):
    squares = np.stack([to_square(photo(tmp_path / f"{i}.jpg", 300, 200, i), 73) for i in range(8)])
    boxes = sample_boxes(torch.Generator().manual_seed(0), 8, 73, scale_min=0.5)
    got = crop_resize(torch.from_numpy(squares), boxes, 64, MEAN, STD).permute(0, 2, 3, 1).numpy()
    for i in range(8):
        want = reference_crop_resize(squares[i], boxes[i].tolist(), 64, MEAN, STD)
        # OpenCV's bilinear uint8 path rounds through fixed point: within ~1 grey level of 255
        assert np.abs(got[i] - want).max() < 2 / 255 / min(STD)


def test_full_box_is_a_plain_resize_and_crops_select_their_region():
    square = torch.zeros(1, 10, 10, 3, dtype=torch.uint8)
    square[0, :, 5:] = 255  # right half white
    whole = crop_resize(square, full_boxes(1, 10), 10, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(whole[0, 0], square[0, :, :, 0].float() / 255)  # same size: identity, in [0, 1]
    right = crop_resize(square, torch.tensor([[5.0, 0.0, 5.0, 10.0]]), 4, (0, 0, 0), (1, 1, 1))
    assert (right == 1).all()


def test_sampled_boxes_stay_inside_with_the_requested_area():
    boxes = sample_boxes(torch.Generator().manual_seed(1), 2000, 100, scale_min=0.9)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 100).all() and (y0 + h <= 100).all()
    area = w * h / 100 ** 2  # at least 0.9 but for rounding w and h to whole pixels
    assert area.min() >= 0.88 and (area < 0.895).float().mean() < 0.01 and area.max() <= 1.0
    assert 0.05 < (area == 1).float().mean() < 0.25  # where no draw fits, the whole square, as in torchvision
    same = sample_boxes(torch.Generator().manual_seed(1), 2000, 100, scale_min=0.9)
    assert torch.equal(boxes, same)
    smaller = w < 100  # every position is drawn, the last one included
    assert ((x0 == 0) & smaller).any() and ((x0 + w == 100) & smaller).any()


def test_sampled_aspect_ratios_are_log_uniform_so_wide_and_tall_are_equally_likely():
    _, _, w, h = sample_boxes(torch.Generator().manual_seed(2), 40000, 224, scale_min=0.08).unbind(1)
    oblong = w != h  # ratio uniform in [3/4, 4/3] instead of its log would make 57% of them wide
    assert abs(((w > h) & oblong).sum() / oblong.sum() - 0.5) < 0.02


def build_after(barrier, paths, cache_dir):
    """A process that starts building a cache at the same moment as another (spawned: must be importable)."""
    barrier.wait()
    build_cache(paths, 32, cache_dir)


def test_two_processes_building_one_cache_both_finish_with_a_valid_cache(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", 160, 120, i) for i in range(40)]
    ctx = multiprocessing.get_context("spawn")  # fork could inherit the test process's thread pools
    barrier = ctx.Barrier(2)
    builders = [ctx.Process(target=build_after, args=(barrier, paths, tmp_path / "cache")) for _ in range(2)]
    for p in builders:
        p.start()
    for p in builders:
        p.join(120)
    assert [p.exitcode for p in builders] == [0, 0]
    cache, failed = build_cache(paths, 32, tmp_path / "cache")  # found, not rebuilt
    assert failed == [] and np.array_equal(cache.get(np.arange(40)), JpegSource(paths, 32).get(np.arange(40)))
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


def test_temp_files_of_dead_builds_are_removed_and_live_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".images-48px-0123456789ab.npy.4194305.00ff.tmp"  # its build was killed: no lock on it
    live = cache / ".images-32px-0123456789ab.npy.77.00ff.tmp"  # a build in progress, perhaps in another container
    young = cache / ".images-24px-0123456789ab.npy.78.00ff.tmp"  # a build that has not taken its lock yet
    old = cache / ".images-32px-0123456789ab.npy.tmp"  # named by an older version
    for path in (dead, live, young, old):
        path.write_bytes(b"partial")
    for path in (dead, live, old):
        os.utime(path, (time.time() - 3600,) * 2)
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as build_cache holds it
        paths = [photo(tmp_path / f"{i}.jpg", 40, 30, i) for i in range(2)]
        _, failed = build_cache(paths, 32, cache)
    assert failed == [] and not dead.exists() and not old.exists() and live.exists() and young.exists()


def test_a_failed_build_leaves_no_temp_file(tmp_path, monkeypatch):
    import images

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache([photo(tmp_path / "a.jpg", 40, 30)], 32, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fingerprint_sees_two_files_swapped_by_renaming(tmp_path):
    a, b = photo(tmp_path / "a.jpg", 40, 30, 1), photo(tmp_path / "b.jpg", 40, 30, 2)
    for path in (a, b):
        path.write_bytes(path.read_bytes()[:600].ljust(600, b"\0"))  # same size
        os.utime(path, ns=(10**18, 10**18))  # same time
    before = fingerprint([a, b])
    os.rename(a, tmp_path / "t.jpg")
    os.rename(b, a)
    os.rename(tmp_path / "t.jpg", b)
    assert fingerprint([a, b]) != before


def test_the_square_of_a_big_jpeg_comes_from_its_reduced_scale_decode(tmp_path):
    """Cache and JPEG path decode a big JPEG at the smallest DCT scale that still covers the square (the 4-9x faster
    decode), exactly, not the full-size decode."""
    path = tmp_path / "big.jpg"
    Image.open(photo(tmp_path / "small.png", 256, 192)).convert("RGB").resize((1024, 768)).save(path, quality=92)
    square = to_square(path, 128)
    assert np.array_equal(square, square_transform(128)(image=np.asarray(load_rgb(path, min_side=128)))["image"])
    assert not np.array_equal(square, square_transform(128)(image=np.asarray(load_rgb(path)))["image"])


@pytest.mark.parametrize("size", [(1, 40), (40, 1)])
def test_an_image_one_pixel_thin_in_either_direction_is_too_small(tmp_path, size):
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (200, 10, 10)).save(path)
    assert check_image(path) == f"too small ({size[0]}x{size[1]})"
    with pytest.raises(ValueError, match="too small"):
        to_square(path, 16)


def test_fingerprint_sees_a_file_rewritten_in_place_with_the_same_size(tmp_path):
    path = photo(tmp_path / "a.jpg", 40, 30)
    os.utime(path, ns=(10**18, 10**18))
    before = fingerprint([path])
    with open(path, "r+b") as f:  # same inode, same size, new bytes and a new time
        f.seek(200)
        f.write(b"\0" * 8)
    os.utime(path, ns=(10**18 + 10**9, 10**18 + 10**9))
    assert fingerprint([path]) != before


@pytest.mark.parametrize("image_size, crop_pct", [(224, 0.875), (32, 0.875), (224, 0.9), (64, 0.95), (288, 1.0)])
def test_the_cached_square_is_timms_eval_resize(image_size, crop_pct):
    """S = the side timm's own eval transform resizes to before its centre crop."""
    resize = timm.data.create_transform(image_size, crop_pct=crop_pct, is_training=False).transforms[0]
    assert square_size(image_size, crop_pct) == resize.size


def test_pixels_for_a_channels_last_model_come_in_that_memory_format():
    squares = torch.randint(0, 256, (2, 36, 36, 3), dtype=torch.uint8)
    boxes = full_boxes(2, 36)
    plain = Pixels(32, 36, MEAN, STD)(squares, boxes, "cpu")
    last = Pixels(32, 36, MEAN, STD, channels_last=True)(squares, boxes, "cpu")
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    torch.testing.assert_close(last, plain, rtol=0, atol=0)


def test_an_encoders_data_config_decides_the_square_and_the_normalisation():
    """timm's data_config of the image tower: the cached square is image_size / crop_pct, and each channel is
    normalised with the tower's own mean and std (a ViT's 0.5s are not ImageNet's)."""
    config = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.8}
    pixels = Pixels.for_encoder(config, 32)
    assert (pixels.image_size, pixels.square) == (32, 40)
    grey = torch.full((1, 40, 40, 3), 153, dtype=torch.uint8)  # 0.6 of full scale
    x = pixels(grey, full_boxes(1, 40), "cpu")
    expected = [(0.6 - m) / s for m, s in zip(config["mean"], config["std"])]
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), torch.tensor(expected), rtol=0, atol=1e-5)
    assert Pixels.for_encoder({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 224).square == 256  # timm's default 0.875
