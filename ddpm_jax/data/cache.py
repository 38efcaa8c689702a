"""The image-folder cache: a folder's decoded images as a `.npy` file, opened memory-mapped, with a `.json` record
beside it (count, skipped files and why, upscaled files, whether all were grayscale).

Its name keys on the files' relative paths, sizes and modification times, the image size, the channel count, the
Pillow version and `Image.MAX_IMAGE_PIXELS`. It lives in `<folder>/.ddpm_cache/`, or `~/.cache/ddpm_jax` when
the folder is read-only; the `.npy` is complete before the `.json` that makes it a cache exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

DIR_NAME = ".ddpm_cache"
VERSION = 3  # bump when folder.py decodes differently, so old caches are not reused


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "ddpm_jax")


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def paths(root: Path, files: list[Path], image_size: int, cache_dir) -> dict[int, Path] | None:
    """Where the decoded array for exactly these files (paths, sizes, mtimes) at this size lives, for 1 and for 3
    channels: <dir>/[<folder hash>-]<size>px-<channels>c-<key hash>.npy, with its .json beside it."""
    entries = []
    for f in files:
        st = f.stat()
        entries.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    if cache_dir is None:
        candidates = [(root / DIR_NAME, False), (user_cache_dir(), True)]
    else:
        candidates = [(Path(cache_dir), True)]
    for directory, shared in candidates:
        if writable_dir(directory):
            break
    else:
        warnings.warn(f"no writable cache directory for {root} (tried {[str(d) for d, _ in candidates]}); "
                      "images will be decoded again next time")
        return None
    key = {"version": VERSION, "pillow": PIL.__version__, "max_pixels": Image.MAX_IMAGE_PIXELS,
           "image_size": image_size, "files": entries}
    # A cache directory shared between folders also keys on which folder it is.
    prefix = ""
    if shared:
        prefix = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] + "-"
        key["root"] = str(root.resolve())

    def path(channels: int) -> Path:
        digest = hashlib.sha256(json.dumps({**key, "channels": channels}).encode()).hexdigest()[:24]
        return directory / f"{prefix}{image_size}px-{channels}c-{digest}.npy"

    return {channels: path(channels) for channels in (1, 3)}


def _replace_atomically(path: Path, write) -> None:
    """write(file object) into a temp file beside `path`, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale(path: Path) -> None:
    """Delete this folder's caches of other file sets (and of older versions of this module)."""
    stale_prefix = path.name[: path.name.rindex("-") + 1]  # <folder hash>-<size>px-<channels>c-
    for old in path.parent.glob(stale_prefix + "*"):
        if old.stem != path.stem and old.suffix in (".npy", ".json", ".npz"):
            old.unlink(missing_ok=True)


def read_record(path: Path) -> dict:
    """The `.json` record of the cache `path`."""
    return json.loads(path.with_suffix(".json").read_text())


def load(path: Path) -> tuple[np.ndarray, dict] | None:
    """The memory-mapped array and its record, or None when either is missing or unreadable."""
    try:
        meta = read_record(path)
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {path}: {e}")
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != meta.get("count"):
        warnings.warn(f"ignoring inconsistent cache {path}")
        return None
    return images, meta


def allocate(cache: Path, shape) -> tuple[str, np.ndarray] | None:
    """A .npy temp file beside `cache` with disk space reserved for `shape` uint8 (so that a full disk is an
    error now, not a crash while writing through the map), mapped for writing; None (with a warning) if the
    space is not there."""
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.stem, suffix=".tmp")
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        return tmp, images
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"could not write cache {cache}: {e}; decoding into memory instead")
        return None


def complete(cache: Path, target: tuple[str, np.ndarray], count: int, record: dict) -> None:
    """Move the decoded rows [0, count) of the temp file into `cache` (copying them when files were skipped),
    then write the record beside it: the .npy is complete before the .json that makes it a cache exists."""
    tmp, images = target
    images.flush()
    if count == len(images):
        os.replace(tmp, cache)
    else:
        _replace_atomically(cache, lambda f: np.save(f, images[:count]))
    _replace_atomically(cache.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
    _remove_stale(cache)
