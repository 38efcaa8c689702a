"""The trainer: exact resume, device/process equivalence, EMA schedule, signals, errors, the CLI."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from ddpm_jax import cli, train_state, training, workdirs
from ddpm_jax.checkpoints import load_model
from ddpm_jax.config import TrainConfig
from ddpm_jax.convert import to_torch_state
from ddpm_jax.errors import TrainingError
from ddpm_jax.validation import validate
from conftest import TINY, TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]
def _weights(path, ema=False):
    return to_torch_state(load_model(path, ema=ema)[0])


def _max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _run(args, env=None, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def _assert_same_state(a, b):
    """Bit-identical states; else say how far apart they are (on a GPU, non-deterministic kernels show here)."""
    assert int(a.step) == int(b.step)
    leaves = jax.tree_util.tree_leaves_with_path(a)
    diffs = {jax.tree_util.keystr(path): float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                                      initial=0.0))
             for (path, x), y in zip(leaves, jax.tree.leaves(b), strict=True)}
    differing = {k: d for k, d in diffs.items() if d > 0}
    worst = max(differing, key=differing.get, default=None)
    assert not differing, (f"{len(differing)} of {len(diffs)} arrays differ; the largest absolute difference is "
                           f"{differing[worst]:.3e}, in {worst}")


def test_resume_is_bit_exact(tiny_run, tmp_path):
    """Killed after the step-4 checkpoint and restarted, the run ends with the same params, EMA and optimizer
    state as in one go (the cosine learning-rate decay of the default preset included)."""
    assert TINY.lr_decay == "cosine"
    whole_dir, whole = tiny_run
    shutil.copytree(whole_dir, tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "8")  # as if killed between the two checkpoints
    resumed = training.train(TINY, tmp_path / "split", progress=False)
    _assert_same_state(whole, resumed)
    assert int(whole.step) == 8
    assert _max_diff(_weights(whole_dir / "checkpoints" / "4"), _weights(whole_dir)) > 1e-5
    metrics = [json.loads(line) for line in (whole_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert all(set(m) >= {"loss", "grad_norm", "lr", "steps_per_s", "images_per_s"} for m in metrics)
    assert (whole_dir / "samples" / "step_000008.png").is_file()
    assert not (whole_dir / ".lock").exists()  # released at the end


def test_a_finished_run_extended_with_more_steps_matches_one_run(tmp_path, monkeypatch):
    """With a constant learning rate, 4 steps and then --steps 8 on the same workdir equals 8 in one go. Each
    grid is drawn once: at every --sample-every step, and at the end only if that was not one."""
    drawn = []
    monkeypatch.setattr(training.diffusion, "sample", lambda *a, sample=training.diffusion.sample, **k:
                        drawn.append(1) or sample(*a, **k))
    config = dataclasses.replace(TINY, lr_decay="constant", sample_every=4)
    whole = training.train(config, tmp_path / "whole", progress=False)
    assert len(drawn) == 2 and sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == [
        "step_000004.png", "step_000008.png"]
    training.train(dataclasses.replace(config, steps=4), tmp_path / "split", progress=False)
    _assert_same_state(whole, training.train(config, tmp_path / "split", progress=False))
    assert len(drawn) == 4


def test_loss_decreases_on_embedded_data(tmp_path):
    # eps, unweighted: the article's objective (v's loss starts lower and falls less in 60 steps: 0.47 to 0.38).
    config = dataclasses.replace(TINY, steps=60, lr_decay="constant", log_every=10, save_every=60, prediction="eps",
                                 loss_weight="none")
    training.train(config, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses


def test_offset_noise_adds_one_gaussian_value_per_image_and_channel():
    """lucidrains' offset noise: the training noise plus S times one N(0, 1) value per image and channel."""
    from ddpm_jax.diffusion import training_noise

    key, shape = jax.random.key(4), (512, 4, 4, 3)
    plain = np.asarray(training_noise(key, shape, jnp.float32))
    offset = np.asarray(training_noise(key, shape, jnp.float32, 0.1)) - plain
    assert np.ptp(offset, axis=(1, 2)).max() < 1e-6  # one value per image and channel
    assert 0.09 < offset[:, 0, 0, :].std() < 0.11 and abs(offset[:, 0, 0, :].mean()) < 0.01
    doubled = np.asarray(training_noise(key, shape, jnp.float32, 0.2)) - plain
    np.testing.assert_allclose(doubled, 2 * offset, atol=1e-6)
    assert 0.95 < plain.std() < 1.05


