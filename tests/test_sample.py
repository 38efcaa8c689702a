"""The sampling CLI: any checkpoint kind, deterministic by seed, grid and single images, clear errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_torch
from ddpm_jax import diffusion, load_model
from ddpm_jax.cli import sample_main as main
from ddpm_jax.sample import sample_checkpoint
from ddpm_jax.schedules import make_schedule

COMMON = ["--num", "4", "--sampler", "ddim", "--steps", "3", "--timesteps", "100", "--image-size", "16"]


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "unet.pt"
    torch.save(ddpm_torch.TwoResUNet(8, dim_mults=(1, 2)).state_dict(), path)
    return path


def test_same_seed_same_images_and_out_dir(tmp_path, torch_checkpoint):
    args = ["--checkpoint", str(torch_checkpoint), *COMMON]
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "a.png"), "--out-dir", str(tmp_path / "single")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert main([*args, "--seed", "2", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (32, 32, 3)  # 2 x 2 grid of 16 px images
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    singles = sorted((tmp_path / "single").iterdir())
    assert [p.name for p in singles] == [f"{i:06d}.png" for i in range(4)]
    assert np.array_equal(np.asarray(Image.open(singles[0])), a[:16, :16])


def test_dpm_solver_from_the_command_line(tmp_path, torch_checkpoint):
    """The stochastic DPM-Solver++ through the CLI: a grid of 4 images."""
    args = ["--checkpoint", str(torch_checkpoint), *COMMON[:2], "--sampler", "sde-dpmsolver++", *COMMON[4:]]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert a.shape == (32, 32, 3) and a.std() > 0
    assert main([*args, "--steps", "101", "--out", str(tmp_path / "c.png")]) == 2  # more steps than T = 100


def test_progress_runs_the_sampler_in_chunks_with_bit_identical_images(torch_checkpoint, capsys):
    """SDE-DPM-Solver++ (a history and fresh noise in its carry): 40 steps in 20 chunks of 2."""
    model, _ = load_model(torch_checkpoint)
    schedule, key = make_schedule("linear", 100), jax.random.key(3)
    settings = diffusion.sampler_settings("sde-dpmsolver++", timesteps=100, steps=40)
    whole = diffusion.sample(model, schedule, key, 2, 16, settings)
    chunked = diffusion.sample(model, schedule, key, 2, 16, settings, progress=True)
    assert np.array_equal(np.asarray(whole), np.asarray(chunked))
    assert "sde-dpmsolver++, 40 steps: 100%" in capsys.readouterr().err


def test_heun_with_churn_gives_the_same_images_whole_and_chunked(torch_checkpoint):
    """EDM's Heun (two network calls per step, one on the last) with churn: 5 steps, in chunks of 1, and whole: a
    scan short enough for the compiler to unroll, which it must not fold into other arithmetic."""
    model, _ = load_model(torch_checkpoint)
    schedule, key = make_schedule("linear", 100), jax.random.key(4)
    settings = diffusion.sampler_settings("heun", timesteps=100, steps=5, prediction="edm", s_churn=10.0)
    whole = diffusion.sample(model, schedule, key, 2, 16, settings)
    chunked = diffusion.sample(model, schedule, key, 2, 16, settings, progress=True)
    assert np.array_equal(np.asarray(whole), np.asarray(chunked)) and np.isfinite(np.asarray(whole)).all()
    assert [diffusion.chunk_length(n) for n in (1000, 40, 7, 20, 3)] == [50, 2, 1, 1, 1]


def test_sampling_split_over_two_devices_gives_the_one_device_images_whole_and_chunked(torch_checkpoint, tmp_path):
    """`ddpm-sample` with the images split over two devices (a subprocess), as one program and in chunks (its
    progress bar on a terminal), against this process's one device."""
    kw = dict(num=4, sampler="sde-dpmsolver++", steps=20, timesteps=100, image_size=16, seed=3)
    code = (f"import jax, numpy as np; from ddpm_jax.sample import sample_checkpoint as s; kw = {kw!r}; "
            f"np.save({str(tmp_path / 'whole.npy')!r}, s({str(torch_checkpoint)!r}, **kw)); "
            f"np.save({str(tmp_path / 'chunked.npy')!r}, s({str(torch_checkpoint)!r}, progress=True, **kw)); "
            f"print(jax.device_count())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"})
    assert result.returncode == 0 and result.stdout.split() == ["2"], result.stderr[-3000:]
    whole, chunked = np.load(tmp_path / "whole.npy"), np.load(tmp_path / "chunked.npy")
    assert np.array_equal(whole, chunked)
    one_device = sample_checkpoint(torch_checkpoint, **kw)
    assert jax.device_count() == 1 and whole.shape == one_device.shape == (4, 16, 16, 3)
    assert np.abs(whole - one_device).max() <= 1e-5  # float32 rounding: 6.6e-7 measured


