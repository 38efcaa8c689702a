"""Training: state, one jitted step, EMA, data-parallel sharding, Orbax checkpoints, the loop.

The step is `train_step(state, batch, key) -> (state, metrics)`, jitted once with the state donated.
Randomness is `fold_in(key, step)` and the data order a pure function of (seed, step), so a resumed
run replays exactly what an uninterrupted one would have done.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import cli, data, diffusion, ops
from ddpm_jax.config import (LR_DECAYS, OBJECTIVE_FIELDS, PRESETS, RECIPE_FIELDS, SHAPE_FIELDS, VARIANTS, TrainConfig,
                             read_json)
from ddpm_jax.ops import largest_divisor_at_most
from ddpm_jax.schedules import SCHEDULES, Schedule, make_schedule
from ddpm_jax.unets import build_model

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
LOCK = ".lock"  # "pid host" of the process training in the workdir


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


class StoppedBySignal(TrainingError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved first. `train.py` exits with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (float32)
    ema: Any  # nnx.State, exponential moving average of params
    opt_state: Any  # optax state


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then constant or a cosine decay to 0 at the last step
    (a run that ends within its warm-up never decays)."""
    if config.lr_decay == "cosine":
        after = optax.cosine_decay_schedule(config.lr, max(1, config.steps - config.warmup_steps))
    else:
        after = optax.constant_schedule(config.lr)
    if not config.warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup_steps), after],
                                [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW as the article's trainer (betas 0.9, 0.99; weight decay 0.01), optional warm-up, decay and clipping."""
    adamw = optax.adamw(learning_rate(config), b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip else adamw


def ema_decay(config: TrainConfig, step):
    """ema_pytorch's schedule as the article's trainer uses it: at step s (0-based, counted before the
    update) every `ema_every` steps, copy while s <= ema_start and on the first update after it (ema_pytorch's
    `initted` flag is first set there, and it copies before it averages), then decay
    min(beta, 1 - (1 + e)^(-2/3)) with e = s - ema_start. Returns 0 (copy) on copy steps and 1 (keep) off
    update steps."""
    epoch = jnp.maximum(step - config.ema_start, 0).astype(jnp.float32)
    decay = jnp.clip(1.0 - (1.0 + epoch) ** (-2.0 / 3.0), 0.0, config.ema_decay)
    decay = jnp.where(step - config.ema_every <= config.ema_start, 0.0, decay)
    return jnp.where(step % config.ema_every == 0, decay, 1.0)


def model_dtype(config: TrainConfig):
    return jnp.bfloat16 if config.precision == "bf16" else None


def init_state(config: TrainConfig, tx) -> tuple[nnx.GraphDef, TrainState]:
    model = build_model(config.model_config, rngs=nnx.Rngs(config.seed), dtype=model_dtype(config))
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params))
    return graphdef, state


def train_step(state: TrainState, batch_BHWC, key, *, graphdef, schedule, tx, config: TrainConfig):
    """One optimizer step on a global batch; randomness is fold_in(key, step)."""
    step_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return diffusion.training_loss(model, schedule, batch_BHWC, step_key, config.loss)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": learning_rate(config)(state.step)}
    return TrainState(state.step + 1, params, ema, opt_state), metrics


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: workdir/checkpoints/<step>/{params,ema,opt_state} (Orbax; written to a temporary folder and
# renamed when complete, so a kill mid-write leaves the previous checkpoint as the latest).


def _not_our_wait(record: logging.LogRecord) -> bool:
    """Orbax files the time of our own blocking `wait_until_finished()` after a save under the next save,
    as "Waiting for previous save to complete took ... consider checkpointing less frequently": drop it."""
    return not str(record.msg).startswith("Waiting for previous save to complete")


def checkpoint_manager(workdir: Path, config: TrainConfig) -> ocp.CheckpointManager:
    logging.getLogger("absl").addFilter(_not_our_wait)  # idempotent: a logger keeps one copy of a filter
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        Path(workdir).absolute() / CHECKPOINTS, options=options, item_names=("params", "ema", "opt_state")
    )


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> None:
    step = int(state.step)
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
            ema=ocp.args.StandardSave(nnx.to_pure_dict(state.ema)),
            opt_state=ocp.args.StandardSave(state.opt_state),
        ),
    )
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, abstract: TrainState, step: int) -> TrainState:
    def pure(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.to_pure_dict(tree))

    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(pure(abstract.params)),
            ema=ocp.args.StandardRestore(pure(abstract.ema)),
            opt_state=ocp.args.StandardRestore(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract.opt_state)
            ),
        ),
    )

    def fill(template, values):
        template = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(template, values)
        return template

    params, ema = fill(abstract.params, restored.params), fill(abstract.ema, restored.ema)
    # The step counter gets the sharding the train step returns, or its second call would compile again.
    step_array = jax.make_array_from_callback((), abstract.step.sharding, lambda _: np.int32(step))
    return TrainState(step_array, params, ema, restored.opt_state)


