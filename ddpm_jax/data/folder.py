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
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ddpm_jax.data import cache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
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
        dirnames[:] = sorted(d for d in dirnames if d != cache.DIR_NAME)
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
    else 3.

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

    caches = cache.paths(root, files, image_size, cache_dir) if files else None
    if channels is None:
        channels = 1 if _all_grayscale(files, caches) else 3
    cached = caches[channels] if caches else None
    loaded = cache.load(cached) if cached is not None else None
    if loaded is None:
        loaded = _decode_all(root, files, image_size, channels, cached)
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


def common_size(folder) -> int:
    """The side of the square images of `folder` when they all have one size (read from the headers)."""
    sizes = set()
    for path in list_images(Path(folder))[0]:
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


def _all_grayscale(files: list[Path], caches: dict[int, Path] | None) -> bool:
    """Whether every readable image is grayscale (Pillow modes 1, L, LA, I, F, I;16): from a cache's record where
    one exists, else from the files' headers."""
    for path in (caches or {}).values():
        with contextlib.suppress(Exception):  # no cache, or a damaged one: the headers say it
            return bool(cache.read_record(path)["all_gray"])

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


def _decode_all(root: Path, files: list[Path], image_size: int, channels: int, cached: Path | None):
    """Decode `files` with a thread per core (Pillow releases the GIL while decoding and resizing) into the cache
    `cached` (or into memory where it is None, or cannot be allocated); returns (images, record)."""
    from tqdm.auto import tqdm

    shape = (len(files), image_size, image_size, channels)
    target = cache.allocate(cached, shape) if cached is not None else None
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
        cache.complete(cached, target, count, record)
    except OSError as e:  # the rows stay readable through the map after the temp file's name is gone
        warnings.warn(f"could not write cache {cached}: {e}; the images are decoded again next time")
        return images[:count], record
    finally:
        Path(target[0]).unlink(missing_ok=True)
    return np.load(cached, mmap_mode="r"), record


