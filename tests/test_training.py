"""The trainer from TINY's run: exact resume, device/process equivalence, EMA schedule, errors, the CLI. Runs of
other configs: test_training_configs.py."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def test_ddpm_sampler_ignores_sampling_steps():
    """--sampling-steps is a DDIM setting: with --sampler ddpm, the default 100 may exceed a small --timesteps."""
    validate(dataclasses.replace(TINY, sampler="ddpm", timesteps=50, sampling_steps=100), 1)
    with pytest.raises(ValueError, match=r"--sampling-steps 100: expected at most the 50 diffusion steps \(--timesteps\)"):
        validate(dataclasses.replace(TINY, sampler="ddim", timesteps=50, sampling_steps=100), 1)


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
