"""images.py: float and integer arrays to uint8, and the PNG writers (test_data.py loads named image sets)."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.images import save_grid, save_images, to_uint8


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


def test_a_zoomed_grid_draws_each_pixel_as_a_square(tmp_path):
    """zoom=3: the PNG is the grid with every pixel a 3x3 block; the grid returned is the unzoomed one."""
    u8 = make_images(4, size=4, seed=4)
    returned = save_grid(u8 / 255.0, tmp_path / "zoomed.png", zoom=3)
    drawn = np.asarray(Image.open(tmp_path / "zoomed.png"))
    assert returned.shape == (8, 8, 3) and drawn.shape == (24, 24, 3)
    np.testing.assert_array_equal(returned[:4, :4], u8[0])
    for dy in range(3):
        for dx in range(3):
            np.testing.assert_array_equal(drawn[dy::3, dx::3], returned)
