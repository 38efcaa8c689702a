"""Tests for ddpm_jax.evaluate: the ProGAN sliced Wasserstein distance and its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from ddpm_jax import cli
from ddpm_jax import evaluate as ev
from ddpm_jax.data import load

REPO = Path(__file__).resolve().parents[1]

# ProGAN's pyramid, written the way their metrics/sliced_wasserstein.py does it (NCHW, scipy).
_G = np.float32(np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])) / 256.0


def _ref_down(m_NCHW):
    return scipy.ndimage.convolve(m_NCHW, _G[None, None], mode="mirror")[:, :, ::2, ::2]


def _ref_up(m_NCHW):
    n, c, h, w = m_NCHW.shape
    res = np.zeros((n, c, 2 * h, 2 * w), m_NCHW.dtype)
    res[:, :, ::2, ::2] = m_NCHW
    return scipy.ndimage.convolve(res, _G[None, None] * 4.0, mode="mirror")


def _ref_pyramid(m_NCHW, num_levels):
    pyramid = [np.float32(m_NCHW)]
    for _ in range(1, num_levels):
        pyramid.append(_ref_down(pyramid[-1]))
        pyramid[-2] -= _ref_up(pyramid[-1])
    return pyramid


def make_images(n, size=32, seed=0):
    """Structured random images: coloured discs over a striped background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((n, size, size, 3))
    img += 0.2 + 0.1 * np.sin(2 * np.pi * xx * rng.integers(1, 4, (n, 1, 1)))[..., None]
    for _ in range(4):
        cx, cy = rng.uniform(0, 1, (2, n, 1, 1))
        r = rng.uniform(0.05, 0.3, (n, 1, 1))
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]
        img = np.where(inside, rng.uniform(0, 0.8, (n, 1, 1, 3)), img)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def real():
    return make_images(64, seed=0)


@pytest.fixture(scope="module")
def fake():
    return make_images(64, seed=1)


