"""Training images: image folders, the embedded synthetic dataset, and a deterministic batch stream.

Three independent pieces:
  * `embedded_dataset`: procedurally generated aerial forest tiles, so that training and tests need no
    download. Synthetic, not real imagery.
  * `load_image_folder`: every image under a folder, decoded once to uint8 (N, H, W, 3) with the
    torchvision `Resize(size)` + `CenterCrop(size)` geometry, and cached next to the images.
  * `batch_indices` / `get_batch` / `Prefetcher`: the batch for a step is a pure function of
    (seed, step), so a resumed run sees exactly the batches it would have seen, on any number of
    processes; `Prefetcher` puts the next batches on the device from a background thread.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import queue
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL
from PIL import Image, ImageOps

EMBEDDED_NAME = "embedded"

# ============================================================================ embedded dataset

_GRID_MAX = 10  # most tree cells along a tile side; a crown reaches at most into the next cell
_NOISE_N = 5  # cells of the low-frequency noise grids (clearings, ground tone)
_LEAF_N = 48  # cells of the crown texture grid
_PAD = 2  # rings of tree cells outside the tile (crowns and shadows reach in from there)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(grid_BNN: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smoothly interpolate per-tile lattices `grid_BNN` at unit coordinates x, y (batch-leading)."""
    n = grid_BNN.shape[1]
    b = np.arange(grid_BNN.shape[0]).reshape((-1,) + (1,) * (np.ndim(x) - 1))
    gx = np.clip(x, 0.0, 1.0) * (n - 1)
    gy = np.clip(y, 0.0, 1.0) * (n - 1)
    x0 = np.minimum(gx.astype(np.int32), n - 2)
    y0 = np.minimum(gy.astype(np.int32), n - 2)
    fx = _smooth(gx - x0)
    fy = _smooth(gy - y0)
    top = grid_BNN[b, y0, x0] * (1 - fx) + grid_BNN[b, y0, x0 + 1] * fx
    bottom = grid_BNN[b, y0 + 1, x0] * (1 - fx) + grid_BNN[b, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _band_distance(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance (unit coordinates) from points to each tile's meandering band (river or road)."""
    shape = (-1,) + (1,) * (np.ndim(x) - 1)
    cos, sin = np.cos(p["band_angle"]).reshape(shape), np.sin(p["band_angle"]).reshape(shape)
    s = (x - 0.5) * cos + (y - 0.5) * sin
    t = -(x - 0.5) * sin + (y - 0.5) * cos
    centre = p["band_offset"].reshape(shape) + 0.0 * s
    slope = 0.0 * s
    for k in range(2):
        amp = p["band_amp"][:, k].reshape(shape)
        freq = 2 * np.pi * p["band_freq"][:, k].reshape(shape)
        phase = s * freq + p["band_phase"][:, k].reshape(shape)
        centre = centre + amp * np.sin(phase)
        slope = slope + amp * freq * np.cos(phase)
    return np.abs(t - centre) / np.sqrt(1.0 + slope * slope)


def _tile_params(rng: np.random.Generator) -> dict[str, Any]:
    """Every resolution-independent random choice of one tile, in a fixed draw order."""
    g = _GRID_MAX + 2 * _PAD  # tree cells, with rings outside the tile: edge crowns come from outside
    p: dict[str, Any] = {}
    p["cells"] = rng.integers(5, _GRID_MAX + 1)  # trees per side: the ground sample distance
    p["density"] = rng.uniform(0.6, 1.0)
    p["clear_level"] = rng.choice([2.0, rng.uniform(0.45, 0.8)], p=[0.35, 0.65])
    p["clear_noise"] = rng.uniform(0.0, 1.0, (_NOISE_N, _NOISE_N))
    p["ground_noise"] = rng.uniform(-1.0, 1.0, (_NOISE_N, _NOISE_N))
    p["leaf_noise"] = rng.uniform(-1.0, 1.0, (_LEAF_N, _LEAF_N))
    # Canopy colours: a tile-wide green and a second species, trees pick one and vary around it.
    green = rng.uniform(55, 115)
    species = np.stack(
        [
            [green * rng.uniform(0.45, 0.8), green, green * rng.uniform(0.3, 0.55)],
            [green * rng.uniform(0.3, 0.6), green * rng.uniform(0.75, 1.0), green * rng.uniform(0.35, 0.6)],
        ]
    )
    p["floor"] = np.array([green * 0.45, green * 0.45, green * 0.25]) * rng.uniform(0.6, 1.0)
    grass_kind = rng.integers(3)
    grass = [(110, 135, 60), (150, 145, 90), (95, 120, 55)][grass_kind]
    p["grass"] = np.array(grass) * rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
    # Trees: one candidate per cell, jittered inside it, varied radius, colour and height.
    p["tree_present"] = rng.uniform(size=(g, g))
    p["tree_jitter"] = rng.uniform(0.15, 0.85, (2, g, g))
    p["tree_radius"] = rng.uniform(0.45, 0.95, (g, g)) * rng.uniform(0.85, 1.0)
    p["tree_height"] = rng.uniform(0.0, 0.6, (g, g))
    p["tree_lobes"] = rng.uniform(0.0, 0.12, (g, g))  # ragged crown outline: amplitude and phase
    p["tree_phase"] = rng.uniform(-1.0, 1.0, (2, g, g))
    p["tree_species"] = rng.uniform(size=(g, g)) < rng.uniform(0.0, 0.5)
    p["tree_tint"] = rng.normal(1.0, 0.12, (g, g, 1)) * rng.normal(1.0, 0.05, (g, g, 3))
    p["tree_colour"] = species[p["tree_species"].astype(int)] * p["tree_tint"]
    # Sun from the upper left, at a random elevation.
    az = rng.uniform(0.9, 1.4) * np.pi
    el = rng.uniform(0.5, 0.9)
    p["light"] = np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
    # A river, a road or neither.
    p["band_kind"] = rng.choice(3, p=[0.55, 0.25, 0.2])  # 0 none, 1 river, 2 road
    p["band_angle"] = rng.uniform(0.0, np.pi)
    p["band_offset"] = rng.uniform(-0.25, 0.25)
    p["band_amp"] = rng.uniform(0.0, 0.12, 2) * (1.0 if p["band_kind"] == 1 else 0.3)
    p["band_freq"] = rng.uniform(0.5, 1.8, 2)
    p["band_phase"] = rng.uniform(0.0, 2 * np.pi, 2)
    p["band_width"] = rng.uniform(0.07, 0.16) if p["band_kind"] == 1 else rng.uniform(0.035, 0.06)
    p["water"] = np.array([35, 60, 75]) * rng.uniform(0.8, 1.4) + rng.uniform(-10, 10, 3)
    p["road"] = np.array([(120, 112, 100), (140, 120, 90)][rng.integers(2)]) * rng.uniform(0.85, 1.15)
    p["haze"] = rng.uniform(0.0, 0.15)
    p["exposure"] = rng.uniform(0.85, 1.2)
    return p


def _render_tiles(params: list[dict[str, Any]], pixel_noise: np.ndarray) -> np.ndarray:
    """Render a batch of tiles (all at the resolution of `pixel_noise`, (B, S, S)) to uint8 RGB."""
    bsz, size = pixel_noise.shape[:2]
    p = {k: np.stack([q[k] for q in params]).astype(np.float32) for k in params[0]}
    f32 = np.float32
    cells = p["cells"]  # (B,)
    u = ((np.arange(size, dtype=f32) + 0.5) / size)
    x, y = u[None, None, :], u[None, :, None]  # unit coordinates, broadcast to (B, S, S)

    # Clearing mask (1 = open ground) and which tree candidates survive.
    def clearing(xx, yy):
        n = _value_noise(p["clear_noise"], xx, yy)
        level = p["clear_level"].reshape((-1,) + (1,) * (np.ndim(xx) - 1))
        return np.clip((n - level) * 8.0, 0.0, 1.0)

    g = _GRID_MAX + 2 * _PAD
    ci = np.arange(-_PAD, g - _PAD, dtype=f32)
    tree_x = (ci[None, None, :] + p["tree_jitter"][:, 0]) / cells[:, None, None]
    tree_y = (ci[None, :, None] + p["tree_jitter"][:, 1]) / cells[:, None, None]
    radius_unit = p["tree_radius"] / cells[:, None, None]
    open_ground = clearing(tree_x, tree_y)
    alive = p["tree_present"] < p["density"][:, None, None] * (1.0 - open_ground) + 0.04
    band = p["band_kind"][:, None, None]
    dist = _band_distance(p, tree_x, tree_y)
    keep_out = p["band_width"][:, None, None] / 2 + radius_unit * np.where(band == 1, 0.3, 0.9)
    alive &= (band == 0) | (dist > keep_out)

    # Canopy: for each pixel, the highest crown among the 3x3 neighbouring cells. Per-tree values live
    # in flat tables indexed by (tile, cell row, cell column), read with np.take.
    px, py = x * cells[:, None, None], y * cells[:, None, None]  # cell coordinates, (B, 1, S), (B, S, 1)
    inv_pix = size / cells[:, None, None]  # pixels per cell
    table_x = (ci[None, None, :] + p["tree_jitter"][:, 0]).ravel()
    table_y = (ci[None, :, None] + p["tree_jitter"][:, 1]).ravel()
    table_r = np.where(alive, p["tree_radius"], -1.0).astype(f32).ravel()
    table_h = (p["tree_height"] + 0.5 * p["tree_radius"]).ravel()  # higher crowns hide lower ones
    tile_base = (np.arange(bsz, dtype=np.int32) * g * g + _PAD * g + _PAD)[:, None, None]

    def canopy(px, py, want_top: bool):
        base = tile_base + np.floor(py).astype(np.int32) * g + np.floor(px).astype(np.int32)
        cover = np.zeros(base.shape, f32)
        best_z = np.full(base.shape, -np.inf, f32)
        best_i = base.copy()  # no crown: any index in this tile; best_z stays -inf
        best_edge = np.zeros(base.shape, f32)
        for offset in (-g - 1, -g, -g + 1, -1, 0, 1, g - 1, g, g + 1):
            i = base + offset
            ddx = px - table_x.take(i)
            ddy = py - table_y.take(i)
            d2 = ddx * ddx + ddy * ddy
            edge = np.clip((table_r.take(i) - np.sqrt(d2)) * inv_pix + 0.5, 0.0, 1.0)
            if not want_top:
                np.maximum(cover, edge, out=cover)
            else:  # `cover` collects the crowns below the top one
                z = np.where(edge > 0, table_h.take(i), -np.inf)
                better = z > best_z
                np.maximum(cover, np.where(better, best_edge, edge), out=cover)
                best_edge = np.where(better, edge, best_edge)
                best_z = np.where(better, z, best_z)
                best_i = np.where(better, i, best_i)
        return cover, best_z > -np.inf, best_i

    below, covered, top = canopy(px, py, True)
    shade_shift = 0.45 * p["light"][:, :2, None, None] / np.maximum(p["light"][:, 2, None, None, None], 0.3)
    shadow, _, _ = canopy(px + shade_shift[:, 0], py + shade_shift[:, 1], False)

    # The top crown: ragged outline (five lobes: cos 5a and sin 5a as polynomials of cos a, sin a),
    # a squashed hemisphere normal lit by the sun, and leafy texture.
    r = table_r.take(top)
    ddx, ddy = px - table_x.take(top), py - table_y.take(top)
    d = np.sqrt(ddx * ddx + ddy * ddy) + 1e-6
    c, s = ddx / d, ddy / d
    c2, s2 = c * c, s * s
    lobe = (p["tree_phase"][:, 0].ravel().take(top) * c * (16 * c2 * c2 - 20 * c2 + 5)
            + p["tree_phase"][:, 1].ravel().take(top) * s * (16 * s2 * s2 - 20 * s2 + 5))
    r_lobed = r * (1.0 - p["tree_lobes"].ravel().take(top) * (1.0 + 0.5 * lobe))  # never beyond r
    cover = np.clip((r_lobed - d) * inv_pix + 0.5, 0.0, 1.0) * covered
    nx, ny = ddx / r, ddy / r
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0)) * 0.8
    light = p["light"]
    lambert = (nx * light[:, 0, None, None] + ny * light[:, 1, None, None] + nz * light[:, 2, None, None])
    lambert = np.clip(lambert / np.sqrt(nx * nx + ny * ny + nz * nz + 1e-6), 0.0, 1.0)
    leaf = _value_noise(p["leaf_noise"], x, y)
    crown_colour = p["tree_colour"].reshape(-1, 3)[top]  # (B, S, S, 3)
    crown = crown_colour * (0.35 + 0.85 * lambert + 0.18 * leaf)[..., None]

    # Ground: dark forest floor, lighter open ground, darkened where a crown casts its shadow.
    open_px = clearing(x, y)
    tone = 1.0 + 0.15 * _value_noise(p["ground_noise"], x, y)
    ground = (p["floor"][:, None, None] * (1 - open_px)[..., None] + p["grass"][:, None, None] * open_px[..., None])
    ground = ground * tone[..., None]
    if (p["band_kind"] > 0).any():
        d = _band_distance(p, x, y)
        half = p["band_width"][:, None, None] / 2
        inside = np.clip((half - d) / (1.0 / size) + 0.5, 0.0, 1.0)
        bank = np.clip((half + 0.02 - d) / (1.0 / size) + 0.5, 0.0, 1.0) - inside
        kind = p["band_kind"][:, None, None]
        ripple = 1.0 + 0.1 * leaf
        band_colour = np.where((kind == 1)[..., None], p["water"][:, None, None] * ripple[..., None],
                               p["road"][:, None, None] * tone[..., None])
        bank_colour = np.where((kind == 1)[..., None], np.float32([120, 115, 85]), p["road"][:, None, None] * 0.8)
        inside *= kind > 0
        bank *= kind > 0
        ground = ground * (1 - inside - bank)[..., None] + band_colour * inside[..., None] + bank_colour * bank[..., None]
    ground = ground * (1.0 - 0.55 * shadow)[..., None]

    # Where the top crown's ragged edge leaves a gap, lower crowns show, in its shade.
    under = ground * (1 - below)[..., None] + crown_colour * (0.45 * below)[..., None]
    img = under * (1 - cover)[..., None] + crown * cover[..., None]
    img = img + pixel_noise[..., None] * 4.0
    img = img * p["exposure"][:, None, None, None]
    haze = p["haze"][:, None, None, None]
    img = img * (1 - haze) + np.float32([150, 165, 175]) * haze
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def embedded_dataset(num_images: int = 2048, image_size: int = 32, seed: int = 0) -> np.ndarray:
    """Synthetic aerial forest tiles, uint8 (num_images, image_size, image_size, 3).

    Procedurally generated, NOT real imagery: a top-down view of forest terrain with shaded tree
    crowns (darker rim, lit side towards the sun, cast shadows), clearings of lighter ground, and on
    some tiles a meandering river or a road. Tile i is drawn from its own child seed
    `SeedSequence(seed, spawn_key=(i,))`, so it is the same whatever `num_images` is, and its scene
    (not its pixel noise) is the same at every `image_size`.
    """
    if num_images < 0 or image_size < 1:
        raise ValueError(f"need num_images >= 0 and image_size >= 1, got {num_images}, {image_size}")
    out = np.empty((num_images, image_size, image_size, 3), np.uint8)
    chunk = max(1, 2**15 // (image_size * image_size))  # small chunks keep temporaries in cache
    for start in range(0, num_images, chunk):
        stop = min(start + chunk, num_images)
        params, noise = [], []
        for i in range(start, stop):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
            params.append(_tile_params(rng))
            noise.append(rng.standard_normal((image_size, image_size), np.float32))
        out[start:stop] = _render_tiles(params, np.stack(noise))
    return out


# ============================================================================ image folders

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


# ============================================================================ batches


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 0, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of the global batch at `step`: a pure function of its arguments.

    Global position p = step * batch_size + j is example perm_e[p % N] of epoch e = p // N, where
    perm_e is a permutation drawn from (seed, e): every example once per epoch, whatever the step.
    """
    if num_examples < 1 or batch_size < 1 or seed < 0 or step < 0:
        raise ValueError(f"need num_examples, batch_size >= 1 and seed, step >= 0; got "
                         f"{num_examples}, {batch_size}, {seed}, {step}")
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_examples)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(num_examples, seed, int(e))[offsets[sel]]
    return out


def flip_mask(batch_size: int, seed: int, step: int) -> np.ndarray:
    """Which examples of the global batch at `step` are flipped left-right: bool (batch_size,)."""
    return np.random.default_rng([seed, 1, step]).random(batch_size) < 0.5


def get_batch(images: np.ndarray, batch_size: int, seed: int, step: int, *, flip: bool = True,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's share of the global batch at `step`: float32 (B / process_count, H, W, 3) in [-1, 1].

    `batch_size` is the global batch; every process computes the same global indices and flips and
    keeps the contiguous slice [i * B / n, (i + 1) * B / n). Pixels map as x / 255 * 2 - 1, the
    reference's ToTensor then normalize_to_neg_one_to_one.
    """
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"batch_size {batch_size} must split evenly over {process_count} processes "
                         f"(process_index {process_index})")
    local = batch_size // process_count
    lo, hi = process_index * local, (process_index + 1) * local
    x_BHWC = images[batch_indices(len(images), batch_size, seed, step)[lo:hi]]
    if flip:
        mask = flip_mask(batch_size, seed, step)[lo:hi]
        x_BHWC[mask] = x_BHWC[mask, :, ::-1]
    return x_BHWC.astype(np.float32) / 255.0 * 2.0 - 1.0


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _place(batch, sharding):
    import jax

    if sharding is None:
        return jax.device_put(batch)
    if jax.process_count() > 1:
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)
    return jax.device_put(batch, sharding)


def _produce(fn, sharding, step: int, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetcher's thread: put (step, device batch) for consecutive steps, or a _Failure, on `out`."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            if not put((step, _place(fn(step), sharding))):
                return
            step += 1
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        put(_Failure(e))


class Prefetcher:
    """Iterate (step, device batch) for step = start_step, start_step + 1, ...

    A daemon thread calls `fn(step)` for the host batch and puts it on the device ahead of use, at
    most `depth` batches ahead. With a `sharding`, one process uses `jax.device_put(batch, sharding)`
    and several processes `jax.make_array_from_process_local_data(sharding, local_batch)`. An
    exception in `fn` or in the transfer is raised by the next `next()`. Use as a context manager,
    or call `close()`.
    """

    def __init__(self, fn: Callable[[int], np.ndarray], start_step: int, sharding=None, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread holds no reference to self, so an abandoned Prefetcher is collected and stops it.
        self._thread = threading.Thread(
            target=_produce, args=(fn, sharding, start_step, self._queue, self._stop), daemon=True,
            name="ddpm-prefetch")
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread and drop the batches it prepared. Safe to call more than once."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()
