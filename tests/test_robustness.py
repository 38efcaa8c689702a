"""Robustness: unusable image folders and --debug at the CLIs, a full disk while saving, kill -9 while training
as a checkpoint is being written, Ctrl-C at start-up (real processes, real signals), Ctrl-C in every command, and
sampling a run whose rotation deletes the checkpoint being read."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ddpm_jax import cli
from ddpm_jax.convert import ConversionError, to_torch_state
from ddpm_jax.data import DataError
from conftest import TINY_FLAGS
from test_training import ROOT, _max_diff, _run, _weights

# Orbax writes a checkpoint into <step>.orbax-checkpoint-tmp[-<n>]/ and renames it to <step>/ once complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A workdir holding TINY's complete checkpoint at step 4, as a run killed right after writing it leaves it
    (the session's TINY run, cut back); the tests below start from copies of it."""
    workdir = shutil.copytree(tiny_run[0], tmp_path_factory.mktemp("trained") / "run")
    shutil.rmtree(workdir / "checkpoints" / "8")
    (workdir / "samples" / "step_000008.png").unlink()
    metrics = workdir / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= 4))
    return workdir


def _checkpoints(workdir):
    names = os.listdir(workdir / "checkpoints")
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if TMP_SUFFIX in n]


def _logged_steps(workdir):
    """Steps in metrics.jsonl, read while it is being written: a last line without its newline is left out."""
    path = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


# ----------------------------------------------------------------------------------------------------------
# Image folders and --debug at the command line.


