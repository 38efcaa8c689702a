"""Image folders: every image under a folder, decoded once to uint8 (N, H, W, 3) and cached next to the images.

`load_image_folder` converts each image to RGB, applies its EXIF orientation and resizes it with the torchvision
`Resize(size)` + `CenterCrop(size)` geometry; unreadable files are skipped with warnings (or raise `DataError`
with strict=True), and the decoded array is cached, keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import concurrent.futures
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
_CACHE_VERSION = 2  # bump when decoding changes, so old caches are not reused
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


def _decode_image(path: Path, image_size: int) -> tuple[np.ndarray, bool]:
    """One file -> (uint8 (image_size, image_size, 3), whether it was upscaled). Raises if unusable."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated or corrupt file fails here, not later
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels, unrotated
            pass
        upscaled = min(im.size) < image_size
        rgb = _resize_center_crop(_to_rgb(im), image_size)
        arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape != (image_size, image_size, 3):
        raise ValueError(f"decoded to shape {arr.shape}")
    return arr, upscaled


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


def _cache_file(root: Path, files: list[Path], image_size: int, cache_dir) -> Path | None:
    """Where the decoded array for exactly these files (paths, sizes, mtimes) at this size lives."""
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
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return directory / f"{prefix}{image_size}px-{digest}.npz"


def _save_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically (temp file + os.replace), then remove this folder's stale caches."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stale_prefix = path.name[: path.name.rindex("-") + 1]
    for old in path.parent.glob(stale_prefix + "*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {path}: {e}")
        return None


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


def load_image_folder(path, image_size: int, *, strict: bool = False, cache_dir=None) -> np.ndarray:
    """Every image under `path` (recursive, sorted), as uint8 (N, image_size, image_size, 3).

    Each image: converted to RGB (grayscale, palette, CMYK, 16-bit; alpha composited on black),
    EXIF orientation applied, resized so the shorter side is `image_size` (bilinear, antialiased,
    as torchvision `Resize(image_size)`), centre-cropped (torchvision `CenterCrop`). Smaller images
    are upscaled, with one warning for all of them.

    Unreadable files (corrupt, truncated, empty, not an image, decompression bombs beyond Pillow's
    `Image.MAX_IMAGE_PIXELS`, directories named like images) are skipped with a warning each and a
    summary; with `strict=True` the first one raises `DataError`.

    Decoding happens once: the array is cached in `cache_dir` (default `<path>/.ddpm_cache/`, or
    `~/.cache/ddpm_jax` when the folder is read-only), keyed by the relative paths, sizes and
    modification times of the files, `image_size`, the Pillow version and `Image.MAX_IMAGE_PIXELS`.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (or is not a directory); expected a folder "
                        f"of images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    files, odd = list_images(root)
    if not files and not odd:
        raise DataError(f"no images in {root}: expected files with extensions {', '.join(IMAGE_EXTENSIONS)} "
                        "(searched recursively)")

    cache = _cache_file(root, files, image_size, cache_dir) if files else None
    cached = _load_cache(cache) if cache is not None else None
    if cached is not None:
        images = cached["images"]
        bad, reasons = list(cached["bad"]), list(cached["reasons"])
        upscaled = list(cached["upscaled"])
    else:
        images, bad, reasons, upscaled = _decode_all(root, files, image_size)
        if cache is not None:
            try:
                _save_cache(cache, images=images, bad=np.array(bad, dtype=str),
                            reasons=np.array(reasons, dtype=str), upscaled=np.array(upscaled, dtype=str))
            except OSError as e:
                warnings.warn(f"could not write cache {cache}: {e}")
    for p in odd:  # not regular files: never cached, always reported
        bad.append(p.relative_to(root).as_posix())
        reasons.append("not a regular file")
    order = np.argsort(bad, kind="stable")
    bad, reasons = [bad[i] for i in order], [reasons[i] for i in order]
    _report(root, bad, reasons, upscaled, image_size, strict)
    if len(images) == 0:
        raise DataError(f"no usable images in {root}: all {len(bad)} candidate file(s) were unreadable; "
                        f"expected images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return images


def _decode_all(root: Path, files: list[Path], image_size: int):
    """Decode `files` with a thread pool (Pillow releases the GIL while decoding and resizing)."""

    def one(f: Path):
        try:
            return _decode_image(f, image_size), None
        except Exception as e:  # noqa: BLE001 - every failure makes the file "unreadable"
            return None, f"{type(e).__name__}: {e}"

    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    keep = np.zeros(len(files), bool)
    bad, reasons, upscaled = [], [], []
    workers = min(8, os.cpu_count() or 1, max(1, len(files)))
    # Pillow only warns about images between MAX_IMAGE_PIXELS and twice that; make those errors too.
    # Warning filters are process-wide, so the decoding threads see this one.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for i, (result, why) in enumerate(pool.map(one, files)):
                name = files[i].relative_to(root).as_posix()
                if result is None:
                    bad.append(name)
                    reasons.append(why)
                else:
                    images[i], small = result
                    keep[i] = True
                    if small:
                        upscaled.append(name)
    return images[keep], bad, reasons, upscaled
