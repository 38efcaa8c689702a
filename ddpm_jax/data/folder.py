"""Image folders: every image under a folder, decoded once to uint8 (N, H, W, C) and cached next to the images as
a memory-mapped array, so that a dataset larger than RAM trains from disk.

`load_image_folder` converts each image to RGB (or to grayscale for one channel), applies its EXIF orientation
and resizes it with the torchvision `Resize(size)` + `CenterCrop(size)` geometry; unreadable files are skipped with
warnings (or raise `DataError` with strict=True). The decoded array is a `.npy` file opened with
`mmap_mode="r"`, keyed by the files' paths, sizes and modification times, with a `.json` beside it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CACHE_DIR_NAME = ".ddpm_cache"
_CACHE_VERSION = 3  # bump when decoding changes, so old caches are not reused
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_LISTED_BAD = 5  # bad files named in the summary warning


class DataError(ValueError):
    """A dataset cannot be used: missing, empty, or (with strict=True) holding an unreadable file."""


def list_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Image-named entries under `root`, sorted by relative path: (regular files, everything else).

    Directories are walked (a directory named `x.png/` is reported in the second list and still
    walked); the cache directory is skipped.
    """
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != CACHE_DIR_NAME)
        for name in filenames + dirnames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath, name)
                (files if path.is_file() else odd).append(path)
    key = lambda q: q.relative_to(root).as_posix()  # noqa: E731
    return sorted(files, key=key), sorted(odd, key=key)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Alpha is composited on black (transparent -> black)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit (and 32-bit integer/float images holding 16-bit values) scale 65535 -> 255; float images
        # within [0, 1] scale 1 -> 255; other "I" or "F" images whose values all fit in 8 bits are taken as 8-bit.
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        elif im.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, im).convert("RGB")
    return im.convert("RGB")


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` (shorter side -> size, bilinear, antialiased) + `CenterCrop(size)`."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def _decode_image(path: Path, image_size: int, channels: int) -> tuple[np.ndarray, bool, bool]:
    """One file -> (uint8 (image_size, image_size, channels), whether it was upscaled, whether it is grayscale).
    One channel is the RGB image's luma (Pillow's "L"), which for a grayscale file is its own values. Raises if
    unusable."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated or corrupt file fails here, not later
        gray = im.mode in GRAYSCALE_MODES
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels, unrotated
            pass
        upscaled = min(im.size) < image_size
        rgb = _resize_center_crop(_to_rgb(im), image_size)
        arr = np.asarray(rgb.convert("L") if channels == 1 else rgb, dtype=np.uint8).reshape(
            image_size, image_size, -1)
    if arr.shape != (image_size, image_size, channels):
        raise ValueError(f"decoded to shape {arr.shape}")
    return arr, upscaled, gray


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "ddpm_jax")


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _cache_files(root: Path, files: list[Path], image_size: int, cache_dir) -> dict[int, Path] | None:
    """Where the decoded array for exactly these files (paths, sizes, mtimes) at this size lives, for 1 and for 3
    channels: <dir>/[<folder hash>-]<size>px-<channels>c-<key hash>.npy, with its .json beside it."""
    entries = []
    for f in files:
        st = f.stat()
        entries.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    if cache_dir is None:
        candidates = [(root / CACHE_DIR_NAME, False), (_user_cache_dir(), True)]
    else:
        candidates = [(Path(cache_dir), True)]
    for directory, shared in candidates:
        if _writable_dir(directory):
            break
    else:
        warnings.warn(f"no writable cache directory for {root} (tried {[str(d) for d, _ in candidates]}); "
                      "images will be decoded again next time")
        return None
    key = {"version": _CACHE_VERSION, "pillow": PIL.__version__, "max_pixels": Image.MAX_IMAGE_PIXELS,
           "image_size": image_size, "files": entries}
    # A cache directory shared between folders also keys on which folder it is.
    prefix = ""
    if shared:
        prefix = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] + "-"
        key["root"] = str(root.resolve())
    paths = {}
    for channels in (1, 3):
        digest = hashlib.sha256(json.dumps({**key, "channels": channels}).encode()).hexdigest()[:24]
        paths[channels] = directory / f"{prefix}{image_size}px-{channels}c-{digest}.npy"
    return paths


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


def _load_cache(path: Path) -> tuple[np.ndarray, dict] | None:
    """The memory-mapped array and its record, or None when either is missing or unreadable."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
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


def _report(root: Path, bad: list[str], reasons: list[str], upscaled: list[str], image_size: int,
            strict: bool) -> None:
    if bad and strict:
        raise DataError(f"cannot read image {root / bad[0]}: {reasons[0]}")
    for name, why in zip(bad, reasons):
        warnings.warn(f"skipping unreadable image {root / name}: {why}")
    if bad:
        shown = ", ".join(bad[:_LISTED_BAD]) + (", ..." if len(bad) > _LISTED_BAD else "")
        warnings.warn(f"skipped {len(bad)} unreadable file(s) under {root}: {shown}")
    if upscaled:
        warnings.warn(f"{len(upscaled)} image(s) under {root} are smaller than {image_size} px on their "
                      f"shorter side and were upscaled (first: {upscaled[0]})")


def load_image_folder(path, image_size: int, *, channels: int | None = None, strict: bool = False,
                      cache_dir=None) -> np.ndarray:
    """Every image under `path` (recursive, sorted), as uint8 (N, image_size, image_size, channels), memory-mapped
    from the cache (an in-memory array where no cache folder is writable).

    Each image: converted to RGB (grayscale, palette, CMYK, 16-bit; alpha composited on black), or for
    channels=1 to its luma, EXIF orientation applied, resized so the shorter side is `image_size` (bilinear,
    antialiased, as torchvision `Resize(image_size)`), centre-cropped (torchvision `CenterCrop`). Smaller images
    are upscaled, with one warning for all of them. channels=None: 1 when every readable image is grayscale,
    else 3 (`grayscale_folder` says which).

    Unreadable files (corrupt, truncated, empty, not an image, decompression bombs beyond Pillow's
    `Image.MAX_IMAGE_PIXELS`, directories named like images) are skipped with a warning each and a
    summary; with `strict=True` the first one raises `DataError`.

    Decoding happens once, on every core, with a progress bar on a terminal, straight into the cache: a .npy file in
    `cache_dir` (default `<path>/.ddpm_cache/`, or `~/.cache/ddpm_jax` when the folder is read-only), keyed by
    the relative paths, sizes and modification times of the files, `image_size`, `channels`, the Pillow version
    and `Image.MAX_IMAGE_PIXELS`, and renamed into place when complete.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (or is not a directory); expected a folder "
                        f"of images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    files, odd = list_images(root)
    if not files and not odd:
        raise DataError(f"no images in {root}: expected files with extensions {', '.join(IMAGE_EXTENSIONS)} "
                        "(searched recursively)")

    caches = _cache_files(root, files, image_size, cache_dir) if files else None
    if channels is None:
        channels = 1 if _all_grayscale(files, caches) else 3
    cache = caches[channels] if caches else None
    loaded = _load_cache(cache) if cache is not None else None
    if loaded is None:
        loaded = _decode_all(root, files, image_size, channels, cache)
    images, meta = loaded
    bad, reasons = list(meta["bad"]), list(meta["reasons"])
    for p in odd:  # not regular files: never cached, always reported
        bad.append(p.relative_to(root).as_posix())
        reasons.append("not a regular file")
    order = np.argsort(bad, kind="stable")
    bad, reasons = [bad[i] for i in order], [reasons[i] for i in order]
    _report(root, bad, reasons, meta["upscaled"], image_size, strict)
    if len(images) == 0:
        raise DataError(f"no usable images in {root}: all {len(bad)} candidate file(s) were unreadable; "
                        f"expected images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return images


def grayscale_folder(path, image_size: int, *, cache_dir=None) -> bool:
    """Whether every readable image under `path` is grayscale (Pillow modes 1, L, LA, I, F, I;16): from a cache's
    record where one exists, else from the files' headers."""
    root = Path(path)
    files = list_images(root)[0]
    return _all_grayscale(files, _cache_files(root, files, image_size, cache_dir) if files else None)


def _all_grayscale(files: list[Path], caches: dict[int, Path] | None) -> bool:
    for cache in (caches or {}).values():
        with contextlib.suppress(Exception):  # no cache, or a damaged one: the headers say it
            return bool(json.loads(cache.with_suffix(".json").read_text())["all_gray"])

    with warnings.catch_warnings():  # a decompression bomb's warning comes when it is decoded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(_workers(len(files))) as pool:
            modes = [m for m in pool.map(_header_mode, files) if m is not None]
    return bool(modes) and all(m in GRAYSCALE_MODES for m in modes)


def _header_mode(f: Path) -> str | None:
    """The Pillow mode in the file's header, None if it does not open. Grayscale is judged by this for every
    file, decodable or not, both before decoding and in the cache's record, so that both say the same."""
    try:
        with Image.open(f) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - unreadable files are reported when decoding
        return None


def _workers(n: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, n))


def _decode_all(root: Path, files: list[Path], image_size: int, channels: int, cache: Path | None):
    """Decode `files` with a thread per core (Pillow releases the GIL while decoding and resizing) into the cache
    `cache` (or into memory where it is None, or cannot be allocated); returns (images, record)."""
    from tqdm.auto import tqdm

    shape = (len(files), image_size, image_size, channels)
    target = _allocate(cache, shape) if cache is not None else None
    images = target[1] if target else np.empty(shape, np.uint8)
    count, bad, reasons, upscaled, all_gray = 0, [], [], [], True

    def one(f: Path):
        try:
            return _decode_image(f, image_size, channels), None
        except Exception as e:  # noqa: BLE001 - every failure makes the file "unreadable"
            return None, f"{type(e).__name__}: {e}"

    pool = concurrent.futures.ThreadPoolExecutor(_workers(len(files)))
    try:
        # Pillow only warns about images between MAX_IMAGE_PIXELS and twice that; make those errors too.
        # Warning filters are process-wide, so the decoding threads see this one.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for f, (result, why) in tqdm(zip(files, pool.map(one, files)), total=len(files), desc=f"decoding {root}",
                                         unit="img", dynamic_ncols=True, leave=False, disable=None):
                name = f.relative_to(root).as_posix()
                if result is None:
                    bad.append(name)
                    reasons.append(why)
                    mode = _header_mode(f)
                    all_gray = all_gray and (mode is None or mode in GRAYSCALE_MODES)
                    continue
                images[count], small, gray = result  # the usable images, in order, from row 0
                count, all_gray = count + 1, all_gray and gray
                if small:
                    upscaled.append(name)
    except BaseException:  # Ctrl-C or a failure: no decode queued, no temp file of the dataset's size left
        pool.shutdown(wait=True, cancel_futures=True)
        if target is not None:
            Path(target[0]).unlink(missing_ok=True)
        raise
    pool.shutdown()
    record = {"count": count, "bad": bad, "reasons": reasons, "upscaled": upscaled, "all_gray": all_gray}
    if target is None:
        return images[:count], record
    try:
        _complete(cache, target, count, record)
    except OSError as e:  # the rows stay readable through the map after the temp file's name is gone
        warnings.warn(f"could not write cache {cache}: {e}; the images are decoded again next time")
        return images[:count], record
    finally:
        Path(target[0]).unlink(missing_ok=True)
    return np.load(cache, mmap_mode="r"), record


def _allocate(cache: Path, shape) -> tuple[str, np.ndarray] | None:
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


def _complete(cache: Path, target: tuple[str, np.ndarray], count: int, record: dict) -> None:
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
