"""Images as arrays and files: the float -> uint8 conversion, PNG grids and single PNGs. The image sets a command
names are loaded by ddpm_jax.data.load."""

import math
from pathlib import Path

import numpy as np

FLOAT_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
_UNDERSHOOT = 0.05  # of the range's width: float values this far outside it are clipped, further is an error


def to_uint8(images: np.ndarray, name: str = "images", float_range: str = "0,1") -> np.ndarray:
    """(N,H,W,3) or (N,3,H,W) array -> uint8 (N,H,W,3).

    Layout: NHWC if the last axis has 3 entries, else NCHW if axis 1 has 3 entries.
    Values: integer dtypes must lie in [0, 255] and are kept. Floats are read in `float_range` ("0,1" or "-1,1")
    and mapped linearly to 0..255. A sampler's small overshoot (up to 5% of the range's width) is clipped;
    values further out are an error that names the other range, never a guess.
    """
    x = np.asarray(images)
    if x.ndim != 4 or 3 not in (x.shape[-1], x.shape[1]):
        raise ValueError(f"{name}: expected shape (N,H,W,3) or (N,3,H,W), got {x.shape}")
    return _pixels(x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1), name, float_range)


def _pixels(x: np.ndarray, name: str, float_range: str) -> np.ndarray:
    """`to_uint8`'s value mapping, for an array of any shape."""
    if float_range not in FLOAT_RANGES:
        raise ValueError(f"float range {float_range!r}: expected one of {list(FLOAT_RANGES)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.size == 0:
        raise ValueError(f"{name}: no images (shape {x.shape})")
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name}: integer values must lie in [0, 255], got [{lo}, {hi}]")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains nan or inf")
    bottom, top = FLOAT_RANGES[float_range]
    slack = _UNDERSHOOT * (top - bottom)
    lo, hi = float(x.min()), float(x.max())
    if lo < bottom - slack or hi > top + slack:
        other = next(r for r in FLOAT_RANGES if r != float_range)
        raise ValueError(f"{name}: float values span [{lo:.4g}, {hi:.4g}], outside [{float_range}] by more than "
                         f"{_UNDERSHOOT:.0%} of it; if they are in [{other}], say so (--float-range={other})")
    scaled = (x.astype(np.float64) - bottom) * (255.0 / (top - bottom))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _clipped(images: np.ndarray) -> np.ndarray:
    """Float samples made writable as pixels: clipped to [0, 1], and nan (a diverged model's) written as 0 so that
    a run's grid never stops the run; the loss check reports the divergence."""
    return np.nan_to_num(np.clip(images, 0, 1), nan=0.0)


def grid(images_BHWC: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 (rows * H, cols * W, C): a square-ish grid of float images in [0, 1] (`_clipped`)."""
    pixels = _pixels(_clipped(images_BHWC), name, "0,1")
    n, h, w, c = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = pixels[i]
    return out


def save_grid(images_BHWC: np.ndarray, path: Path, zoom: int = 1) -> np.ndarray:
    """Write `grid(images_BHWC)` as a PNG (grayscale for one channel), each pixel drawn as a zoom x zoom square,
    and return the grid (not zoomed)."""
    from PIL import Image

    pixels = grid(images_BHWC, str(path))
    drawn = pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.squeeze(-1) if drawn.shape[-1] == 1 else drawn).save(path)
    return pixels


def save_images(images_BHWC: np.ndarray, folder: Path) -> None:
    """Each float image in [0, 1] (`_clipped`) as <folder>/000000.png, 000001.png, ..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_pixels(_clipped(images_BHWC), str(folder), "0,1")):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:06d}.png")
