"""Sliced Wasserstein distance (SWD) between two image sets, as in ProGAN, and their colour distance.

Karras et al. 2018, "Progressive Growing of GANs", appendix D.1, and their code
https://github.com/tkarras/progressive_growing_of_gans/blob/master/metrics/sliced_wasserstein.py

Per set: a Laplacian pyramid (5x5 binomial filter, mirror borders) from full resolution down to
16 px; from every level 128 random 7x7x3 neighbourhoods per image, taken from the float32 pyramid of
the uint8 pixel values (range [0, 255]); descriptors normalised per colour channel with the mean and
std of that set's descriptors at that level. Per level: 4 repeats of 128 random unit directions,
project both sets, sort, mean absolute difference; averaged over repeats, times 1e3. The reported
"swd" is the mean over levels. Because each set is standardised, SWD cannot see a colour cast;
`colour_distance` measures it.

`compare(real_spec, fake_spec)` loads two image sets with `ddpm_jax.data.load` and measures both; the command
line (cli.py) prints its record:
    ddpm-evaluate --real embedded --fake samples.npz
"""

from __future__ import annotations

import sys

import numpy as np

from ddpm_jax import data

NHOOD_SIZE = 7  # ProGAN's descriptor: a 7x7 neighbourhood of 3 channels.

# ProGAN's `gaussian_filter`: outer([1, 4, 6, 4, 1]) / 256, applied here as two 1-D passes.
_BINOMIAL_5 = np.float32([1, 4, 6, 4, 1]) / np.float32(16)


# ----------------------------------------------------------------------------- Laplacian pyramid


def _blur_axis(x: np.ndarray, axis: int, taps: np.ndarray) -> np.ndarray:
    """Correlate `x` with 5 symmetric `taps` along `axis`, mirror borders (scipy.ndimage 'mirror')."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    # numpy 'reflect' is scipy.ndimage 'mirror': (d c b | a b c d | c b a).
    xp = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for k, w in enumerate(taps):
        out += w * np.take(xp, np.arange(k, k + n), axis=axis)
    return out


def _blur(x_BHWC: np.ndarray, gain: float = 1.0) -> np.ndarray:
    taps = _BINOMIAL_5 * np.float32(gain)
    return _blur_axis(_blur_axis(x_BHWC, 1, taps), 2, _BINOMIAL_5)


def pyr_down(x_BHWC: np.ndarray) -> np.ndarray:
    """Blur then keep every second pixel: ProGAN's `pyr_down` (cv2.pyrDown)."""
    return _blur(x_BHWC)[:, ::2, ::2]


def pyr_up(x_BHWC: np.ndarray) -> np.ndarray:
    """Zero-insert to double size, then blur with 4x the filter: ProGAN's `pyr_up` (cv2.pyrUp)."""
    b, h, w, c = x_BHWC.shape
    up = np.zeros((b, 2 * h, 2 * w, c), x_BHWC.dtype)
    up[:, ::2, ::2] = x_BHWC
    return _blur(up, gain=4.0)