def test_a_run_records_its_objective_and_its_grids_and_ddpm_sample_use_it(tmp_path, monkeypatch):
    """v prediction with min-SNR weighting and offset noise: config.json records them, and the trainer's grids and
    ddpm-sample read the output as v."""
    from ddpm_jax import diffusion
    from ddpm_jax.sample import sample_checkpoint

    drawn = []
    monkeypatch.setattr(training.diffusion, "sample", lambda *a, sample=training.diffusion.sample, **k:
                        drawn.append(a[5]) or sample(*a, **k))
    config = dataclasses.replace(TINY, prediction="v", loss_weight="min-snr", snr_gamma=2.0, offset_noise=0.1,
                                 save_every=8, sampler="ddim")
    training.train(config, tmp_path, progress=False)
    saved = workdirs.read_config(tmp_path)
    assert (saved.prediction, saved.loss_weight, saved.snr_gamma, saved.offset_noise) == ("v", "min-snr", 2.0, 0.1)
    assert [settings.prediction for settings in drawn] == ["v"]
    monkeypatch.undo()
    model, model_config = load_model(tmp_path)
    assert model_config.prediction == "v"
    images = sample_checkpoint(tmp_path, 4, steps=2, seed=5)
    schedule = validate(config, 1)
    for prediction, same in (("v", True), ("eps", False)):
        settings = diffusion.sampler_settings("ddim", timesteps=100, steps=2, eta=config.eta, prediction=prediction)
        expected = np.asarray(diffusion.sample(model, schedule, jax.random.key(5), 4, 16, settings))
        assert np.array_equal(images, expected) == same


def test_an_edm_run_records_its_constants_samples_with_heun_and_refuses_a_resume_that_changes_them(tmp_path,
                                                                                                   monkeypatch):
    from ddpm_jax import diffusion
    from ddpm_jax.sample import sample_checkpoint

    drawn = []
    monkeypatch.setattr(training.diffusion, "sample", lambda *a, sample=training.diffusion.sample, **k:
                        drawn.append(a[5]) or sample(*a, **k))
    config = dataclasses.replace(TINY, prediction="edm", loss_weight="none", c_noise_scale=250.0, steps=4,
                                 save_every=4)
    training.train(config, tmp_path, progress=False)
    assert [(s.sampler, s.prediction, s.edm.c_noise_scale) for s in drawn] == [("heun", "edm", 250.0)]
    monkeypatch.undo()
    model, model_config = load_model(tmp_path)
    assert model_config.edm == {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "c_noise_scale": 250.0}
    images = sample_checkpoint(tmp_path, 4, seed=5)  # the run's sampler (heun) and steps (2)
    settings = diffusion.sampler_settings("heun", timesteps=100, steps=2, prediction="edm",
                                          edm=diffusion.EDM(c_noise_scale=250.0))
    expected = np.asarray(diffusion.sample(model, validate(config, 1), jax.random.key(5), 4, 16, settings))
    assert np.array_equal(images, expected) and np.isfinite(images).all()
    for change, message in [({"c_noise_scale": 1.0}, "--c-noise-scale 250.0 -> 1.0"),
                            ({"sigma_data": 0.3}, "--sigma-data 0.5 -> 0.3"), ({"p_mean": -1.0}, "--p-mean -1.2 -> -1.0"),
                            ({"p_std": 1.0}, "--p-std 1.2 -> 1.0"), ({"prediction": "v"}, "--prediction edm -> v")]:
        with pytest.raises(TrainingError, match=f"different model or objective .*{message}"):
            training.train(dataclasses.replace(config, steps=8, **change), tmp_path, progress=False)


