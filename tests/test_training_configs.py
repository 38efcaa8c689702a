"""Training runs of other configs than TINY, which share no program with the session's tiny run: CONSTANT's
(extended, prolonged, poisoned, stopped by SIGTERM; its objective followed through to ddpm-sample), EDM's, and a
grayscale folder in bf16. conftest.py makes this module one unit of work, so its runs compile CONSTANT once."""

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from ddpm_jax import cli, training, workdirs
from ddpm_jax.checkpoints import load_model
from ddpm_jax.errors import TrainingError
from ddpm_jax.validation import validate
from conftest import CONSTANT, CONSTANT_FLAGS, TINY, TINY_FLAGS
from test_training import ROOT, _assert_same_state, _max_diff, _run, _weights


def test_a_finished_run_extended_with_more_steps_matches_one_run(tmp_path, monkeypatch):
    """With a constant learning rate (CONSTANT), 4 steps and then --steps 8 on the same workdir equals 8 in one go.
    Each grid is drawn once: at every --sample-every step, and at the end only if that was not one."""
    drawn = []
    monkeypatch.setattr(training.diffusion, "sample", lambda *a, sample=training.diffusion.sample, **k:
                        drawn.append(1) or sample(*a, **k))
    config = dataclasses.replace(CONSTANT, sample_every=4)
    whole = training.train(config, tmp_path / "whole", progress=False)
    assert len(drawn) == 2 and sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == [
        "step_000004.png", "step_000008.png"]
    training.train(dataclasses.replace(config, steps=4), tmp_path / "split", progress=False)
    _assert_same_state(whole, training.train(config, tmp_path / "split", progress=False))
    assert len(drawn) == 4


def test_loss_decreases_on_embedded_data(tmp_path):
    # CONSTANT's v loss, unweighted, is noisy from one logged mean to the next: 0.49 at step 10, 0.27 at step 100.
    config = dataclasses.replace(CONSTANT, steps=100, log_every=10, save_every=100)
    training.train(config, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses


def test_a_run_records_its_objective_and_its_grids_and_ddpm_sample_use_it(tmp_path, monkeypatch):
    """CONSTANT's objective (v, unweighted, offset noise; the default preset weights by Min-SNR and adds none):
    config.json records it, and the trainer's grids and ddpm-sample read the output as v."""
    from ddpm_jax import diffusion
    from ddpm_jax.sample import sample_checkpoint

    drawn = []
    monkeypatch.setattr(training.diffusion, "sample", lambda *a, sample=training.diffusion.sample, **k:
                        drawn.append(a[5]) or sample(*a, **k))
    config = dataclasses.replace(CONSTANT, save_every=8)
    training.train(config, tmp_path, progress=False)
    saved = workdirs.read_config(tmp_path)
    assert (saved.prediction, saved.loss_weight, saved.offset_noise, saved.sampler) == ("v", "none", 0.1, "ddim")
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


def test_a_grayscale_folder_trains_one_channel_in_bf16_through_to_the_converter(tmp_path, capsys):
    """Said in one line; config.json, the grid (a grayscale PNG), the checkpoint and the converter carry the one
    channel; resuming with --channels 3 is refused, naming the flag. In bf16 (one compile for both): the state
    stays finite, the master weights float32, and the model loads to compute in bf16."""
    gray, run = tmp_path / "gray", tmp_path / "run"
    gray.mkdir()
    for k in range(6):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16), np.uint8), "L").save(gray / f"{k}.png")
    flags = [*TINY_FLAGS, "--steps", "8", "--precision", "bf16", "--data", str(gray), "--workdir", str(run)]
    state = training.train(dataclasses.replace(TINY, precision="bf16", data=str(gray)), run, progress=False)  # = flags
    assert f"every image in {gray} is grayscale: training with --channels 1" in capsys.readouterr().out
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert json.loads((run / "config.json").read_text())["channels"] == 1
    assert Image.open(run / "samples" / "step_000008.png").mode == "L"
    model, config = load_model(run)
    assert model.channels == config.channels == 1
    model, _ = load_model(run, dtype=jnp.bfloat16)
    out = jax.eval_shape(lambda x, t: model(x, t), jnp.zeros((1, 16, 16, 1)), jnp.array([5]))
    assert (out.shape, out.dtype) == ((1, 16, 16, 1), jnp.bfloat16)
    assert cli.train_main([*flags, "--steps", "9", "--channels", "3"]) == 1
    assert "different model or objective (--channels 1 -> 3)" in capsys.readouterr().err
    # Without the flag a resumed run keeps its channel count, though the folder is no longer all grayscale.
    Image.new("RGB", (16, 16), (200, 30, 30)).save(gray / "colour.png")
    assert cli.train_main(flags) == 0, capsys.readouterr().err
    assert cli.convert_main(["to-torch", str(run), str(tmp_path / "unet.safetensors"), "--no-verify"]) == 0
    weights = safetensors.numpy.load_file(tmp_path / "unet.safetensors")  # the torch layout: (out, in, kh, kw)
    assert weights["init_conv.weight"].shape[1] == weights["final_conv.weight"].shape[0] == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    """From step 9 on every batch holds an infinite pixel: the run stops at the next fetch of its metrics, which a
    checkpoint due (every step here) waits for, so nothing is saved and the checkpoints of steps 4 and 8 stay as
    they were. A run that fails before its first checkpoint says so."""
    workdir = tmp_path / "run"
    training.train(CONSTANT, workdir, progress=False)  # checkpoints of steps 4 and 8
    good = _weights(workdir)
    get_batch = training.data.get_batch

    def poisoned(*args, **kwargs):
        batch = get_batch(*args, **kwargs)
        if args[3] >= 8:  # the index of the step, from 0
            batch[0, 0, 0, 0] = np.inf
        return batch

    monkeypatch.setattr(training.data, "get_batch", poisoned)
    longer = dataclasses.replace(CONSTANT, steps=40, save_every=1)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 9; stopped without saving\. .* \(step 8\)"):
        training.train(longer, workdir, progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert _max_diff(good, _weights(workdir)) == 0.0
    with pytest.raises(TrainingError, match="non-finite loss at step 9; .* No checkpoint had been saved yet"):
        training.train(dataclasses.replace(longer, save_every=100), tmp_path / "fresh", progress=False)


def test_sigterm_saves_then_exits_143_and_resume_finishes(tmp_path):
    # CONSTANT: --steps stays out of the program, and the resumed run reuses the compiled one.
    flags = [*CONSTANT_FLAGS, "--workdir", str(tmp_path), "--steps", "100000", "--save-every", "100000"]
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
    resumed = _run([*CONSTANT_FLAGS, "--workdir", str(tmp_path), "--steps", str(saved[0] + 2)])
    assert resumed.returncode == 0, resumed.stderr
    # Without a progress bar the run prints a line of metrics every --log-every steps, and where its results are.
    assert re.search(rf"^step {saved[0] + 2}/{saved[0] + 2}  loss \d\.\d{{4}}  grad_norm .* img/s$", resumed.stdout, re.M)
    assert f"done: step {saved[0] + 2}; samples in {tmp_path / 'samples'}" in resumed.stdout
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == saved[0] + 2

