"""Image sets stored as arrays: a .npy file of uint8 images, memory-mapped (a dataset larger than RAM), and a .npz
file of samples (uint8, or floats in a stated range, NHWC or NCHW)."""

from __future__ import annotations

import zipfile

import numpy as np

from ddpm_jax.images import to_uint8


def load_npy(path: str) -> np.ndarray:
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


def load_npz(path: str, float_range: str) -> np.ndarray:
    """The images of a .npz file (the array under key "images", else the first array; a .npy under a .npz name
    too) as uint8 (N, S, S, 3), converted by `images.to_uint8` with `float_range`."""
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