# ----------------------------------------------------------------------------------------------------------
# Distribution.


def setup_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """jax.distributed.initialize from flags, or auto-detected on SLURM (several tasks) and Cloud TPU.

    Returns whether this is a multi-process run."""
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
        return True
    if num_processes is not None or process_id is not None:
        raise ValueError("--num-processes and --process-id need --coordinator host:port (the address of process 0), "
                         "except on SLURM and Cloud TPU, where it is detected")
    return False


def use_cpu_cores_as_devices(batch_size: int) -> int | None:
    """Give JAX's CPU backend one device per core (up to the largest count that divides `batch_size`).

    The trainer is data parallel over devices; on a CPU, two devices on two cores run two halves of the
    batch at once, where one device leaves part of the cores idle between and inside XLA's ops (measured
    on 2 cores, TwoResUNet dim 32, batch 16: see docs/performance.md). It changes only the CPU backend. It
    does nothing if JAX_NUM_CPU_DEVICES or XLA_FLAGS already set the count, or if JAX has already started
    its backends (as when called from a program that ran JAX code before). Returns the count set, or None.
    """
    if "JAX_NUM_CPU_DEVICES" in os.environ or "device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    cores = len(os.sched_getaffinity(0))
    count = largest_divisor_at_most(batch_size, cores)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends are up: their device count stays
        return None
    return count


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def sample_sharding(num_images: int) -> NamedSharding | None:
    """The sampler's batch split over every device, where the images divide evenly and the result stays
    addressable by this process (one process); None (one device computes them) otherwise."""
    count = jax.device_count()
    if count == 1 or jax.process_count() > 1 or num_images % count:
        return None
    return NamedSharding(data_mesh(), P("data"))


def replicate_for_sampling(model: nnx.Module, num_images: int) -> NamedSharding | None:
    """`sample_sharding(num_images)`; where it splits the images, `model`'s weights are first put on every
    device. Pass the result to `diffusion.sample(..., batch_sharding=)`."""
    batch_sharding = sample_sharding(num_images)
    if batch_sharding is not None:
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(batch_sharding.mesh, P())))
    return batch_sharding


# ----------------------------------------------------------------------------------------------------------
# The loop.


def check_config(config: TrainConfig, num_devices: int) -> Schedule:
    """Every value checked before anything compiles; the message names the flag and what is allowed. Returns the
    run's noise schedule (checking it means building it)."""
    def need(ok, flag, expected):
        if not ok:
            value = getattr(config, flag.lstrip("-").replace("-", "_"))
            raise ValueError(f"--{flag.lstrip('-')} {value}: expected {expected}")

    need(config.model in VARIANTS, "model", f"one of {list(VARIANTS)}")
    need(config.schedule in SCHEDULES, "schedule", f"one of {sorted(SCHEDULES)}")
    need(config.loss in diffusion.LOSSES, "loss", f"one of {list(diffusion.LOSSES)}")
    need(config.sampler in diffusion.SAMPLERS, "sampler", f"one of {list(diffusion.SAMPLERS)}")
    need(config.precision in ("fp32", "bf16"), "precision", "fp32 or bf16")
    for flag in ("steps", "timesteps", "batch_size", "dim", "image_size", "save_every", "sample_every",
                 "num_samples", "sampling_steps", "log_every", "ema_every", "keep_checkpoints", "embedded_size"):
        need(getattr(config, flag) > 0, flag.replace("_", "-"), "a positive integer")
    for flag in ("warmup_steps", "ema_start", "seed"):
        need(getattr(config, flag) >= 0, flag.replace("_", "-"), "a non-negative integer")
    need(config.lr > 0, "lr", "a positive number")
    need(config.weight_decay >= 0, "weight-decay", "a non-negative number")
    need(config.grad_clip >= 0, "grad-clip", "a non-negative number (0 disables clipping)")
    need(0 <= config.adam_b1 < 1, "adam-b1", "a number in [0, 1)")
    need(0 <= config.adam_b2 < 1, "adam-b2", "a number in [0, 1)")
    need(0 <= config.ema_decay < 1, "ema-decay", "a number in [0, 1)")
    need(0 <= config.eta <= 1, "eta", "a number in [0, 1]")
    need(config.lr_decay in LR_DECAYS, "lr-decay", f"one of {list(LR_DECAYS)}")
    need(config.dim_mults and all(m > 0 for m in config.dim_mults), "dim-mults", "positive integers, e.g. 1,2,4,8")
    need(config.dim % 2 == 0 and config.dim >= 4, "dim", "an even integer >= 4 (the time embedding halves it)")
    check_image_size(config.image_size, len(config.dim_mults))
    need(config.batch_size % num_devices == 0, "batch-size", f"a multiple of the device count ({num_devices})")
    if config.sampler == "ddim":  # ddpm runs all T steps and ignores --sampling-steps
        need(config.sampling_steps <= config.timesteps, "sampling-steps", f"at most --timesteps ({config.timesteps})")
    return check_schedule(config.schedule, config.timesteps)