def test_a_spacing_whose_times_repeat_is_a_clear_error():
    assert list(diffusion.dpm_solver_timesteps(100, 99, "leading"))[-2:] == [2, 1]
    diffusion.sampler_settings("dpmsolver++", timesteps=100, steps=99, spacing="leading")
    with pytest.raises(ValueError, match=r"--steps 100 with --spacing leading: expected fewer steps or another "
                                         r"spacing \(the times repeat at T = 100\)"):
        diffusion.sampler_settings("dpmsolver++", timesteps=100, steps=100, spacing="leading")


def test_ddpm_sampler_from_model_directory(tmp_path, torch_checkpoint):
    from ddpm_jax.cli import convert_main as convert

    assert convert(["to-flax", str(torch_checkpoint), str(tmp_path / "flax"), "--no-verify"]) == 0
    out = tmp_path / "ddpm.png"
    assert main(["--checkpoint", str(tmp_path / "flax"), "--num", "2", "--sampler", "ddpm", "--timesteps", "30",
                 "--image-size", "16", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (16, 32, 3)


def test_bad_checkpoint_exits_2_without_traceback(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "ddpm_jax.sample", "--checkpoint", str(tmp_path / "junk.pt"),
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "junk.pt" in result.stderr and "Traceback" not in result.stderr
    assert main(["--checkpoint", str(tmp_path / "junk.pt"), "--num", "0"]) == 2


def test_sampler_settings_default_to_the_runs(tmp_path, torch_checkpoint):
    """With a run's config.json beside the weights, its sampler, steps, eta, schedule, T and size are the defaults."""
    import dataclasses

    from ddpm_jax.config import TrainConfig
    from ddpm_jax.cli import convert_main as convert

    model_dir = tmp_path / "flax"
    assert convert(["to-flax", str(torch_checkpoint), str(model_dir), "--no-verify"]) == 0
    run = dataclasses.replace(TrainConfig(), dim=8, dim_mults=(1, 2), image_size=16, timesteps=100,
                              schedule="cosine", sampler="ddim", sampling_steps=3, eta=1.0)
    (model_dir / "config.json").write_text(run.to_json())
    explicit = ["--num", "4", "--sampler", "ddim", "--steps", "3", "--timesteps", "100", "--image-size", "16",
                "--schedule", "cosine"]
    assert main(["--checkpoint", str(model_dir), "--num", "4", "--out", str(tmp_path / "run4.png")]) == 0
    assert main(["--checkpoint", str(model_dir), *explicit, "--eta", "1", "--out", str(tmp_path / "eta1.png")]) == 0
    assert main(["--checkpoint", str(model_dir), *explicit, "--eta", "0", "--out", str(tmp_path / "eta0.png")]) == 0
    run4, eta1, eta0 = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("run4", "eta1", "eta0"))
    assert run4.shape == (32, 32, 3)  # 4 images of the run's 16 px
    assert np.array_equal(run4, eta1) and not np.array_equal(run4, eta0)


@pytest.mark.parametrize("flags, message", [
    (["--eta", "1.5"], "--eta 1.5"),
    (["--steps", "101"], "--steps 101"),
    (["--image-size", "15"], "--image-size 15: expected a multiple of 2"),  # the model has 2 levels
    (["--timesteps", "10", "--steps", "2"], "--schedule linear with --timesteps 10"),
    (["--out-dir", __file__], f"--out-dir {__file__}: expected a folder"),
    (["--sampler", "heun"], "--sampler heun: samples EDM models, and this model was trained as eps (the DDPM "
                            "family); expected one of ['ddpm', 'ddim', 'dpmsolver++', 'sde-dpmsolver++']"),
    (["--prediction", "edm"], "--sampler ddim: samples DDPM models, and this model was trained as edm (the EDM "
                              "family); expected one of ['euler', 'heun']"),
    (["--sampler", "euler-a"], "--sampler euler-a: expected one of ['ddpm', 'ddim', 'dpmsolver++', 'sde-dpmsolver++', "
                               "'euler', 'heun']"),
    (["--spacing", "log"], "--spacing log: expected one of ['linspace', 'leading', 'trailing']"),
    (["--prediction", "noise"], "--prediction noise: expected one of ['eps', 'x0', 'v', 'edm']"),
    (["--prediction", "edm", "--sampler", "heun", "--s-churn", "-1"], "--s-churn -1.0: expected a non-negative number"),
    (["--prediction", "edm", "--sampler", "euler", "--s-noise", "-0.5"],
     "--s-noise -0.5: expected a non-negative number"),
    (["--prediction", "edm", "--sampler", "heun", "--sigma-min", "80"],
     "--sigma-min 80.0: expected less than --sigma-max (80)"),
    (["--prediction", "edm", "--sampler", "heun", "--sigma-max", "0.001"],
     "--sigma-min 0.002: expected less than --sigma-max (0.001)"),
])
def test_bad_sampler_settings_exit_2(tmp_path, torch_checkpoint, capsys, flags, message):
    assert main(["--checkpoint", str(torch_checkpoint), *COMMON, *flags, "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_an_output_that_cannot_be_written_is_found_before_sampling(tmp_path, torch_checkpoint, capsys):
    for out in (tmp_path / "no_extension", tmp_path):
        assert main(["--checkpoint", str(torch_checkpoint), *COMMON, "--out", str(out)]) == 2
        assert f"--out {out}: expected an image file name" in capsys.readouterr().err


def test_the_prediction_target_travels_with_the_model(tmp_path, torch_checkpoint, capsys):
    """A torch file records no target: it is sampled as eps with a one-line note, or as --prediction says.
    to-flax --prediction records it in model.json; ddpm-sample then uses it and refuses another; to-torch prints it."""
    import json

    from ddpm_jax.cli import convert_main as convert

    def sampled(checkpoint, name, *flags):
        assert main(["--checkpoint", str(checkpoint), *COMMON, *flags, "--out", str(tmp_path / name)]) == 0
        return np.asarray(Image.open(tmp_path / name)), capsys.readouterr().err

    as_eps, note = sampled(torch_checkpoint, "eps.png")
    assert f"{torch_checkpoint} records no prediction target: sampling it as eps, the article's" in note
    as_v, note = sampled(torch_checkpoint, "v.png", "--prediction", "v")
    assert "records no prediction target" not in note and not np.array_equal(as_eps, as_v)

    model_dir = tmp_path / "flax_v"
    assert convert(["to-flax", str(torch_checkpoint), str(model_dir), "--prediction", "v", "--no-verify"]) == 0
    assert "prediction=v)" in capsys.readouterr().out
    assert json.loads((model_dir / "model.json").read_text())["prediction"] == "v"
    from_dir, note = sampled(model_dir, "dir.png")
    assert np.array_equal(from_dir, as_v) and "records no prediction target" not in note
    assert main(["--checkpoint", str(model_dir), *COMMON, "--prediction", "eps", "--out", str(tmp_path / "x.png")]) == 2
    assert f"--prediction eps: {model_dir} records a model trained to predict v; leave --prediction out" in (
        capsys.readouterr().err)

    assert convert(["to-torch", str(model_dir), str(tmp_path / "unet.safetensors"), "--no-verify"]) == 0
    assert ("prediction=v; the file records no target: sample it with ddpm-sample --prediction v; the reference "
            "DiffusionModel samples eps models only)") in capsys.readouterr().out


def test_an_edm_model_records_its_constants_and_its_torch_file_says_the_reference_cannot_sample_it(
        tmp_path, torch_checkpoint, capsys):
    import json

    from ddpm_jax.cli import convert_main as convert

    model_dir = tmp_path / "flax_edm"
    assert convert(["to-flax", str(torch_checkpoint), str(model_dir), "--prediction", "edm", "--no-verify"]) == 0
    assert json.loads((model_dir / "model.json").read_text())["edm"] == {
        "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "c_noise_scale": 1.0}
    capsys.readouterr()
    args = ["--num", "4", "--steps", "3", "--image-size", "16"]
    assert main(["--checkpoint", str(model_dir), *args, "--out", str(tmp_path / "dir.png")]) == 0  # heun: the default
    assert main(["--checkpoint", str(torch_checkpoint), *args, "--prediction", "edm", "--sampler", "heun",
                 "--out", str(tmp_path / "pt.png")]) == 0
    from_dir, from_pt = (np.asarray(Image.open(tmp_path / n)) for n in ("dir.png", "pt.png"))
    assert np.array_equal(from_dir, from_pt) and from_dir.std() > 0
    capsys.readouterr()
    assert convert(["to-torch", str(model_dir), str(tmp_path / "unet.pt"), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and ("prediction=edm; an EDM model (sigma_data=0.5, p_mean=-1.2, p_std=1.2, "
                                           "c_noise_scale=1): the reference DiffusionModel does not sample it") in out
