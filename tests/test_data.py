"""ddpm_jax.data: embedded tiles, image folders and their cache, deterministic batches, prefetching."""

import gc
import os
import sys
import threading
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import data
from ddpm_jax.data import (
    DataError,
    Prefetcher,
    batch_indices,
    cache,
    embedded_dataset,
    flip_mask,
    folder,
    get_batch,
    load_image_folder,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def solid(colour, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def messages(record) -> list[str]:
    return [str(w.message) for w in record]


@pytest.fixture
def no_user_cache(tmp_path, monkeypatch):
    """Keep the fallback cache directory inside the test's tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ============================================================================ embedded dataset


def test_embedded_shape_dtype_and_determinism():
    a = embedded_dataset(16, 32, seed=0)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, embedded_dataset(16, 32, seed=0))
    b = embedded_dataset(16, 32, seed=1)
    assert (a != b).mean() > 0.5


def test_embedded_tile_does_not_depend_on_count():
    many = embedded_dataset(40, 32)  # more than one rendering chunk (32 tiles at 32 px)
    np.testing.assert_array_equal(embedded_dataset(3, 32), many[:3])
    np.testing.assert_array_equal(embedded_dataset(38, 32)[35:], many[35:38])


def test_embedded_scene_is_the_same_at_every_size():
    small = embedded_dataset(6, 32).astype(np.float64)
    large = embedded_dataset(6, 128).astype(np.float64)
    assert large.shape == (6, 128, 128, 3)
    # 4x4 box-averaged 128 px tiles match the 32 px tiles up to edges and pixel noise.
    pooled = large.reshape(6, 32, 4, 32, 4, 3).mean((2, 4))
    assert np.abs(pooled - small).mean() < 6.0
    assert np.abs(pooled - np.roll(small, 1, axis=0)).mean() > 10.0  # ... and not any other tile


def test_embedded_looks_like_forest():
    x = embedded_dataset(64, 32).astype(np.float64)
    r, g, b = x.reshape(-1, 3).mean(0)
    assert g > r + 5 and g > b + 10, (r, g, b)
    assert x.reshape(64, -1, 3).std(1).mean(1).min() > 8.0  # every tile has structure
    flat = x.reshape(64, -1)
    diffs = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert diffs[~np.eye(64, dtype=bool)].min() > 5.0  # all tiles differ
    # Rivers: blue-ish pixels on some tiles, and not on most.
    water = ((x[..., 2] > x[..., 1] + 5) & (x[..., 2] > x[..., 0] + 15)).sum((1, 2))
    assert 2 <= (water > 20).sum() <= 32, water


def test_embedded_rejects_bad_arguments():
    assert embedded_dataset(0, 32).shape == (0, 32, 32, 3)
    with pytest.raises(ValueError):
        embedded_dataset(-1, 32)
    with pytest.raises(ValueError):
        embedded_dataset(4, 0)


# ============================================================================ image folders


def test_modes_are_converted_to_rgb(tmp_path, no_user_cache):
    d = tmp_path / "imgs"
    save(d / "a_gray.png", solid(100, mode="L"))
    save(d / "b_rgba.png", solid((200, 100, 50, 128), mode="RGBA"))  # composited on black
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    save(d / "c_palette.png", pal)
    save(d / "d_cmyk.tif", solid((0, 255, 255, 0), mode="CMYK"))  # pure red in Pillow's conversion
    sixteen = np.full((8, 8), 100 * 257, np.uint16)
    sixteen[:, 4:] = 65535
    save(d / "e_16bit.png", Image.fromarray(sixteen))
    save(d / "f_la.png", solid((80, 255), mode="LA"))
    save(d / "g_bilevel.bmp", solid(1, mode="1"))
    ptrans = Image.new("P", (8, 8), 0)
    ptrans.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
    save(d / "h_palette_transparent.png", ptrans, transparency=0)  # transparent blue -> black
    unit = np.full((8, 8), 0.5, np.float32)
    unit[:, 4:] = 1.0
    save(d / "i_float_unit.tif", Image.fromarray(unit, "F"))  # 32-bit float in [0, 1]

    out = load_image_folder(d, 8).astype(int)
    assert out.shape == (9, 8, 8, 3) and out.dtype == np.int64  # (astype above)
    assert (out[0] == 100).all()
    np.testing.assert_allclose(out[1], np.broadcast_to([100, 50, 25], (8, 8, 3)), atol=1)
    assert (out[2] == [10, 200, 30]).all()
    assert (out[3] == RED).all()
    assert (out[4][:, :4] == 100).all() and (out[4][:, 4:] == 255).all()
    assert (out[5] == 80).all()
    assert (out[6] == 255).all()
    assert (out[7] == 0).all()
    assert (out[8][:, :4] == 128).all() and (out[8][:, 4:] == 255).all()


def test_grayscale_folders_decode_to_one_channel_unless_told(tmp_path, no_user_cache, monkeypatch):
    """channels=None: one channel when every image is grayscale (8- or 16-bit), else three; one channel of an RGB
    image is its luma (Pillow's L: 0.299 R + 0.587 G + 0.114 B)."""
    gray = tmp_path / "gray"
    save(gray / "a.png", solid(100, mode="L"))
    save(gray / "b.png", Image.fromarray(np.full((8, 8), 200 * 257, np.uint16)))
    out = load_image_folder(gray, 8)
    assert out.shape == (2, 8, 8, 1) and (out[0] == 100).all() and (out[1] == 200).all()
    with monkeypatch.context() as m:  # headers that would say colour: the cache's record answers
        m.setattr(folder, "_header_mode", lambda f: "RGB")
        assert load_image_folder(gray, 8).shape == (2, 8, 8, 1)
    rgb = load_image_folder(gray, 8, channels=3)
    assert rgb.shape == (2, 8, 8, 3) and (rgb == out).all()
    assert len(list((gray / data.CACHE_DIR_NAME).glob("*.npy"))) == 2  # both caches stay

    save(gray / "c.png", solid(RED))
    assert load_image_folder(gray, 8).shape == (3, 8, 8, 3)
    luma = load_image_folder(gray, 8, channels=1)
    assert luma.shape == (3, 8, 8, 1) and (luma[2] == round(0.299 * 255)).all()


def test_decoding_uses_every_core_shows_progress_and_leaves_no_gap(tmp_path, no_user_cache, monkeypatch, capsys):
    d = tmp_path / "d"
    save(d / "a.png", solid(RED))
    (d / "b.png").write_bytes(b"broken")
    save(d / "c.png", solid(BLUE))
    pools, pool = [], folder.concurrent.futures.ThreadPoolExecutor
    monkeypatch.setattr(folder.concurrent.futures, "ThreadPoolExecutor", lambda n: pools.append(n) or pool(n))
    monkeypatch.setattr(folder.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar shows on terminals only
    with pytest.warns(UserWarning, match="b.png"):
        out = load_image_folder(d, 8)
    assert pools == [3, 3]  # the grayscale check of the headers, then the decoding: a thread per core (3 files)
    assert f"decoding {d}:" in capsys.readouterr().err  # a tqdm bar over the 3 files
    assert isinstance(out, np.memmap) and out.shape == (2, 8, 8, 3)
    assert (out[0] == RED).all() and (out[1] == BLUE).all()
    assert not list((d / data.CACHE_DIR_NAME).glob("*.tmp"))  # the temp file of the decode is gone


def test_an_unreadable_colour_file_counts_as_colour_before_and_after_decoding(tmp_path, no_user_cache):
    """Grayscale is judged from the headers of every file: the first load and the cache's record agree."""
    d = tmp_path / "d"
    save(d / "a.png", solid(100, mode="L"))
    save(d / "b.png", Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)))
    (d / "b.png").write_bytes((d / "b.png").read_bytes()[:100])  # truncated after its header, which says RGB
    for _ in range(2):  # decoded, then from the cache
        with pytest.warns(UserWarning, match="b.png"):
            assert load_image_folder(d, 8).shape == (1, 8, 8, 3)


def test_an_interrupted_decode_leaves_no_temp_file(tmp_path, no_user_cache, monkeypatch):
    d = tmp_path / "d"
    for k in range(4):
        save(d / f"{k}.png", solid(RED))
    decode = folder._decode_image
    monkeypatch.setattr(folder, "_decode_image", lambda f, *a: decode(f, *a) if f.name != "2.png" else
                        (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        load_image_folder(d, 8)
    assert list((d / data.CACHE_DIR_NAME).iterdir()) == []


def test_exif_orientation_is_applied(tmp_path, no_user_cache):
    raw = Image.new("RGB", (40, 20), RED)  # stored: top half red, bottom half blue
    raw.paste(BLUE, (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": red ends up on the right
    save(tmp_path / "d" / "rot.jpg", raw, exif=exif.tobytes(), quality=95)
    out = load_image_folder(tmp_path / "d", 16)[0].astype(int)
    left, right = out[:, :6].mean((0, 1)), out[:, -6:].mean((0, 1))
    assert left[2] > 200 and left[0] < 60, left
    assert right[0] > 200 and right[2] < 60, right


def test_resize_shorter_side_then_centre_crop(tmp_path, no_user_cache):
    # 40x20, four 10 px stripes A B C D -> resized to 20x10 -> the centre 10x10 holds B | C.
    colours = [RED, GREEN, BLUE, WHITE]
    im = Image.new("RGB", (40, 20))
    for k, c in enumerate(colours):
        im.paste(c, (10 * k, 0, 10 * k + 10, 20))
    save(tmp_path / "wide" / "x.png", im)
    out = load_image_folder(tmp_path / "wide", 10)[0].astype(int)
    # Antialiasing blends one column at each stripe border; the interiors are exact.
    np.testing.assert_allclose(out[:, 1:4], np.broadcast_to(GREEN, (10, 3, 3)), atol=2)
    np.testing.assert_allclose(out[:, 6:9], np.broadcast_to(BLUE, (10, 3, 3)), atol=2)
    # Tall image: same, transposed.
    save(tmp_path / "tall" / "x.png", im.transpose(Image.Transpose.TRANSPOSE))
    tall = load_image_folder(tmp_path / "tall", 10)[0].astype(int)
    np.testing.assert_allclose(tall[1:4], np.broadcast_to(GREEN, (3, 10, 3)), atol=2)
    np.testing.assert_allclose(tall[6:9], np.broadcast_to(BLUE, (3, 10, 3)), atol=2)


@pytest.mark.parametrize("height, first_row", [(13, 2), (11, 0), (12, 1)])
def test_centre_crop_offset_matches_torchvision(tmp_path, no_user_cache, height, first_row):
    # No resize (shorter side already 10): the crop keeps rows int(round((h - 10) / 2)) onwards.
    rows = np.zeros((height, 10, 3), np.uint8)
    rows[..., 0] = np.arange(height)[:, None] * 10
    save(tmp_path / "d" / "rows.png", Image.fromarray(rows))
    out = load_image_folder(tmp_path / "d", 10)[0]
    np.testing.assert_array_equal(out, rows[first_row:first_row + 10])


def test_small_images_are_upscaled_with_one_warning(tmp_path, no_user_cache):
    for k in range(3):
        save(tmp_path / "d" / f"{k}.png", solid(GREEN, size=(4, 6)))
    save(tmp_path / "d" / "big.png", solid(GREEN, size=(16, 16)))
    with pytest.warns(UserWarning) as record:
        out = load_image_folder(tmp_path / "d", 8)
    assert out.shape == (4, 8, 8, 3) and (out == GREEN).all()
    upscale = [m for m in messages(record) if "upscaled" in m]
    assert len(upscale) == 1 and "3 image(s)" in upscale[0]


def test_recursive_sorted_and_extension_filter(tmp_path, no_user_cache):
    d = tmp_path / "d"
    save(d / "b" / "2.PNG", solid(RED))
    save(d / "a.jpeg", solid(WHITE), quality=100)
    save(d / "b" / "1.webp", solid(BLUE), lossless=True)
    save(d / "c" / "deep" / "3.bmp", solid(GREEN))
    (d / "notes.txt").write_text("not an image")
    out = load_image_folder(d, 8).astype(int)
    means = out.mean((1, 2))
    np.testing.assert_allclose(means, [WHITE, BLUE, RED, GREEN], atol=3)  # a, b/1, b/2, c/deep/3


@pytest.fixture
def folder_with_bad_files(tmp_path, monkeypatch):
    d = tmp_path / "mixed"
    save(d / "good1.png", solid(RED))
    save(d / "good2.jpg", solid(BLUE), quality=100)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a jpeg")
    buf = (tmp_path / "full.png")
    save(buf, Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    (d / "truncated.png").write_bytes(buf.read_bytes()[:200])
    (d / "garbage.webp").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    (d / "folder.png").mkdir()
    # Decompression bombs against a lowered limit: 1600 px warns in Pillow (we treat it as bad),
    # 4096 px raises DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save(d / "bomb_warn.png", solid(GREEN, size=(40, 40)))
    save(d / "bomb_error.png", solid(GREEN, size=(64, 64)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bad = ["bomb_error.png", "bomb_warn.png", "empty.png", "folder.png", "garbage.webp", "text.jpg",
           "truncated.png"]
    return d, bad


def test_bad_files_are_skipped_with_warnings(folder_with_bad_files):
    d, bad = folder_with_bad_files
    for attempt in ("decode", "cache"):
        with pytest.warns(UserWarning) as record:
            out = load_image_folder(d, 8)
        assert out.shape == (2, 8, 8, 3), attempt
        assert (out[0].astype(int) - RED).__abs__().max() <= 2
        text = messages(record)
        for name in bad:
            assert any(name in m and "skipping" in m for m in text), (attempt, name, text)
        summary = [m for m in text if m.startswith("skipped")]
        assert len(summary) == 1 and f"{len(bad)} unreadable" in summary[0]


def test_strict_raises_naming_the_first_bad_file(folder_with_bad_files):
    d, bad = folder_with_bad_files
    with pytest.raises(DataError, match=bad[0]):
        load_image_folder(d, 8, strict=True)
    with pytest.warns(UserWarning):  # now cached ...
        load_image_folder(d, 8)
    with pytest.raises(DataError, match=bad[0]):  # ... and strict still raises
        load_image_folder(d, 8, strict=True)


def test_missing_empty_and_unusable_folders(tmp_path, no_user_cache):
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match=r"does not exist.*\.png"):
        load_image_folder(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in .*empty.*\.jpg"):
        load_image_folder(tmp_path / "empty", 8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "other", 8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable images"):
        load_image_folder(tmp_path / "broken", 8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(tmp_path / "file.png", 8)


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch, no_user_cache):
    d = tmp_path / "d"
    for k in range(5):
        save(d / f"{k}.png", solid((k * 40, 10, 20)))
    first = load_image_folder(d, 8)
    caches = list((d / data.CACHE_DIR_NAME).glob("*.npy"))
    assert len(caches) == 1 and caches[0].with_suffix(".json").is_file()
    assert isinstance(first, np.memmap) and first.mode == "r" and Path(first.filename) == caches[0].resolve()

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "_decode_image", no_decoding)
    np.testing.assert_array_equal(load_image_folder(d, 8), first)
    with pytest.warns(UserWarning):  # another size is another cache entry: decodes (and fails here)
        with pytest.raises(DataError):
            load_image_folder(d, 4)


def test_cache_is_invalidated_when_a_file_changes(tmp_path, monkeypatch, no_user_cache):
    d = tmp_path / "d"
    save(d / "a.png", solid(RED))
    save(d / "b.png", solid(GREEN))
    load_image_folder(d, 8)
    save(d / "b.png", solid(BLUE))
    st = (d / "b.png").stat()
    os.utime(d / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    calls = []
    decode = folder._decode_image
    monkeypatch.setattr(folder, "_decode_image", lambda *a: calls.append(a) or decode(*a))
    out = load_image_folder(d, 8)
    assert len(calls) == 2 and (out[1] == BLUE).all()
    assert len(list((d / data.CACHE_DIR_NAME).glob("*.npy"))) == 1  # the stale cache is removed
    save(d / "c.png", solid(WHITE))  # an added file, too
    assert len(load_image_folder(d, 8)) == 3


def test_cache_dir_argument_fallback_and_damaged_cache(tmp_path, monkeypatch):
    d = tmp_path / "d"
    save(d / "a.png", solid(RED))
    explicit = tmp_path / "explicit"
    load_image_folder(d, 8, cache_dir=explicit)
    assert len(list(explicit.glob("*.npy"))) == 1 and not (d / data.CACHE_DIR_NAME).exists()

    # A read-only folder: the cache goes to $XDG_CACHE_HOME/ddpm_jax.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    writable = cache.writable_dir
    monkeypatch.setattr(cache, "writable_dir", lambda p: p.name != data.CACHE_DIR_NAME and writable(p))
    load_image_folder(d, 8)
    (npy,) = (tmp_path / "xdg" / "ddpm_jax").glob("*.npy")

    npy.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable cache"):
        out = load_image_folder(d, 8)
    assert (out == RED).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(d, 8)  # rewritten: no warning now


# ============================================================================ batches


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    order = np.concatenate([batch_indices(n, b, seed=3, step=s) for s in range(5)])  # 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert list(order[:10]) != list(order[10:])
    np.testing.assert_array_equal(batch_indices(n, b, 3, 2), order[8:12])  # straddles the epochs
    assert batch_indices(n, b, 4, 0).tolist() != batch_indices(n, b, 3, 0).tolist()
    big = batch_indices(3, 8, seed=0, step=1)  # batch larger than the dataset
    assert sorted(big[1:4]) == [0, 1, 2] and big.shape == (8,)
    with pytest.raises(ValueError):
        batch_indices(0, 4, 0, 0)


def test_batch_is_a_pure_function_of_seed_and_step():
    images = embedded_dataset(12, 8)
    a = get_batch(images, 8, seed=1, step=7)
    get_batch(images, 8, seed=1, step=3)  # any other calls in between
    np.testing.assert_array_equal(a, get_batch(images, 8, seed=1, step=7))
    assert a.dtype == np.float32 and a.shape == (8, 8, 8, 3) and a.min() >= -1 and a.max() <= 1
    assert not np.array_equal(a, get_batch(images, 8, seed=2, step=7))


def test_batch_values_normalisation_and_flips():
    images = embedded_dataset(12, 8)
    before = images.copy()
    idx = batch_indices(12, 16, seed=5, step=2)
    plain = get_batch(images, 16, seed=5, step=2, flip=False)
    np.testing.assert_array_equal(plain, images[idx].astype(np.float32) / 255.0 * 2.0 - 1.0)
    flipped = get_batch(images, 16, seed=5, step=2)
    mask = flip_mask(16, seed=5, step=2)
    assert 0 < mask.sum() < 16
    np.testing.assert_array_equal(flipped[mask], plain[mask][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~mask], plain[~mask])
    np.testing.assert_array_equal(images, before)  # the dataset is never modified
    assert 0.4 < np.mean([flip_mask(64, 0, s).mean() for s in range(20)]) < 0.6


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(count):
    images = embedded_dataset(10, 8)
    whole = get_batch(images, 8, seed=0, step=3)
    parts = [get_batch(images, 8, seed=0, step=3, process_index=i, process_count=count) for i in range(count)]
    assert all(p.shape[0] == 8 // count for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_a_process_reads_only_the_rows_of_its_share():
    class Recording(np.ndarray):
        rows: list = []

        def __getitem__(self, index):
            Recording.rows.append(np.asarray(index).tolist())
            return np.asarray(self)[index]

    images = np.arange(40 * 2 * 2 * 3, dtype=np.uint8).reshape(40, 2, 2, 3).view(Recording)
    get_batch(images, 8, seed=1, step=3, process_index=1, process_count=2)
    assert Recording.rows == [batch_indices(40, 8, 1, 3)[4:].tolist()]


def test_uneven_process_split_is_rejected():
    with pytest.raises(ValueError, match="split evenly"):
        get_batch(np.zeros((4, 2, 2, 3), np.uint8), 6, 0, 0, process_index=0, process_count=4)


# ============================================================================ prefetcher


def test_prefetcher_yields_consecutive_steps_on_device():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Prefetcher(lambda s: np.full((2, 3), s, np.float32), start_step=5, sharding=sharding) as pf:
        got = [next(pf) for _ in range(4)]
    assert [s for s, _ in got] == [5, 6, 7, 8]
    for s, x in got:
        assert isinstance(x, jax.Array) and x.sharding == sharding
        np.testing.assert_array_equal(np.asarray(x), np.full((2, 3), s))
    assert not pf._thread.is_alive()


def test_prefetcher_runs_at_most_depth_ahead():
    calls, first = [], threading.Event()

    def fn(step):
        calls.append(step)
        first.set()
        return np.zeros(1)

    pf = Prefetcher(fn, start_step=0, depth=2)
    first.wait(5)
    for _ in range(20):
        if len(calls) >= 3:
            break
        threading.Event().wait(0.01)
    assert len(calls) <= 3  # two queued, one waiting to be queued
    assert next(pf)[0] == 0
    pf.close()
    assert not pf._thread.is_alive()
    with pytest.raises(StopIteration):
        next(pf)


def test_prefetcher_raises_the_producers_exception():
    def fn(step):
        if step == 3:
            raise KeyError(f"no batch {step}")
        return np.full((1,), step)

    pf = Prefetcher(fn, start_step=0)
    assert [next(pf)[0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="no batch 3"):
        next(pf)
    assert not pf._thread.is_alive()


def test_abandoned_prefetcher_stops_its_thread():
    pf = Prefetcher(lambda s: np.zeros(1), start_step=0)
    thread = pf._thread
    del pf
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_prefetcher_uses_process_local_data_on_several_processes(monkeypatch):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    used = []
    make = jax.make_array_from_process_local_data

    def spy(sh, local):
        used.append(local.shape)
        return make(sh, local)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "make_array_from_process_local_data", spy)
    with Prefetcher(lambda s: np.full((4, 2), s, np.float32), start_step=0, sharding=sharding) as pf:
        step, x = next(pf)
    assert step == 0 and used and used[0] == (4, 2)
    np.testing.assert_array_equal(np.asarray(x), np.zeros((4, 2)))


def test_raising_the_pixel_limit_is_not_answered_from_the_cache(tmp_path, monkeypatch, no_user_cache):
    save(tmp_path / "d" / "ok.png", solid(RED))
    save(tmp_path / "d" / "large.png", solid(BLUE, size=(64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match="large.png"):
        assert len(load_image_folder(tmp_path / "d", 8)) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert len(load_image_folder(tmp_path / "d", 8)) == 2


# ============================================================================ sources: data.load and SOURCES


def random_images(n, size=32, seed=0):
    """Random uint8 (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_load_npz(tmp_path):
    u8 = random_images(5, seed=2)
    np.savez(tmp_path / "a.npz", other=np.zeros(3), images=u8.transpose(0, 3, 1, 2) / 127.5 - 1)
    np.testing.assert_array_equal(data.load(str(tmp_path / "a.npz"), 32, num=4, float_range="-1,1"), u8[:4])
    with pytest.raises(ValueError, match="--float-range=-1,1"):
        data.load(str(tmp_path / "a.npz"), 32)
    with pytest.raises(ValueError, match="expected 16x16"):
        data.load(str(tmp_path / "a.npz"), 16, float_range="-1,1")
    with pytest.raises(FileNotFoundError, match="nope.npz: no such file or folder; expected 'embedded' "
                                                r"\(the built-in RGB tiles\), an image folder, a .npy file, or a .npz"):
        data.load(str(tmp_path / "nope.npz"), None)


def test_load_junk_npz_is_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_text("not an npz\n")
    with pytest.raises(ValueError, match="junk.npz: is not a valid .npz file") as info:
        data.load(str(tmp_path / "junk.npz"), None)
    assert "pickled" not in str(info.value)
    # A .npy saved under a .npz name still loads.
    u8 = random_images(2, seed=2)
    with open(tmp_path / "array.npz", "wb") as f:
        np.save(f, u8)
    np.testing.assert_array_equal(data.load(str(tmp_path / "array.npz"), None), u8)


def test_load_npy_is_memory_mapped_and_checked(tmp_path):
    np.save(tmp_path / "gray.npy", np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8, 1))
    out = data.load(str(tmp_path / "gray.npy"), 8, channels=None)
    assert isinstance(out, np.memmap) and out.shape == (5, 8, 8, 1) and out[4, 7, 7, 0] == (5 * 64 - 1) % 256
    assert data.load(str(tmp_path / "gray.npy"), None, num=2, channels=1).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match=r"gray.npy: images have 1 channel\(s\), expected 3"):
        data.load(str(tmp_path / "gray.npy"), 8)
    with pytest.raises(ValueError, match="gray.npy: images are 8x8 px, expected 16x16"):
        data.load(str(tmp_path / "gray.npy"), 16, channels=None)
    np.save(tmp_path / "float.npy", np.zeros((5, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"float.npy: holds float32 \(5, 8, 8, 3\); expected uint8 images"):
        data.load(str(tmp_path / "float.npy"), 8)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npy: cannot read as a .npy array of images"):
        data.load(str(tmp_path / "junk.npy"), 8)


def test_each_kind_is_recognised_and_says_whether_it_trains(tmp_path, monkeypatch, no_user_cache):
    save(tmp_path / "imgs" / "a.png", solid(RED))
    np.save(tmp_path / "a.npy", random_images(2, size=8))
    np.savez(tmp_path / "a.npz", images=random_images(2, size=8))
    (tmp_path / "a.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded").mkdir()  # the name stays the built-in tiles, also where a folder has it
    kinds = {spec: data.source(spec).name for spec in ("embedded", "imgs", "a.npy", "a.npz")}
    assert kinds == {"embedded": "embedded", "imgs": "folder", "a.npy": "npy", "a.npz": "npz"}
    assert [data.check_trainable(spec).name for spec in ("embedded", "imgs", "a.npy")] == ["embedded", "folder", "npy"]
    for spec in ("a.npz", "a.txt", "missing"):
        with pytest.raises(ValueError, match=fr"^--data {spec}: expected 'embedded' \(the built-in RGB tiles\), an "
                                             r"image folder, or a .npy file$"):
            data.check_trainable(spec)
    with pytest.raises(ValueError, match=r"^a.txt: expected 'embedded' .*, a .npy file, or a .npz file$"):
        data.load("a.txt", None)
    assert data.check_trainable("imgs", 1).name == "folder" and data.check_trainable("a.npy", 1).name == "npy"
    with pytest.raises(ValueError, match=r"^--channels 1: expected 3 with 'embedded' \(the built-in RGB tiles\)$"):
        data.check_trainable("embedded", 1)
    with pytest.raises(ValueError, match=r"embedded: images have 3 channel\(s\), expected 1"):
        data.load("embedded", 8, num=2, channels=1)
    np.testing.assert_array_equal(data.load("embedded", 8, num=3, embedded_seed=4), embedded_dataset(3, 8, seed=4))


def test_a_new_source_is_one_entry_of_the_table(monkeypatch):
    """What a new kind needs: its loader and an entry in SOURCES; load and check_trainable then know it."""
    from ddpm_jax.data import sources

    def grey(spec, request):
        return np.full((5, request.image_size or 4, request.image_size or 4, 3), int(spec.split(":")[1]), np.uint8)

    entry = data.Source("grey", "'grey:<level>'", lambda spec: spec.startswith("grey:"), trains=True,
                        sets_size=False, channels=(3,), load=grey)
    monkeypatch.setattr(sources, "SOURCES", (*sources.SOURCES, entry))
    out = data.load("grey:7", 8, num=2)
    assert out.shape == (2, 8, 8, 3) and (out == 7).all()
    assert data.check_trainable("grey:7").name == "grey"
    with pytest.raises(ValueError, match=r"^--data x: expected .*, a .npy file, or 'grey:<level>'$"):
        data.check_trainable("x")