def check_schedule(name: str, timesteps: int) -> Schedule:
    """The named beta schedule at T = `timesteps`, once every beta is checked to lie in (0, 1); else a ValueError
    naming the flags."""
    schedule = make_schedule(name, timesteps)
    betas = np.asarray(schedule.betas)
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"--schedule {name} with --timesteps {timesteps} gives betas outside (0, 1) "
            f"(range {np.nanmin(betas):.3g}..{np.nanmax(betas):.3g}); the linear schedule needs --timesteps > 20"
        )
    return schedule


def check_image_size(image_size: int, levels: int) -> None:
    """A U-Net of `levels` levels halves the image `levels - 1` times: the size must divide evenly."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size}: expected a multiple of {factor} (2^(levels-1) for {levels} levels)")


def prepare_workdir(workdir: Path, config: TrainConfig, is_writer: bool) -> None:
    """Write config.json, or check a resumed run against it: a changed model shape is an error."""
    path = workdir / CONFIG_JSON
    if path.is_file():
        saved = TrainConfig.from_dict(read_json(path), str(path))

        def changed(fields):
            return [f"--{f.replace('_', '-')} {getattr(saved, f)} -> {getattr(config, f)}"
                    for f in fields if getattr(saved, f) != getattr(config, f)]

        saved_steps = [int(p.name) for p in (workdir / CHECKPOINTS).glob("[0-9]*") if p.name.isdigit()]
        if saved_steps and (different := changed(SHAPE_FIELDS + OBJECTIVE_FIELDS)):
            raise TrainingError(
                f"{workdir} holds checkpoints of a different model or noise schedule ({'; '.join(different)}). "
                f"Use a new --workdir, or the saved values."
            )
        if saved_steps and (different := changed(RECIPE_FIELDS)):
            warnings.warn(f"resuming {workdir} with {'; '.join(different)}: from here on the run differs from the "
                          f"one its checkpoints began", UserWarning, stacklevel=2)
        if saved_steps and config.steps < max(saved_steps):
            raise TrainingError(
                f"--steps {config.steps}: {workdir} already holds a checkpoint of step {max(saved_steps)}. "
                f"Pass --steps {max(saved_steps)} or more to resume it, or use a new --workdir."
            )
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_json())


def lock_workdir(workdir: Path) -> Path:
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


def unlock_workdir(path: Path) -> None:
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


def load_images(config: TrainConfig, strict: bool = False) -> np.ndarray:
    if config.data == data.EMBEDDED_NAME:
        return data.embedded_dataset(config.embedded_size, config.image_size, seed=0)
    return data.load_image_folder(config.data, config.image_size, strict=strict)


def save_grid(images_BHWC: np.ndarray, path: Path) -> None:
    """A square-ish grid PNG of images in [0, 1]."""
    from PIL import Image

    n, h, w, c = images_BHWC.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    pixels = (np.clip(images_BHWC, 0, 1) * 255 + 0.5).astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


class _StopFlag:
    """SIGTERM/SIGINT request a checkpoint and a clean exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, workdir, *, progress: bool = True, strict: bool = False) -> TrainState:
    """Train (or resume) in `workdir`; returns the final state. docs/training.md describes the workdir.

    strict: an unreadable file in an image folder is an error instead of being skipped with a warning.
    """
    workdir = Path(workdir).absolute()
    schedule = check_config(config, jax.device_count())
    lock = lock_workdir(workdir) if jax.process_index() == 0 else None  # one run per workdir
    try:
        return _train(config, schedule, workdir, progress, strict)
    finally:
        if lock:
            unlock_workdir(lock)


