"""Images as arrays and files: the float -> uint8 conversion, PNG grids and single PNGs, and the loader of an
image set named on a command line (a folder, a .npz file, or the embedded dataset)."""

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from ddpm_jax import data

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


def _load_npz(path: str, float_range: str) -> np.ndarray:
    # np.load reads anything that is neither a zip (.npz) nor a .npy as a pickle, and with
    # allow_pickle=False blames "pickled (object) data" even for a text file.
    with open(path, "rb") as f:
        npy = f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
    if not (npy or zipfile.is_zipfile(path)):
        raise ValueError(f"{path}: is not a valid .npz file (neither a zip archive of arrays nor a .npy array)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy saved under a .npz name
            key, array = "array", loaded
        else:
            with loaded:
                if not loaded.files:
                    raise ValueError("it holds no arrays")
                key = "images" if "images" in loaded.files else loaded.files[0]
                array = loaded[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read as .npz of images ({e})") from e
    return to_uint8(array, name=f"{path}[{key!r}]", float_range=float_range)


def load_images(spec: str, image_size: int | None, *, num: int | None = None, embedded_seed: int = 0,
                float_range: str = "0,1", strict: bool = False, channels: int | None = 3) -> np.ndarray:
    """Images named by `spec` as uint8 (N, S, S, C).

    spec: an image folder (ddpm_jax.data.load_image_folder with `strict` and `channels`, resized to `image_size`;
    None: the size its images share, an error if they differ), a .npy file of uint8 (N, S, S, C) images
    (memory-mapped: a dataset larger than RAM), a .npz file (the array under key "images", else the first array;
    converted by `to_uint8` with `float_range`; RGB), or "embedded" (ddpm_jax.data.embedded_dataset with
    `embedded_seed`, `num` images, default 2048, of `image_size`, default 32, px; RGB). Files are not resized:
    their size must equal `image_size` when given. channels: 1 or 3, or None for the data's own (a folder: 1 when
    all its images are grayscale).
    num: keep at most the first `num` images (folders and files).
    """
    if num is not None and num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if spec == data.EMBEDDED_NAME:
        if channels == 1:
            raise ValueError("the embedded tiles are RGB: expected 3 channels, not 1")
        return data.embedded_dataset(
            num_images=2048 if num is None else num,
            image_size=32 if image_size is None else image_size,
            seed=embedded_seed,
        )
    if not os.path.exists(spec):
        raise FileNotFoundError(f"{spec}: no such file or folder; expected an image folder, a .npy or .npz file, or "
                                "'embedded'")
    if os.path.isdir(spec):
        images = data.load_image_folder(spec, _common_size(spec) if image_size is None else image_size,
                                        channels=channels, strict=strict)
    elif spec.endswith((".npz", ".npy")):
        images = _load_npz(spec, float_range) if spec.endswith(".npz") else _load_npy(spec)
        if image_size is not None and images.shape[1:3] != (image_size, image_size):
            raise ValueError(f"{spec}: images are {images.shape[1]}x{images.shape[2]} px, expected "
                             f"{image_size}x{image_size} (image_size); files are not resized")
        if channels is not None and images.shape[3] != channels:
            raise ValueError(f"{spec}: images have {images.shape[3]} channel(s), expected {channels}")
    else:
        raise ValueError(f"{spec}: expected an image folder, a .npy or .npz file, or 'embedded'")
    return images[:num] if num is not None else images


def _load_npy(path: str) -> np.ndarray:
    """A .npy file of uint8 (N, S, S, 1 or 3) images, memory-mapped (read only)."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not a .npy, or one holding objects
        raise ValueError(f"{path}: cannot read as a .npy array of images ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2] or \
            images.shape[3] not in (1, 3) or not len(images):
        raise ValueError(f"{path}: holds {images.dtype} {images.shape}; expected uint8 images (N, S, S, C) with "
                         "N >= 1 and C = 1 or 3")
    return images


def _common_size(folder: str) -> int:
    """The side of the square images of `folder` when they all have one size (read from the headers)."""
    from PIL import Image

    sizes = set()
    for path in data.list_images(Path(folder))[0]:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except OSError:
            continue  # load_image_folder reports unreadable files
    if len(sizes) == 1 and len({*next(iter(sizes))}) == 1:
        return next(iter(sizes))[0]
    seen = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3]) or "none readable"
    raise ValueError(f"{folder}: its images are not all one square size ({seen}); "
                     f"pass --image-size to resize them to one")


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


def save_grid(images_BHWC: np.ndarray, path: Path) -> np.ndarray:
    """Write `grid(images_BHWC)` as a PNG (grayscale for one channel) and return it."""
    from PIL import Image

    pixels = grid(images_BHWC, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)
    return pixels


def save_images(images_BHWC: np.ndarray, folder: Path) -> None:
    """Each float image in [0, 1] (`_clipped`) as <folder>/000000.png, 000001.png, ..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_pixels(_clipped(images_BHWC), str(folder), "0,1")):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:06d}.png")
