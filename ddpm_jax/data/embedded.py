"""The embedded synthetic dataset: procedurally generated aerial forest tiles, so that training needs no download.

Synthetic, not real imagery: shaded tree crowns, clearings, and on some tiles a river or a road, rendered in NumPy
a batch of tiles at a time. Tile i is drawn from its own child seed, so it does not depend on how many tiles are
asked for, and its scene (not its pixel noise) is the same at every resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EMBEDDED_NAME = "embedded"

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