def _train(config: TrainConfig, schedule: Schedule, workdir: Path, progress: bool, strict: bool) -> TrainState:
    is_writer = jax.process_index() == 0
    prepare_workdir(workdir, config, is_writer)

    images = load_images(config, strict)
    mesh = data_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = make_optimizer(config)
    graphdef, abstract = nnx.eval_shape(lambda: init_state(config, tx))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)

    manager = checkpoint_manager(workdir, config)
    latest = manager.latest_step()
    if latest is None:
        state = jax.jit(lambda: init_state(config, tx)[1], out_shardings=replicated,
                        compiler_options=ops.run_once_compiler_options())()
    else:
        try:
            state = restore_checkpoint(manager, abstract, latest)
        except Exception as e:  # orbax reports a missing item as KeyError, damaged data as ValueError and more
            older = [s for s in manager.all_steps() if s < latest]
            then = f"resume from step {max(older)}" if older else "start afresh"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise TrainingError(
                f"cannot restore the checkpoint of step {latest} in {workdir / CHECKPOINTS}: {reason}\n"
                f"It is damaged or incomplete. Move {workdir / CHECKPOINTS / str(latest)} away to {then}."
            ) from e
    start = int(state.step)

    step_fn = jax.jit(
        partial(train_step, graphdef=graphdef, schedule=schedule, tx=tx, config=config),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
        compiler_options=ops.training_compiler_options(),
    )
    key = jax.random.key(config.seed)
    sample_key = jax.random.fold_in(jax.random.key(config.seed), 1 << 30)
    grid_sharding = sample_sharding(config.num_samples)

    def sample_grid(state):
        ema_model = nnx.merge(graphdef, state.ema)
        images = diffusion.sample(
            ema_model, schedule, sample_key, config.num_samples, config.image_size,
            sampler=config.sampler, steps=config.sampling_steps, eta=config.eta, batch_sharding=grid_sharding,
        )
        if is_writer:
            save_grid(np.asarray(images, np.float32), workdir / SAMPLES / f"step_{int(state.step):06d}.png")

    def host_batch(step):
        return data.get_batch(images, config.batch_size, config.seed, step,
                              process_index=jax.process_index(), process_count=jax.process_count())

    metrics_file = open(workdir / METRICS, "a") if is_writer else None
    bar = None
    if progress and is_writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)
    pending, last_saved, t_log = [], latest, time.perf_counter()

    def flush(step):
        """Fetch the metrics since the last flush, stop on a non-finite loss, log them."""
        nonlocal pending, t_log
        if not pending:
            return
        fetched = jax.device_get(pending)
        now = time.perf_counter()
        losses = np.array([m["loss"] for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = step - len(losses) + int(np.argmax(~np.isfinite(losses))) + 1
            kept = (f"The last good checkpoint (step {last_saved}) is in {workdir / CHECKPOINTS}." if last_saved
                    is not None else "No checkpoint had been saved yet.")
            raise TrainingError(
                f"non-finite loss at step {bad}; stopped without saving. {kept} Try a lower --lr or --grad-clip."
            )
        steps_per_s = len(fetched) / (now - t_log)
        record = {
            "step": step,
            "loss": float(losses.mean()),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "lr": float(fetched[-1]["lr"]),
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * config.batch_size,
        }
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
        pending, t_log = [], now

    def checkpoint(state):
        nonlocal last_saved
        flush(int(state.step))
        if last_saved != int(state.step):
            try:
                save_checkpoint(manager, state)
            except Exception as e:  # a full disk arrives as OSError, or as ValueError from tensorstore
                previous = "No checkpoint was saved before." if last_saved is None else (
                    f"The previous checkpoint (step {last_saved}) is intact.")
                raise TrainingError(
                    f"could not save the checkpoint of step {int(state.step)} in {workdir / CHECKPOINTS}: {e}\n"
                    f"{previous} Free disk space (or fix the cause above) and run the same command to resume."
                ) from e
            last_saved = int(state.step)

    try:
        with _StopFlag() as stop, data.Prefetcher(host_batch, start, sharding=batch_sharding) as batches:
            for step, batch in batches:
                if step >= config.steps:
                    break
                state, metrics = step_fn(state, batch, key)
                pending.append(metrics)
                done = step + 1
                if done == start + 1:  # the first step compiles: keep it out of the throughput
                    jax.block_until_ready(metrics)
                    compile_s, t_log, pending = time.perf_counter() - t_log, time.perf_counter(), []
                    if is_writer:
                        (bar.write if bar is not None else print)(f"compiled the train step in {compile_s:.1f} s")
                if bar is not None:
                    bar.update(1)
                if done % config.log_every == 0:
                    flush(done)
                if done % config.save_every == 0:
                    checkpoint(state)
                if done % config.sample_every == 0:
                    sample_grid(state)
                if _stop_requested(stop):
                    checkpoint(state)
                    signum = int(stop.signal or signal.SIGTERM)  # another process may have received it
                    raise StoppedBySignal(f"stopped by {signal.Signals(signum).name} at step {done}; checkpoint saved in "
                                          f"{workdir / CHECKPOINTS}. Run the same command to resume.", signum)
            if int(state.step) > start or latest is None:
                checkpoint(state)
                if int(state.step) % config.sample_every:  # else the loop has just drawn it
                    sample_grid(state)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
        manager.close()
    if is_writer:
        print(f"done: step {int(state.step)}; samples in {workdir / SAMPLES}, checkpoints in "
              f"{workdir / CHECKPOINTS}, metrics in {workdir / METRICS}")
    return state


def _stop_requested(stop: _StopFlag) -> bool:
    """A signal on any process stops every process at the same step."""
    requested = stop.signal is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
    return requested


# ----------------------------------------------------------------------------------------------------------
# Command line (train.py is a thin entry to `main`).


def enable_compilation_cache() -> None:
    """Persistent XLA cache, so a second run of the same program compiles in seconds."""
    path = os.environ.get("DDPM_JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "ddpm_jax" / "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _parse_mults(text: str) -> tuple[int, ...]:
    import argparse

    try:
        mults = tuple(int(m) for m in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    return mults


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the article's DDPM U-Net with JAX on the embedded dataset or an image folder. "
        "Run it again on the same --workdir to resume from the latest checkpoint.",
    )
    parser.add_argument("--workdir", default=None, help="run folder: config, metrics, samples, checkpoints "
                        "(default: runs/<preset>)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="base config; flags override it. 'article' is the article's 128 px run")
    choices = {"model": list(VARIANTS), "schedule": sorted(SCHEDULES), "loss": list(diffusion.LOSSES),
               "sampler": list(diffusion.SAMPLERS), "precision": ["fp32", "bf16"], "lr_decay": list(LR_DECAYS)}
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else value

    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _parse_mults if field.name == "dim_mults" else type(field.default)
        values = {name: shown(getattr(preset, field.name)) for name, preset in PRESETS.items()}
        defaults = (f"default: {values['default']}" if len(set(values.values())) == 1 else
                    "; ".join(f"{name} preset: {value}" for name, value in values.items()))
        parser.add_argument(flag, type=kind, choices=choices.get(field.name), default=None,
                            help=f"{field.metadata['help']} ({defaults})")
    dist = parser.add_argument_group("multi-host (auto-detected on SLURM and Cloud TPU)")
    dist.add_argument("--coordinator", help="host:port of process 0 for jax.distributed.initialize")
    dist.add_argument("--num-processes", type=int, help="total number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index, 0-based")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file in --data "
                        "(default: skip it with a warning)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (metrics still go to metrics.jsonl; the compile time and the "
                        "final summary are still printed)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    config = dataclasses.replace(PRESETS[args.preset], **overrides)
    workdir = args.workdir or os.path.join("runs", args.preset)
    return args, config, workdir


def main(argv=None) -> int:
    cli.one_line_warnings()
    args, config, workdir = parse_args(argv)
    try:
        enable_compilation_cache()
        if not setup_distributed(args.coordinator, args.num_processes, args.process_id):
            use_cpu_cores_as_devices(config.batch_size)
        train(config, workdir, progress=not args.no_progress, strict=args.strict)
    except StoppedBySignal as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum  # as a shell reports a process ended by that signal: `train.py && ...` stops
    except (ValueError, TrainingError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    return 0
