"""images.py: float and integer arrays to uint8, the loader of named image sets, and the PNG writers."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.images import load_images, save_grid, save_images, to_uint8


def make_images(n, size=32, seed=0):
    """Random uint8 (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_to_uint8_conversions():
    u8 = make_images(3, seed=2)
    f01 = u8.astype(np.float32) / 255
    np.testing.assert_array_equal(to_uint8(f01), u8)
    np.testing.assert_array_equal(to_uint8(f01 * 2 - 1, float_range="-1,1"), u8)
    np.testing.assert_array_equal(to_uint8(u8.transpose(0, 3, 1, 2)), u8)
    np.testing.assert_array_equal(to_uint8(u8.astype(np.int64)), u8)
    # A [0, 1] sample set that undershoots 0 a little is clipped, not read as [-1, 1].
    undershoot = f01.copy()
    undershoot[0, 0, 0] = -0.02
    expected = u8.copy()
    expected[0, 0, 0] = 0
    np.testing.assert_array_equal(to_uint8(undershoot), expected)
    with pytest.raises(ValueError, match=r"span \[-[.0-9]+, [.0-9]+\], outside \[0,1\] .*--float-range=-1,1"):
        to_uint8(f01 * 2 - 1)
    with pytest.raises(ValueError, match=r"span \[[0-9.]+, [0-9.]+\], outside \[0,1\]"):
        to_uint8(u8.astype(np.float32))
    with pytest.raises(ValueError, match="expected shape"):
        to_uint8(np.zeros((4, 32, 32), np.uint8))


def test_load_images_npz(tmp_path):
    u8 = make_images(5, seed=2)
    np.savez(tmp_path / "a.npz", other=np.zeros(3), images=u8.transpose(0, 3, 1, 2) / 127.5 - 1)
    np.testing.assert_array_equal(load_images(str(tmp_path / "a.npz"), 32, num=4, float_range="-1,1"), u8[:4])
    with pytest.raises(ValueError, match="--float-range=-1,1"):
        load_images(str(tmp_path / "a.npz"), 32)
    with pytest.raises(ValueError, match="expected 16x16"):
        load_images(str(tmp_path / "a.npz"), 16, float_range="-1,1")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_images(str(tmp_path / "nope.npz"), None)


def test_load_images_junk_npz_is_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_text("not an npz\n")
    with pytest.raises(ValueError, match="junk.npz: is not a valid .npz file") as info:
        load_images(str(tmp_path / "junk.npz"), None)
    assert "pickled" not in str(info.value)
    # A .npy saved under a .npz name still loads.
    u8 = make_images(2, seed=2)
    with open(tmp_path / "array.npz", "wb") as f:
        np.save(f, u8)
    np.testing.assert_array_equal(load_images(str(tmp_path / "array.npz"), None), u8)


def test_load_images_npy_is_memory_mapped_and_checked(tmp_path):
    np.save(tmp_path / "gray.npy", np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8, 1))
    out = load_images(str(tmp_path / "gray.npy"), 8, channels=None)
    assert isinstance(out, np.memmap) and out.shape == (5, 8, 8, 1) and out[4, 7, 7, 0] == (5 * 64 - 1) % 256
    assert load_images(str(tmp_path / "gray.npy"), None, num=2, channels=1).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match=r"gray.npy: images have 1 channel\(s\), expected 3"):
        load_images(str(tmp_path / "gray.npy"), 8)
    with pytest.raises(ValueError, match="gray.npy: images are 8x8 px, expected 16x16"):
        load_images(str(tmp_path / "gray.npy"), 16, channels=None)
    np.save(tmp_path / "float.npy", np.zeros((5, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"float.npy: holds float32 \(5, 8, 8, 3\); expected uint8 images"):
        load_images(str(tmp_path / "float.npy"), 8)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npy: cannot read as a .npy array of images"):
        load_images(str(tmp_path / "junk.npy"), 8)


def test_png_writers_round_to_the_nearest_level_and_clip(tmp_path):
    """Grids and single images hold the same pixels: round(255 x) of x clipped to [0, 1]; one channel is grayscale."""
    u8 = make_images(5, size=4, seed=3)
    floats = u8.astype(np.float32) / 255
    floats[0, 0, 0] = [-0.3, 1.4, 0.5]  # a sampler's overshoot is clipped, never an error
    floats[1, 0, 0] = [np.nan, np.inf, -np.inf]  # nor is a diverged model's output: a training run goes on
    expected = u8.copy()
    expected[0, 0, 0] = [0, 255, 128]
    expected[1, 0, 0] = [0, 255, 0]
    save_grid(floats, tmp_path / "grid.png")
    save_images(floats, tmp_path / "singles")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4, 3 * 4, 3)  # 5 images: 3 columns, 2 rows
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[4 * r : 4 * r + 4, 4 * c : 4 * c + 4], expected[i])
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "singles" / f"{i:06d}.png")), expected[i])
    save_grid(floats[..., :1], tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"