def _blur(images, sigma):
    out = scipy.ndimage.gaussian_filter(images.astype(np.float64), (0, sigma, sigma, 0))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _noise(images, sigma):
    out = images + np.random.default_rng(7).normal(0, sigma, images.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- pyramid


@pytest.mark.parametrize("size,levels", [(32, 2), (64, 4)])
def test_pyramid_matches_progan_scipy_reference(size, levels):
    x = make_images(4, size=size, seed=3)
    ours = ev.laplacian_pyramid(x, levels)
    ref = _ref_pyramid(x.transpose(0, 3, 1, 2), levels)
    assert [p.shape[1] for p in ours] == [size >> i for i in range(levels)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b.transpose(0, 2, 3, 1), atol=1e-3)


def test_pyramid_reconstructs_image():
    x = make_images(4, size=64, seed=4)
    pyramid = ev.laplacian_pyramid(x, 4)
    # Inverse of the construction: upsample the residual with our pyr_up and add the levels back.
    images = pyramid[-1]
    for level in pyramid[-2::-1]:
        images = ev.pyr_up(images) + level
    np.testing.assert_allclose(images, x, atol=1e-3)
    # Independently: sum of every level brought up to full size with the reference upsampler.
    total = np.zeros(x.shape, np.float32)
    for level in pyramid:
        up = level.transpose(0, 3, 1, 2)
        while up.shape[-1] < x.shape[1]:
            up = _ref_up(up)
        total += up.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(total, x, atol=1e-3)
    # The band-pass levels carry no DC away from the borders; the residual carries the mean.
    assert abs(pyramid[0][:, 8:-8, 8:-8].mean()) < 0.2 * abs(pyramid[-1].mean())


# ----------------------------------------------------------------------------- descriptors


def test_descriptors_match_progan_flat_indexing():
    level = ev.laplacian_pyramid(make_images(3, seed=5), 2)[1]  # (3, 16, 16, 3)
    desc = ev._descriptors(level, 5, np.random.default_rng(11))
    # ProGAN's get_descriptors_for_minibatch with the same positions, on NCHW data.
    rng = np.random.default_rng(11)
    m = level.transpose(0, 3, 1, 2).copy()
    S, N, H = m.shape, 15, 3
    nhood, chan, x, y = np.ogrid[0:N, 0:3, -H : H + 1, -H : H + 1]
    img = nhood // 5
    x = x + rng.integers(H, S[3] - H, size=N).reshape(N, 1, 1, 1)
    y = y + rng.integers(H, S[2] - H, size=N).reshape(N, 1, 1, 1)
    ref = m.flat[((img * S[1] + chan) * S[2] + y) * S[3] + x]
    np.testing.assert_array_equal(desc, ref)


def test_finalized_descriptors_are_standardised_per_channel():
    level = ev.laplacian_pyramid(make_images(8, seed=6), 1)[0]
    desc = ev._finalize_descriptors(ev._descriptors(level, 16, np.random.default_rng(0)))
    per_channel = desc.reshape(-1, 3, 49).transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(per_channel.std(axis=1), 1, atol=1e-4)


def test_unequal_counts_use_exact_wasserstein1():
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.normal(size=(3, 37)), axis=1), np.sort(rng.normal(0.5, 2, size=(3, 53)), axis=1)
    ours = ev._wasserstein1_sorted(a, b)
    ref = [scipy.stats.wasserstein_distance(a[d], b[d]) for d in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    np.testing.assert_allclose(ev._wasserstein1_sorted(a, a[::1]), 0)


# ----------------------------------------------------------------------------- swd


def test_identical_sets_give_zero(real):
    out = ev.swd(real, real.copy(), seed=3)
    assert out["swd"] < 1e-6
    assert all(v < 1e-6 for v in out["levels"].values())


def test_level_keys_follow_resolution():
    assert list(ev.swd(make_images(8, 32), make_images(8, 32, 1))["levels"]) == [32, 16]
    out = ev.swd(make_images(8, 64), make_images(8, 64, 1), descriptors_per_image=16)
    assert list(out["levels"]) == [64, 32, 16]
    assert out["swd"] == pytest.approx(np.mean(list(out["levels"].values())))


def test_deterministic_given_seed(real, fake):
    real, fake = real[:32], fake[:32]
    a, b, c = ev.swd(real, fake, seed=1), ev.swd(real, fake, seed=1), ev.swd(real, fake, seed=2)
    assert a == b
    assert a["swd"] != c["swd"]
    assert abs(a["swd"] - c["swd"]) < 0.3 * a["swd"]  # a different seed is noise, not a different answer


def test_same_distribution_small_and_degradations_grow(real, fake):
    base_levels = ev.swd(real, fake)["levels"]
    base = float(np.mean(list(base_levels.values())))
    assert 0 < base
    blurred = [ev.swd(real, _blur(fake, s))["swd"] for s in (1.0, 2.0, 3.0)]
    assert base < blurred[0] < blurred[1] < blurred[2]
    assert blurred[-1] > 2.5 * base
    noisy = [ev.swd(real, _noise(fake, s))["swd"] for s in (10, 20, 40)]
    assert base < noisy[0] < noisy[1] < noisy[2]
    assert noisy[-1] > 2.5 * base
    # Noise lives at the finest level: 32 px moves, the 16 px low-pass level barely does.
    lv40 = ev.swd(real, _noise(fake, 40))["levels"]
    assert lv40[32] > 4 * base_levels[32] and lv40[16] < 1.5 * base_levels[16]


def test_uniform_brightness_shift_is_invisible(real):
    # ProGAN normalises each set's descriptors on its own, so a global offset (without clipping)
    # cancels: SWD measures structure, not mean colour.
    shifted = (real.astype(np.int16) + (255 - int(real.max()))).astype(np.uint8)
    assert int(real.max()) < 255 and not np.array_equal(shifted, real)
    assert ev.swd(real, shifted)["swd"] < 1e-2


def test_colour_distance_sees_the_shift_swd_cannot(real):
    offset = 255 - int(real.max())
    shifted = (real.astype(np.int16) + offset).astype(np.uint8)
    out = ev.colour_distance(real, shifted)
    assert out["colour_w1"] == pytest.approx(offset)
    assert out["mean_shift"] == pytest.approx([offset] * 3)
    assert ev.colour_distance(real, real.copy()) == {"colour_w1": 0.0, "mean_shift": [0.0, 0.0, 0.0]}


def test_colour_distance_matches_scipy(real, fake):
    out = ev.colour_distance(real[:40], fake[:25])  # unequal counts
    w1 = [scipy.stats.wasserstein_distance(real[:40, ..., c].ravel(), fake[:25, ..., c].ravel()) for c in range(3)]
    assert out["colour_w1"] == pytest.approx(np.mean(w1), rel=1e-9)
    means = [fake[:25, ..., c].mean(dtype=np.float64) - real[:40, ..., c].mean(dtype=np.float64) for c in range(3)]
    assert out["mean_shift"] == pytest.approx(means, rel=1e-9)


def test_different_counts(real, fake):
    out = ev.swd(real[:40], fake[:25])
    assert np.isfinite(out["swd"]) and out["swd"] > 0
    assert ev.swd(real[:40], real[:25])["swd"] < ev.swd(real[:40], _blur(real[:25], 2.0))["swd"]


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 32, 32, 3), np.float32), "uint8"),
        (np.zeros((4, 3, 32, 32), np.uint8), r"\(N, S, S, 3\)"),
        (np.zeros((4, 32, 16, 3), np.uint8), "square"),
        (np.zeros((4, 8, 8, 3), np.uint8), "same image shape"),
    ],
)
def test_bad_shapes_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ev.swd(np.zeros((4, 32, 32, 3), np.uint8), bad)