def laplacian_pyramid(images_BHWC: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Band-pass levels, finest first; the last level is the low-pass residual.

    float32 of the raw pixel values, as ProGAN's `generate_laplacian_pyramid`.
    """
    pyramid = [np.asarray(images_BHWC, np.float32)]
    for _ in range(1, num_levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


# ----------------------------------------------------------------------------- descriptors


def _descriptors(level_BHWC: np.ndarray, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """`per_image` random 7x7x3 neighbourhoods per image as (n, C, 7, 7), in ProGAN's layout."""
    b, h, w, _ = level_BHWC.shape
    r = NHOOD_SIZE // 2
    n = b * per_image
    img = np.arange(n) // per_image
    # ProGAN draws x then y, each in [r, size - r): every neighbourhood lies inside the image.
    x = rng.integers(r, w - r, size=n)
    y = rng.integers(r, h - r, size=n)
    offs = np.arange(-r, r + 1)
    rows = (y[:, None] + offs)[:, :, None]  # (n, 7, 1)
    cols = (x[:, None] + offs)[:, None, :]  # (n, 1, 7)
    desc_nYXC = level_BHWC[img[:, None, None], rows, cols]  # (n, 7 rows, 7 cols, C)
    # ProGAN's np.ogrid puts the x offset on axis 2 and y on axis 3: (n, C, x, y).
    return np.ascontiguousarray(desc_nYXC.transpose(0, 3, 2, 1))


def _finalize_descriptors(desc_nC77: np.ndarray) -> np.ndarray:
    """ProGAN's `finalize_descriptors`: per-channel standardisation, then flatten."""
    mean = desc_nC77.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = desc_nC77.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel would give nan in ProGAN's code
    desc = ((desc_nC77 - mean) / std).astype(np.float32)
    return desc.reshape(desc.shape[0], -1)


# ----------------------------------------------------------------------------- sliced Wasserstein


def _wasserstein1_sorted(a_Dn: np.ndarray, b_Dm: np.ndarray) -> np.ndarray:
    """Per-row 1-D Wasserstein-1 distance between samples sorted along the last axis; shape (D,).

    With equal counts this is ProGAN's mean |sort(a) - sort(b)|. With unequal counts it is the exact
    integral of |F_a^-1(u) - F_b^-1(u)| du over the merged quantile breakpoints i/n and j/m.
    """
    n, m = a_Dn.shape[-1], b_Dm.shape[-1]
    if n == m:
        return np.abs(a_Dn - b_Dm).mean(axis=-1)
    # Breakpoints in units of 1 / (n m), so i/n and j/m that coincide merge exactly.
    cuts = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
    starts, widths = cuts[:-1], np.diff(cuts) / (n * m)
    gap = np.abs(a_Dn[:, starts // m] - b_Dm[:, starts // n])
    return gap @ widths


def sliced_wasserstein(
    a_nD: np.ndarray, b_mD: np.ndarray, dir_repeats: int, dirs_per_repeat: int, rng: np.random.Generator
) -> float:
    """ProGAN's `sliced_wasserstein`: random unit directions, shared by both sets."""
    results = []
    for _ in range(dir_repeats):
        dirs = rng.standard_normal((a_nD.shape[1], dirs_per_repeat))
        dirs /= np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))
        dirs = dirs.astype(np.float32)
        # (direction, neighbourhood) so each sort runs over contiguous memory.
        proj_a = np.sort(dirs.T @ a_nD.T, axis=-1)
        proj_b = np.sort(dirs.T @ b_mD.T, axis=-1)
        results.append(float(np.mean(_wasserstein1_sorted(proj_a, proj_b))))
    return float(np.mean(results))


def resolutions(image_size: int, min_resolution: int = 16) -> list[int]:
    """Pyramid level resolutions as ProGAN lists them: full size, halving while >= min_resolution."""
    res, out = image_size, []
    while res >= min_resolution:
        out.append(res)
        res //= 2
    return out


def _check_images(name: str, images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected dtype uint8 (N,H,W,3) with values in [0, 255], got {images.dtype}; "
            "convert float images with ddpm_jax.images.to_uint8"
        )
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (N, S, S, 3) with N >= 1 (square RGB, NHWC), got {images.shape}")


def swd(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    seed: int = 0,
    descriptors_per_image: int = 128,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    min_resolution: int = 16,
) -> dict:
    """Sliced Wasserstein distance x1e3 between uint8 (N,S,S,3) image sets (N may differ).

    Returns {"swd": mean over levels, "levels": {resolution: swd at that level}}. Deterministic in
    `seed`: descriptor positions come from one stream per level, replayed identically for both sets
    (so a set compared with itself gives exactly 0), and projections from a separate stream, the
    same directions applied to both sets.
    As in ProGAN each set is standardised on its own, so a global brightness/contrast change of one
    set is (nearly) invisible: SWD measures local structure, not mean colour.
    Memory: one level at a time, about (N_real + N_fake) * descriptors_per_image * 147 * 4 bytes.
    """
    _check_images("real", real)
    _check_images("fake", fake)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake must have the same image shape, got {real.shape[1:]} and {fake.shape[1:]}")
    size = real.shape[1]
    if min_resolution < NHOOD_SIZE:
        raise ValueError(f"min_resolution must be >= {NHOOD_SIZE} (the descriptor size), got {min_resolution}")
    levels = resolutions(size, min_resolution)
    if not levels:
        raise ValueError(f"images are {size} px; expected at least min_resolution={min_resolution} px")
    if size % 2 ** (len(levels) - 1):
        raise ValueError(
            f"image size {size} must halve evenly down to {levels[-1]} px ({len(levels)} pyramid levels); "
            f"expected a multiple of {2 ** (len(levels) - 1)}"
        )

    pos_seeds = np.random.SeedSequence([seed, 0]).spawn(len(levels))  # one position stream per level
    proj_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    pyr_real = laplacian_pyramid(real, len(levels))
    pyr_fake = laplacian_pyramid(fake, len(levels))
    dist = {}
    for res, pos_seed, lvl_real, lvl_fake in zip(levels, pos_seeds, pyr_real, pyr_fake):
        # The same positions for both sets (a set against itself gives exactly 0).
        d_real, d_fake = (
            _finalize_descriptors(_descriptors(lvl, descriptors_per_image, np.random.default_rng(pos_seed)))
            for lvl in (lvl_real, lvl_fake)
        )
        dist[res] = 1e3 * sliced_wasserstein(d_real, d_fake, dir_repeats, dirs_per_repeat, proj_rng)
    return {"swd": float(np.mean(list(dist.values()))), "levels": dist}


def colour_distance(real: np.ndarray, fake: np.ndarray) -> dict:
    """What SWD's per-set standardisation hides: how far the two sets' colours are apart.

    Returns {"colour_w1": mean over R, G, B of the 1-D Wasserstein-1 distance between the two sets'
    pixel values, in levels of 0-255; "mean_shift": [R, G, B] mean of fake minus mean of real}.
    For integer values W1 is the sum over levels of |CDF_real - CDF_fake|.
    """
    _check_images("real", real)
    _check_images("fake", fake)
    w1, shift = [], []
    for c in range(3):
        a, b = real[..., c].ravel(), fake[..., c].ravel()
        cdf_a = np.cumsum(np.bincount(a, minlength=256)) / a.size
        cdf_b = np.cumsum(np.bincount(b, minlength=256)) / b.size
        w1.append(float(np.abs(cdf_a - cdf_b).sum()))
        shift.append(float(b.mean(dtype=np.float64) - a.mean(dtype=np.float64)))
    return {"colour_w1": float(np.mean(w1)), "mean_shift": shift}


# ----------------------------------------------------------------------------- two image sets


def compare(real_spec: str, fake_spec: str, *, image_size: int | None = None, num: int | None = None, seed: int = 0,
            real_seed: int = 0, fake_seed: int = 1, float_range: str = "0,1") -> dict:
    """SWD and colour distance between two image sets named as ddpm_jax.data.load reads them (an image folder, a
    .npy or .npz file, "embedded"): the record ddpm-evaluate prints, {"swd", "levels" (per resolution, as
    strings), "colour_w1", "mean_shift", "num_real", "num_fake", "image_size"}.

    image_size: folders (and the embedded tiles) are made this size, files must have it. None: the size of a set
    that keeps its own (a file, data.Source.sets_size), else that of the one first in data.SOURCES (the embedded
    tiles' 32 px before a folder's common size); the other set follows. num: images per set (the first num; for
    "embedded", how many to make, default 2048). seed: the descriptors' positions and projections. real_seed,
    fake_seed: the embedded tiles' seed of each set (different, so that embedded against embedded measures two
    independent samples). float_range: of float images in a .npz file ("0,1" or "-1,1").
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    specs = {"real": (real_spec, real_seed), "fake": (fake_spec, fake_seed)}
    kinds = {name: data.source(spec) for name, (spec, _) in specs.items()}
    size, sets = image_size, {}
    for name in sorted(specs, key=lambda n: (not kinds[n].sets_size, data.SOURCES.index(kinds[n]))):
        spec, embedded_seed = specs[name]
        # A file is never resized: given the size it must match, else it keeps its own and the shapes are compared.
        sets[name] = data.load(spec, image_size if kinds[name].sets_size else size, num=num,
                               embedded_seed=embedded_seed, float_range=float_range)
        size = size or sets[name].shape[1]
    real, fake = sets["real"], sets["fake"]
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"--real {real_spec} has images of shape {real.shape[1:]} but --fake {fake_spec} has "
            f"{fake.shape[1:]}; expected the same (use --image-size to resize folders)"
        )
    result = swd(real, fake, seed=seed)
    return {
        "swd": result["swd"],
        "levels": {str(res): v for res, v in result["levels"].items()},
        **colour_distance(real, fake),
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
        "image_size": int(real.shape[1]),
    }


if __name__ == "__main__":  # python -m ddpm_jax.evaluate
    from ddpm_jax.cli import evaluate_main

    sys.exit(evaluate_main())
