"""A training run's folder: its layout, the config a resumed run is checked against, and the lock that keeps
one run per folder.

    <workdir>/config.json               the TrainConfig (a checkpoint alone says how to rebuild its model)
    <workdir>/checkpoints/<step>/       params, ema, opt_state (Orbax; see checkpoints.py)
    <workdir>/samples/step_<step>.png   grids drawn from the EMA weights
    <workdir>/metrics.jsonl             one JSON line of metrics every --log-every steps
    <workdir>/.lock                     "pid host" of the process training there
"""

import os
import socket
import warnings
from pathlib import Path

from ddpm_jax.config import OBJECTIVE_FIELDS, RECIPE_FIELDS, SHAPE_FIELDS, TrainConfig, read_json
from ddpm_jax.errors import TrainingError

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"
LOCK = ".lock"


def saved_steps(workdir: Path) -> list[int]:
    """The steps of the complete checkpoints in `workdir`, oldest first (half-written ones carry a suffix)."""
    folder = Path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit() and p.is_dir())


def read_config(workdir: Path) -> TrainConfig:
    """The run's config.json; a ValueError naming the file if it is missing or not a training config."""
    path = Path(workdir) / CONFIG_JSON
    try:
        d = read_json(path)
        if isinstance(d, dict):
            d.setdefault("channels", 3)  # a config written before the field existed: an RGB run
        return TrainConfig.from_dict(d, str(path))
    except TypeError as e:
        raise ValueError(f"{path}: not a valid training config ({e})") from None


def run_config(path: Path) -> TrainConfig | None:
    """The config of the run that `path` (a workdir, or one of its checkpoints/<step> folders) belongs to;
    None where there is none."""
    for folder in (Path(path), Path(path).parent.parent):
        if (folder / CONFIG_JSON).is_file():
            return read_config(folder)
    return None


def prepare(workdir: Path, config: TrainConfig, is_writer: bool) -> None:
    """Write config.json, or check a resumed run against it: a changed model shape or objective (noise schedule,
    target, loss weighting, offset noise) is an error, a changed recipe (loss, batch, seed) a warning."""
    saved = read_config(workdir) if (workdir / CONFIG_JSON).is_file() else None
    if saved is not None and (steps := saved_steps(workdir)):

        def changed(fields):
            return [f"--{f.replace('_', '-')} {getattr(saved, f)} -> {getattr(config, f)}"
                    for f in fields if getattr(saved, f) != getattr(config, f)]

        if different := changed(SHAPE_FIELDS + OBJECTIVE_FIELDS):
            raise TrainingError(
                f"{workdir} holds checkpoints of a different model or objective ({'; '.join(different)}). "
                f"Use a new --workdir, or the saved values."
            )
        if different := changed(RECIPE_FIELDS):
            warnings.warn(f"resuming {workdir} with {'; '.join(different)}: from here on the run differs from the "
                          f"one its checkpoints began", UserWarning, stacklevel=3)
        if config.steps < steps[-1]:
            raise TrainingError(
                f"--steps {config.steps}: {workdir} already holds a checkpoint of step {steps[-1]}. "
                f"Pass --steps {steps[-1]} or more to resume it, or use a new --workdir."
            )
    if is_writer:
        # Written beside and renamed over, so that a run stopped at any moment (Ctrl-C, kill -9) leaves the old
        # file or the new one, never half of one, and the same command starts or resumes from it.
        workdir.mkdir(parents=True, exist_ok=True)
        partial = workdir / f"{CONFIG_JSON}.{os.getpid()}"
        partial.write_text(config.to_json())
        os.replace(partial, workdir / CONFIG_JSON)


def lock(workdir: Path) -> Path:
    """Claim `workdir` for this process with a lock file holding "pid host"; returns its path. The lock of a
    process that no longer runs on this host is stale and taken over; a live one is a TrainingError naming it."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: is a file; expected a folder (a new one, or a run's to resume)")
    workdir.mkdir(parents=True, exist_ok=True)
    path, me = workdir / LOCK, f"{os.getpid()} {socket.gethostname()}"
    mine = workdir / f"{LOCK}.{os.getpid()}"
    mine.write_text(me)
    try:
        while True:
            try:
                os.link(mine, path)  # atomic: fails if another process holds the lock
                return path
            except FileExistsError:
                holder = path.read_text() if path.exists() else ""
                if holder.split() == me.split():
                    return path
                if _holder_runs(holder):
                    pid, host = holder.split()
                    raise TrainingError(
                        f"{workdir} is in use by another run: process {pid} on {host}"
                        f"{_command_of(int(pid), host)}. Wait for it to end, stop it, or use another --workdir. "
                        f"If that process is not training here, delete {path}."
                    ) from None
                path.unlink(missing_ok=True)  # stale: its process has ended
    finally:
        mine.unlink(missing_ok=True)


def unlock(path: Path) -> None:
    if path.is_file() and path.read_text().split() == [str(os.getpid()), socket.gethostname()]:
        path.unlink()


def _holder_runs(holder: str) -> bool:
    try:
        pid, host = holder.split()
        pid = int(pid)
    except ValueError:
        return False  # not a lock this trainer wrote
    if host != socket.gethostname():
        return True  # a process on another host cannot be checked from here
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _command_of(pid: int, host: str) -> str:
    """ " (its command line)" of a process on this host, where /proc has it; else ""."""
    if host != socket.gethostname():
        return ""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({command[:200]})" if command else ""