@pytest.mark.filterwarnings("ignore:skipp:UserWarning")  # the skipped file's warnings: see test_data
@pytest.mark.parametrize("case", ["empty", "no usable image", "strict"])
def test_train_cli_rejects_unusable_image_folders(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "images"
    folder.mkdir()
    flags, named = [], folder
    if case == "no usable image":
        (folder / "broken.png").write_bytes(b"not a png")
    if case == "strict":
        Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "good.png")
        (folder / "text.jpg").write_text("not a jpeg")
        flags, named = ["--strict"], folder / "text.jpg"
    code = cli.train_main([*TINY_FLAGS, "--workdir", str(tmp_path / "run"), "--data", str(folder), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and str(named) in err and "Traceback" not in err
    assert cli.train_parser().parse_args([]).strict is False  # by default bad files are skipped, not fatal


def test_debug_shows_the_traceback(tmp_path):
    """--debug lets the exception escape (Python prints its traceback); evaluate's is in test_evaluate."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        cli.train_main([*TINY_FLAGS, "--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "empty"), "--debug"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.pt"):
        cli.sample_main(["--checkpoint", str(tmp_path / "junk.pt"), "--debug"])
    with pytest.raises(ConversionError, match="junk.pt"):
        cli.convert_main(["--debug", "to-flax", str(tmp_path / "junk.pt"), str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------------------
# A full disk while saving.


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs to fill up, or None where this process may not mount one (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
    trained, small_disk, tmp_path, monkeypatch, capsys
):
    workdir = shutil.copytree(trained, (small_disk or tmp_path) / "run")
    command = [*TINY_FLAGS, "--workdir", str(workdir), "--steps", "8"]
    if small_disk:
        filler = small_disk / "filler"  # leaves room for config.json and metrics, not for a checkpoint
        filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 256 * 1024))
        # A real process: Orbax's other writers go on failing (and logging tracebacks) after the first
        # error reaches us, until the process exits.
        result = _run(command)
        code, err = result.returncode, result.stderr
    else:  # without root: the kernel's error, raised where Orbax saves step 8
        save = ocp.CheckpointManager.save

        def full_disk(self, step, *args, **kwargs):
            if step == 8:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
        code, err = cli.train_main(command), capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert f"error: could not save the checkpoint of step 8 in {workdir / 'checkpoints'}" in err
    assert "No space left on device" in err and "The previous checkpoint (step 4) is intact" in err
    complete, half_written = _checkpoints(workdir)
    assert complete == [4] and [n.split(".")[0] for n in half_written] == (["8"] if small_disk else [])
    assert _max_diff(_weights(trained), _weights(workdir)) == 0.0  # load_model skips the half-written one


# ----------------------------------------------------------------------------------------------------------
# kill -9 (real processes, real signals).


def _start(workdir, log, *flags):
    """train.py in the background, its output to a file (an unread pipe could fill up and stall it)."""
    command = [sys.executable, str(ROOT / "train.py"), *TINY_FLAGS, "--workdir", str(workdir), *flags]
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _kill_9_when(proc, condition, what, log):
    deadline = time.monotonic() + 240
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within 240 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_a_damaged_latest_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    workdir = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "4" / "opt_state")
    assert cli.train_main([*TINY_FLAGS, "--workdir", str(workdir), "--steps", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot restore the checkpoint of step 4 in {workdir / 'checkpoints'}"), err
    assert f"Move {workdir / 'checkpoints' / '4'} away to start afresh" in err and "Traceback" not in err, err


def test_kill_9_during_training_resumes_from_the_newest_complete_checkpoint(trained, tmp_path):
    """Every step saves, so a write is nearly always in progress; SIGKILL as soon as one is seen: the hardest
    moment, as a half-written checkpoint is left beside the complete ones."""
    workdir, log = shutil.copytree(trained, tmp_path / "run"), tmp_path / "log"
    command = ["--steps", "8", "--save-every", "1"]
    for _ in range(3):  # the write may still finish between seeing it and the signal landing
        _kill_9_when(_start(workdir, log, *command), lambda: _checkpoints(workdir)[1], "checkpoint write", log)
        complete, half_written = _checkpoints(workdir)
        if half_written:
            break
    else:
        pytest.fail("every write completed before SIGKILL landed")
    last = max(complete)
    assert [n.split(".")[0] for n in half_written] == [str(last + 1)]
    # load_model takes the newest complete checkpoint, not the half-written one
    assert _max_diff(_weights(workdir), _weights(workdir / "checkpoints" / str(last))) == 0.0
    logged = len(_logged_steps(workdir))

    assert cli.train_main([*TINY_FLAGS, "--workdir", str(workdir), *command]) == 0  # the same command, resumed
    complete, half_written = _checkpoints(workdir)
    assert complete == [6, 7, 8] and half_written == []  # Orbax replaced the half-written folder
    # Resumed at `last`, not at 0: each step after it is logged again (every step saves, and logs as it does).
    assert _logged_steps(workdir)[logged:] == list(range(last + 1, 9))
    # The first step's time is the compile's: its line has no rates, the others do.
    resumed = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()[logged:]]
    assert resumed[0]["steps_per_s"] is None and resumed[0]["images_per_s"] is None
    assert all(m["steps_per_s"] > 0 and m["images_per_s"] > 0 for m in resumed[1:])


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C, and sampling a live run.


def test_ctrl_c_during_start_up_is_one_line_and_130_and_the_same_command_then_runs(tmp_path, monkeypatch, capsys):
    """Ctrl-C once the workdir is prepared (config.json written, the lock taken) and before the training loop,
    whose own handler saves first: one line, 130, no checkpoint, and the same command then runs to the end. The
    interrupt is raised where the start-up builds the initial state, so the moment is the same on every machine
    (a real SIGINT sent on seeing config.json can arrive after the loop's handler is installed)."""
    from ddpm_jax import training

    workdir = tmp_path / "run"
    flags = [*TINY_FLAGS, "--workdir", str(workdir), "--steps", "8"]  # = TINY, whose programs the session has
    build = training.initial_state

    def ctrl_c(*args, **kwargs):
        assert (workdir / "config.json").is_file()  # the start-up had written the workdir
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "initial_state", ctrl_c)
    assert cli.train_main(flags) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "\ninterrupted\n"
    assert not (workdir / "checkpoints").exists() or _checkpoints(workdir) == ([], [])
    monkeypatch.setattr(training, "initial_state", build)
    assert cli.train_main(flags) == 0
    assert "done: step 8" in capsys.readouterr().out and _checkpoints(workdir) == ([4, 8], [])


@pytest.mark.parametrize("main,interrupted,argv", [
    (cli.train_main, "ddpm_jax.training.train", TINY_FLAGS),
    (cli.sample_main, "ddpm_jax.cli.sample_parser", []),  # while the parser is built (it imports jax)
    (cli.sample_main, "ddpm_jax.sample.load_model", ["--checkpoint", "run"]),
    (cli.convert_main, "ddpm_jax.checkpoints.load_model", ["to-flax", "unet.pt", "flax"]),
])
def test_ctrl_c_in_any_command_is_one_line_and_130(monkeypatch, capsys, tmp_path, main, interrupted, argv):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(interrupted, ctrl_c)
    assert main(list(argv)) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "\ninterrupted\n"
    if interrupted != "ddpm_jax.cli.sample_parser":  # --debug is known once the flags are parsed
        with pytest.raises(KeyboardInterrupt):  # and then shows where it was
            main(["--debug", *argv])


def test_sampling_a_live_run_passes_over_the_checkpoint_its_rotation_deletes(tiny_run, tmp_path, monkeypatch):
    """The newest checkpoint (8) is deleted, as a run's rotation does, just as it is read: the next newest complete
    one (4) is read instead, with a one-line note. Once no newer one is left, a checkpoint that fails is an error."""
    from ddpm_jax.checkpoints import CheckpointError, load_model

    workdir = shutil.copytree(tiny_run[0], tmp_path / "run")
    restore, deleted = ocp.CheckpointManager.restore, []

    def rotated_away(self, step, *args, **kwargs):
        if not deleted:
            shutil.rmtree(workdir / "checkpoints" / str(step))
            deleted.append(step)
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", rotated_away)
    with pytest.warns(UserWarning, match=r"the checkpoint of step 8 was deleted or superseded while it was read "
                                         r"\(the run's rotation\); reading step 4$"):
        model, _ = load_model(workdir)
    monkeypatch.undo()
    assert deleted == [8]
    assert _max_diff(_weights(tiny_run[0] / "checkpoints" / "4", ema=True), to_torch_state(model)) == 0.0
    shutil.rmtree(workdir / "checkpoints" / "4" / "ema")  # damaged, and the newest: not passed over
    with pytest.raises(CheckpointError, match="step 4, ema"):
        load_model(workdir)