def test_too_small_images_raise():
    x = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="min_resolution=16"):
        ev.swd(x, x)


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_jax.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_prints_one_json_line(tmp_path, real, fake):
    np.savez(tmp_path / "real.npz", images=real[:48])
    np.savez(tmp_path / "fake.npz", fake[:40].astype(np.float32) / 255)  # first array, float [0, 1]
    proc = _cli("--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "fake.npz"), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"swd", "levels", "colour_w1", "mean_shift", "num_real", "num_fake", "image_size"}
    assert list(record["levels"]) == ["32", "16"]
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (48, 40, 32)
    expected = ev.swd(real[:48], fake[:40], seed=1)
    assert record["swd"] == pytest.approx(expected["swd"])
    assert record["colour_w1"] == pytest.approx(ev.colour_distance(real[:48], fake[:40])["colour_w1"])


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path):
    missing = tmp_path / "missing.npz"
    proc = _cli("--real", str(missing), "--fake", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "expected" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_mismatched_sizes_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "b.npz", images=np.zeros((4, 64, 64, 3), np.uint8))
    assert cli.evaluate_main(["--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert "b.npz" in err and "(64, 64, 3)" in err
    assert cli.evaluate_main(["--real", str(tmp_path / "a.npz"), "--fake", "embedded", "--image-size", "16"]) == 2
    assert "a.npz" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a.npz"):  # --debug re-raises
        cli.evaluate_main(["--real", str(tmp_path / "a.npz"), "--fake", "embedded", "--image-size", "16", "--debug"])


def test_cli_embedded_seeds(capsys):
    assert cli.evaluate_main(["--real", "embedded", "--fake", "embedded", "--num", "64", "--real-seed", "5", "--fake-seed", "5"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (64, 64, 32)
    assert record["swd"] < 1e-6  # same seed: the same images
    held_out = load("embedded", 32, num=64, embedded_seed=6)
    train = load("embedded", 32, num=64, embedded_seed=5)
    assert held_out.shape == (64, 32, 32, 3) and not np.array_equal(held_out, train)
    assert ev.swd(train, held_out)["swd"] < ev.swd(train, _blur(held_out, 2.0))["swd"]


def test_cli_folder_follows_npz_size(tmp_path, capsys, real):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(make_images(6, size=48, seed=9)):
        Image.fromarray(img).save(folder / f"{i}.png")
    np.savez(tmp_path / "real.npz", images=real[:16])
    assert cli.evaluate_main(["--real", str(tmp_path / "real.npz"), "--fake", str(folder)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (16, 6, 32)
    # Two folders: the size their images share (48 px here); images of several sizes need --image-size.
    assert cli.evaluate_main(["--real", str(folder), "--fake", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 48
    Image.fromarray(make_images(1, size=40, seed=9)[0]).save(folder / "other.png")
    assert cli.evaluate_main(["--real", str(folder), "--fake", str(folder)]) == 2
    assert "not all one square size (40x40, 48x48); pass --image-size" in capsys.readouterr().err


def test_cli_folder_with_embedded_defaults_to_32(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(make_images(6, size=48, seed=9)):
        Image.fromarray(img).save(folder / f"{i}.png")
    assert cli.evaluate_main(["--real", "embedded", "--fake", str(folder), "--num", "16"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (16, 6, 32)
    assert cli.evaluate_main(["--real", str(folder), "--fake", "embedded", "--num", "4", "--fake-seed", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (4, 4, 32)
    expected = ev.swd(load(str(folder), 32, num=4), load("embedded", 32, num=4, embedded_seed=3))
    assert record["swd"] == pytest.approx(expected["swd"])
    proc = _cli("--real", "embedded", "--fake", str(folder), "--num", "8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image_size"] == 32


def test_compare_from_python_sizes_both_sets_by_the_one_that_keeps_its_own(tmp_path, real, fake):
    """evaluate.compare is ddpm-evaluate's record: a file sets the size, whichever side it is on; a folder and the
    embedded tiles follow it."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(make_images(6, size=48, seed=9)):
        Image.fromarray(img).save(folder / f"{i}.png")
    np.savez(tmp_path / "fake.npz", images=fake[:16, :16, :16])
    record = ev.compare(str(folder), str(tmp_path / "fake.npz"), seed=2)
    assert (record["num_real"], record["num_fake"], record["image_size"]) == (6, 16, 16)
    resized, file = load(str(folder), 16), fake[:16, :16, :16]
    expected = ev.swd(resized, file, seed=2)
    assert record["swd"] == pytest.approx(expected["swd"])
    assert record["levels"] == {str(res): pytest.approx(v) for res, v in expected["levels"].items()}
    assert record["colour_w1"] == pytest.approx(ev.colour_distance(resized, file)["colour_w1"])
    tiles = ev.compare("embedded", str(tmp_path / "fake.npz"), num=8, real_seed=4)
    assert (tiles["num_real"], tiles["image_size"]) == (8, 16)
    assert tiles["swd"] == pytest.approx(ev.swd(load("embedded", 16, num=8, embedded_seed=4), file[:8])["swd"])
    with pytest.raises(ValueError, match=r"--image-size must be >= 1, got 0"):
        ev.compare("embedded", "embedded", image_size=0)