def test_ema_follows_ema_pytorch_schedule():
    """Copy on update steps up to ema_start and on the first one after it (ema_pytorch's `update` copies while its
    `initted` flag is unset, which its copy branch never sets), then min(beta, 1 - (1 + e)^(-2/3)) with
    e = s - ema_start; unchanged off update steps."""
    config = TrainConfig(ema_decay=0.995, ema_every=10, ema_start=100)
    decay = lambda s: float(train_state.ema_decay(config, jnp.int32(s)))  # noqa: E731
    assert decay(0) == 0.0 and decay(100) == 0.0 and decay(7) == 1.0 and decay(105) == 1.0
    assert decay(110) == 0.0 and decay(115) == 1.0
    assert decay(120) == pytest.approx(1 - 21 ** (-2 / 3))
    assert decay(100_000) == pytest.approx(0.995)


def test_changed_model_or_fewer_steps_on_resume_is_an_error(tiny_run, tmp_path):
    workdir = shutil.copytree(tiny_run[0], tmp_path / "run")  # TINY's checkpoint of step 8
    with pytest.raises(TrainingError, match="--dim 8 -> 16"):
        training.train(dataclasses.replace(TINY, dim=16), workdir, progress=False)
    saved = (workdir / "config.json").read_text()
    with pytest.raises(TrainingError, match="--steps 1: .* checkpoint of step 8. Pass --steps 8 or more"):
        training.train(dataclasses.replace(TINY, steps=1), workdir, progress=False)
    assert (workdir / "config.json").read_text() == saved  # the run's config is not rewritten
    # The noise schedule, the target, the loss weighting and the offset noise define what the model learns:
    # changing any of them on resume is an error too.
    for change, message in [({"timesteps": 200}, "--timesteps 100 -> 200"), ({"schedule": "cosine"}, "linear -> cosine"),
                            ({"prediction": "eps"}, "--prediction v -> eps"),
                            ({"loss_weight": "none"}, "--loss-weight min-snr -> none"),
                            ({"snr_gamma": 1.0}, "--snr-gamma 5.0 -> 1.0"),
                            ({"offset_noise": 0.1}, "--offset-noise 0.0 -> 0.1")]:
        with pytest.raises(TrainingError, match=f"different model or objective .*{message}"):
            training.train(dataclasses.replace(TINY, **change), workdir, progress=False)
    assert (workdir / "config.json").read_text() == saved
    # The loss, the batch size and the seed may change, with a warning.
    with pytest.warns(UserWarning, match="with --loss l2 -> l1; --seed 0 -> 1: from here on the run differs"):
        training.train(dataclasses.replace(TINY, seed=1, loss="l1"), workdir, progress=False)


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "up\n"  # running its own command line, which the error names
        (tmp_path / ".lock").write_text(f"{other.pid} {socket.gethostname()}")
        with pytest.raises(TrainingError, match=rf"in use by another run: process {other.pid} on .*sleep"):
            training.train(TINY, tmp_path, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing of the other run touched
    finally:
        other.kill()
        other.communicate()
    lock = workdirs.lock(tmp_path)  # its process has ended: the lock is stale
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"
    workdirs.unlock(lock)
    assert not lock.exists()


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    assert cli.train_main([*TINY_FLAGS, "--workdir", str(tmp_path / "run")]) == 2
    assert f"--workdir {tmp_path / 'run'}: is a file; expected a folder" in capsys.readouterr().err


def test_tensorboard_holds_the_metrics_and_every_grid(tiny_run):
    """Read back with tensorboard's own reader: every metrics.jsonl record as train/<name>, the grid as `samples`."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = tiny_run
    events = EventAccumulator(str(workdir / workdirs.TENSORBOARD), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (workdir / workdirs.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for name in ("loss", "grad_norm", "lr", "steps_per_s", "images_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name
    [grid] = events.Images("samples")
    png = np.asarray(Image.open(workdir / workdirs.SAMPLES / "step_000008.png"))
    assert grid.step == 8 and np.array_equal(np.asarray(Image.open(io.BytesIO(grid.encoded_image_string))), png)


def test_an_unwritable_tensorboard_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / workdirs.TENSORBOARD).write_text("in the way")
    assert cli.train_main([*TINY_FLAGS, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run' / workdirs.TENSORBOARD}: cannot write TensorBoard events there")
    assert err.count("\n") == 1 and (tmp_path / "run" / workdirs.TENSORBOARD).read_text() == "in the way"


def test_a_dataset_four_times_the_memory_bound_trains_from_the_map(tmp_path):
    """A 6 GiB .npy (sparse on disk) trains TINY in a process whose peak RSS stays under 1.5 GiB: batches are
    gathered from the memory map, and nothing copies the array."""
    big, bound = tmp_path / "big.npy", 1.5 * 2**30
    shape = (6 * 2**30 // (16 * 16 * 3), 16, 16, 3)
    np.lib.format.open_memmap(big, mode="w+", dtype=np.uint8, shape=shape).flush()  # no block written: all zeros
    # The peak of this process's own memory (VmHWM; ru_maxrss would count the forked pytest process before exec).
    code = ("import sys; from ddpm_jax.cli import train_main; code = train_main(sys.argv[1:]); "
            "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
            "print('peak RSS', int(hwm.split()[1]) * 1024); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *TINY_FLAGS, "--steps", "8", "--data", str(big),
                             "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = int(re.search(r"^peak RSS (\d+)$", result.stdout, re.M).group(1))
    print(f"dataset {big.stat().st_size / 2**30:.1f} GiB, peak RSS {peak / 2**30:.2f} GiB")
    assert big.stat().st_size > 4 * bound and peak < bound
    assert json.loads((tmp_path / "run" / "config.json").read_text())["channels"] == 3


def test_a_grayscale_folder_trains_one_channel_through_to_the_converter(tmp_path, capsys):
    """Said in one line; config.json, the grid (a grayscale PNG), the checkpoint and the converter carry the one
    channel; resuming with --channels 3 is refused, naming the flag."""
    gray, run = tmp_path / "gray", tmp_path / "run"
    gray.mkdir()
    for k in range(6):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16), np.uint8), "L").save(gray / f"{k}.png")
    flags = [*TINY_FLAGS, "--steps", "8", "--data", str(gray), "--workdir", str(run)]
    assert cli.train_main(flags) == 0
    assert f"every image in {gray} is grayscale: training with --channels 1" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["channels"] == 1
    assert Image.open(run / "samples" / "step_000008.png").mode == "L"
    model, config = load_model(run)
    assert model.channels == config.channels == 1
    assert cli.train_main([*flags, "--steps", "9", "--channels", "3"]) == 1
    assert "different model or objective (--channels 1 -> 3)" in capsys.readouterr().err
    # Without the flag a resumed run keeps its channel count, though the folder is no longer all grayscale.
    Image.new("RGB", (16, 16), (200, 30, 30)).save(gray / "colour.png")
    assert cli.train_main(flags) == 0, capsys.readouterr().err
    assert cli.convert_main(["to-torch", str(run), str(tmp_path / "unet.safetensors"), "--no-verify"]) == 0
    weights = safetensors.numpy.load_file(tmp_path / "unet.safetensors")  # the torch layout: (out, in, kh, kw)
    assert weights["init_conv.weight"].shape[1] == weights["final_conv.weight"].shape[0] == 1


def test_ddpm_sampler_ignores_sampling_steps():
    """--sampling-steps is a DDIM setting: with --sampler ddpm, the default 100 may exceed a small --timesteps."""
    validate(dataclasses.replace(TINY, sampler="ddpm", timesteps=50, sampling_steps=100), 1)
    with pytest.raises(ValueError, match=r"--sampling-steps 100: expected at most the 50 diffusion steps \(--timesteps\)"):
        validate(dataclasses.replace(TINY, sampler="ddim", timesteps=50, sampling_steps=100), 1)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_run, tmp_path):
    workdir = shutil.copytree(tiny_run[0], tmp_path / "run")  # TINY's checkpoints of steps 4 and 8
    good = _weights(workdir)
    exploding = dataclasses.replace(TINY, steps=40, save_every=2, lr=1e12, weight_decay=0.0)
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+; .* \(step 8\)"):
        training.train(exploding, workdir, progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert _max_diff(good, _weights(workdir)) == 0.0
    with pytest.raises(TrainingError, match="non-finite loss at step .* No checkpoint had been saved yet"):
        training.train(dataclasses.replace(exploding, save_every=100), tmp_path / "fresh", progress=False)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--image-size", "15", "--dim-mults", "1,2"], "--image-size 15: expected a multiple of 2"),
        (["--steps", "0"], "--steps 0: expected a positive integer"),
        (["--eta", "1.5"], "--eta 1.5: expected a number in [0, 1]"),
        (["--lr-decay", "step"], "argument --lr-decay: invalid choice: 'step'"),
        (["--timesteps", "10"], "--schedule linear with --timesteps 10"),
        (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: expected 'embedded' (the built-in RGB "
                                            "tiles), an image folder, or a .npy file"),
        (["--grad-clip", "-1"], "--grad-clip -1.0: expected a non-negative number"),
        (["--channels", "1"], "--channels 1: expected 3 with 'embedded' (the built-in RGB tiles)"),
        (["--channels", "2"], "argument --channels: invalid choice: 2"),
        (["--seed", "-1"], "--seed -1: expected a non-negative integer"),
        (["--adam-b2", "1.5"], "--adam-b2 1.5: expected a number in [0, 1)"),
        (["--num-processes", "2", "--process-id", "1"], "--num-processes and --process-id need --coordinator"),
        (["--sampler", "euler"], "--sampler euler: samples EDM models, and this model was trained as v (the DDPM "
                                 "family); expected one of ['ddpm', 'ddim', 'dpmsolver++', 'sde-dpmsolver++']"),
        (["--prediction", "edm", "--sampler", "ddim"], "--sampler ddim: samples DDPM models, and this model was "
                                                       "trained as edm (the EDM family); expected one of ['euler', 'heun']"),
        (["--sampler", "dpm"], "--sampler dpm: expected one of ['ddpm', 'ddim', 'dpmsolver++', 'sde-dpmsolver++', "
                               "'euler', 'heun']"),
        (["--prediction", "edm", "--loss-weight", "min-snr"], "--loss-weight min-snr: expected none with --prediction "
                                                              "edm, whose loss is the paper's"),
        (["--prediction", "edm", "--offset-noise", "0.1"], "--offset-noise 0.1: expected 0.0 with --prediction edm"),
        (["--prediction", "edm", "--s-churn", "-1"], "--s-churn -1.0: expected a non-negative number"),
        (["--prediction", "edm", "--sigma-data", "0"], "--sigma-data 0.0: expected a positive number"),
        (["--prediction", "edm", "--c-noise-scale", "-1"], "--c-noise-scale -1.0: expected a positive number"),
        (["--sampling-steps", "0"], "--sampling-steps 0: expected a positive integer"),
        (["--prediction", "noise"], "--prediction noise: expected one of ['eps', 'x0', 'v', 'edm'] (diffusers' "
                                    "epsilon, sample, v_prediction, and EDM's denoiser)"),
        (["--loss-weight", "snr"], "argument --loss-weight: invalid choice: 'snr'"),
        (["--snr-gamma", "0"], "--snr-gamma 0.0: expected a positive number"),
        (["--snr-gamma", "-5"], "--snr-gamma -5.0: expected a positive number"),
        (["--offset-noise", "-0.1"], "--offset-noise -0.1: expected a non-negative number"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, flags, message):
    try:  # in this process: each case stops before anything compiles
        code = cli.train_main([*TINY_FLAGS, "--workdir", str(tmp_path), *flags])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_batch_the_devices_cannot_split_is_a_clear_error(tmp_path):
    result = _run([*TINY_FLAGS, "--workdir", str(tmp_path), "--batch-size", "3"], env={"JAX_NUM_CPU_DEVICES": "2"})
    assert result.returncode == 2, result.stderr
    assert "--batch-size 3: expected a multiple of the device count (2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_explains_every_flag():
    result = _run(["--help"])
    assert result.returncode == 0
    for flag in ("--workdir", "--data", "--model", "--image-size", "--dim", "--dim-mults", "--schedule",
                 "--timesteps", "--loss", "--batch-size", "--steps", "--lr", "--ema-decay", "--save-every",
                 "--sample-every", "--num-samples", "--sampler", "--sampling-steps", "--precision", "--seed",
                 "--preset", "--coordinator", "--num-processes", "--process-id", "--eta", "--warmup-steps",
                 "--lr-decay", "--prediction", "--loss-weight", "--snr-gamma", "--offset-noise", "--sigma-data",
                 "--p-mean", "--p-std", "--c-noise-scale", "--s-churn"):
        assert flag in result.stdout
    # Where the presets differ, the help gives both defaults: the default preset learns v, the article's eps.
    text = " ".join(result.stdout.split())
    assert "training resolution (square) (default preset: 32; article preset: 128)" in text
    assert "sampled by heun or euler (default preset: v; article preset: eps)" in text
    assert "(unset: sde-dpmsolver++ for DDPM models, heun for EDM models)" in text
    assert "(default preset: unset; article preset: ddpm)" in text
    assert "(Hang et al. 2023) (default preset: min-snr; article preset: none)" in text


def test_prediction_edm_on_a_preset_that_weights_its_loss_takes_edm_own_loss():
    """The default preset weights by Min-SNR; with --prediction edm (EDM's loss is its own) that does not apply,
    and --loss-weight min-snr given with it is still refused (test_bad_config_is_a_clear_error)."""
    config, _ = cli.train_config(cli.train_parser().parse_args(["--prediction", "edm"]))
    assert (config.prediction, config.loss_weight) == ("edm", "none")
    config, _ = cli.train_config(cli.train_parser().parse_args(["--prediction", "eps"]))
    assert (config.prediction, config.loss_weight) == ("eps", "min-snr")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_device(tiny_run, tmp_path):
    """train.py over two processes of two devices each ends where TINY on one device does: the batch is split over
    the devices of a process and over the processes. (ddpm-sample's split over devices: tests/test_sample.py.)"""
    flags = [*TINY_FLAGS, "--steps", "8", "--workdir", str(tmp_path / "procs")]  # = TINY
    one_dir, _ = tiny_run
    assert jax.device_count() == 1
    distributed = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, *distributed, rank], cwd=ROOT,
                              env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for rank in ("0", "1")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    one = _weights(one_dir)
    assert _max_diff(one, _weights(one_dir / "checkpoints" / "4")) > 1e-5
    assert _max_diff(one, _weights(tmp_path / "procs")) < 1e-5
    # The final sample grid (in a multi-process run, drawn on one device): the same images, up to rounding.
    grids = [np.asarray(Image.open(run / "samples" / "step_000008.png"), np.int16) for run in (one_dir, tmp_path / "procs")]
    assert np.abs(grids[0] - grids[1]).max() <= 1


def test_sigterm_saves_then_exits_143_and_resume_finishes(tmp_path):
    # A constant learning rate: --steps then stays out of the program, and the resumed run reuses the compiled one.
    flags = [*TINY_FLAGS, "--workdir", str(tmp_path), "--steps", "100000", "--save-every", "100000", "--lr-decay",
             "constant"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # as a shell reports it: `train.py && ...` stops
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 4 and f"stopped by SIGTERM at step {saved[0]}" in err
    resumed = _run([*TINY_FLAGS, "--workdir", str(tmp_path), "--steps", str(saved[0] + 2), "--lr-decay", "constant"])
    assert resumed.returncode == 0, resumed.stderr
    # Without a progress bar the run prints a line of metrics every --log-every steps, and where its results are.
    assert re.search(rf"^step {saved[0] + 2}/{saved[0] + 2}  loss \d\.\d{{4}}  grad_norm .* img/s$", resumed.stdout, re.M)
    assert f"done: step {saved[0] + 2}; samples in {tmp_path / 'samples'}" in resumed.stdout
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == saved[0] + 2


def test_bf16_trains_finite(tmp_path):
    config = dataclasses.replace(TINY, steps=2, save_every=2, precision="bf16")
    state = training.train(config, tmp_path, progress=False)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    model, _ = load_model(tmp_path, dtype=jnp.bfloat16)
    assert jax.eval_shape(lambda x, t: model(x, t), jnp.zeros((1, 16, 16, 3)), jnp.array([5])).dtype == jnp.bfloat16


@pytest.mark.parametrize("batch_size", [4, 3])
def test_cpu_cores_become_devices_unless_the_user_chose(batch_size):
    cores = len(os.sched_getaffinity(0))
    expected = max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)
    code = ("import jax; from ddpm_jax.runtime import use_cpu_cores_as_devices as u; "
            f"r = u({batch_size}); print(r, jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**env, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert chosen.stdout.split() == [str(expected), str(expected)], chosen.stderr
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}, timeout=120)
    assert kept.stdout.split() == ["None", "1"], kept.stderr
