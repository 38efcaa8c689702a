"""The training loop: one jitted step per batch, with metrics, checkpoints and sample grids at their intervals.

The batch of a step is a pure function of (seed, step) and the step's randomness `fold_in(key, step)`, so a
resumed run replays exactly what an uninterrupted one would have done. docs/training.md describes the workdir.
"""

import dataclasses
import json
import signal
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoints, data, diffusion, images, runtime, workdirs
from ddpm_jax.config import TrainConfig
from ddpm_jax.errors import StoppedBySignal, TrainingError
from ddpm_jax.schedules import Schedule
from ddpm_jax.train_state import TrainState, initial_state, jit_train_step, make_optimizer
from ddpm_jax.validation import sampler_settings, validate


def train(config: TrainConfig, workdir, *, progress: bool = True, strict: bool = False) -> TrainState:
    """Train (or resume) in `workdir`; returns the final state.

    strict: an unreadable file in an image folder is an error instead of being skipped with a warning.
    """
    workdir = Path(workdir).absolute()
    schedule = validate(config, jax.device_count())
    lock = workdirs.lock(workdir) if jax.process_index() == 0 else None  # one run per workdir
    try:
        return _train(config, schedule, workdir, progress, strict)
    finally:
        if lock:
            workdirs.unlock(lock)


def _train(config: TrainConfig, schedule: Schedule, workdir: Path, progress: bool, strict: bool) -> TrainState:
    is_writer = jax.process_index() == 0
    if config.channels is None and (workdir / workdirs.CONFIG_JSON).is_file():  # a resumed run keeps its own
        config = dataclasses.replace(config, channels=workdirs.read_config(workdir).channels)
    num = config.embedded_size if config.data == data.EMBEDDED_NAME else None
    dataset = data.load(config.data, config.image_size, num=num, strict=strict, channels=config.channels)
    if config.channels is None:
        config = dataclasses.replace(config, channels=dataset.shape[-1])
        if config.channels == 1 and is_writer:
            print(f"every image in {config.data} is grayscale: training with --channels 1 (--channels 3 for RGB)")
    workdirs.prepare(workdir, config, is_writer)
    mesh = runtime.data_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = make_optimizer(config)
    graphdef, abstract, init = initial_state(config, tx, replicated)

    def host_batch(step):
        return data.get_batch(dataset, config.batch_size, config.seed, step,
                              process_index=jax.process_index(), process_count=jax.process_count())

    step_fn = jit_train_step(config, graphdef, schedule, tx, replicated)
    key = jax.random.key(config.seed)
    with CheckpointSaver(workdir, config) as saver:
        state = saver.restore(abstract) or init()
        start = int(state.step)
        with (TensorBoard(workdir, is_writer, start) as board,
              MetricsLog(workdir, config, start, board, progress) as log, runtime.StopSignals() as stop,
              data.Prefetcher(host_batch, start, sharding=batch_sharding) as batches):
            draw = GridSampler(workdir, config, graphdef, schedule, board)
            for step, batch in batches:
                if step >= config.steps:
                    break
                state, metrics = step_fn(state, batch, key)
                done = step + 1
                log.add(done, metrics, saver.saved)
                if done % config.save_every == 0:
                    saver(state, log)
                if done % config.sample_every == 0:
                    draw(state)
                if stop.requested():
                    saver(state, log)
                    signum = int(stop.signal or signal.SIGTERM)  # another process may have received it
                    raise StoppedBySignal(f"stopped by {signal.Signals(signum).name} at step {done}; checkpoint saved "
                                          f"in {workdir / workdirs.CHECKPOINTS}. Run the same command to resume.",
                                          signum)
            if int(state.step) > start or saver.saved is None:
                saver(state, log)
                if int(state.step) % config.sample_every:  # else the loop has just drawn it
                    draw(state)
    if is_writer:
        print(f"done: step {int(state.step)}; samples in {workdir / workdirs.SAMPLES}, checkpoints in "
              f"{workdir / workdirs.CHECKPOINTS}, metrics in {workdir / workdirs.METRICS}")
    return state


class TensorBoard:
    """Process 0's TensorBoard events in <workdir>/tensorboard/, for `tensorboard --logdir runs/`: the scalars of
    metrics.jsonl as train/<name>, each sample grid as the image `samples`. Other processes write nothing. A run
    resumed at step `start` hides what an earlier process logged from `start` on (it is logged again)."""

    def __init__(self, workdir: Path, is_writer: bool, start: int):
        self.is_writer, self.writer = is_writer, None
        if not is_writer:
            return
        from tensorboardX import SummaryWriter

        folder = workdir / workdirs.TENSORBOARD
        try:
            self.writer = SummaryWriter(str(folder), flush_secs=30, purge_step=start or None)
        except OSError as e:
            raise OSError(f"{folder}: cannot write TensorBoard events there ({e.strerror or e}); make it a writable "
                          f"folder or move what is in the way, then run the same command") from None

    def scalars(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def image(self, step: int, pixels_HWC: np.ndarray) -> None:
        self.writer.add_image("samples", pixels_HWC, step, dataformats="HWC")

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:  # a full disk: the run's own error (or success) is what the user must see
                warnings.warn(f"{self.writer.logdir}: the last TensorBoard events were not written ({e})")


class MetricsLog:
    """Keeps each step's metrics on the device and, every --log-every steps (and before a checkpoint), fetches
    them, stops on a non-finite loss, appends their means to metrics.jsonl and TensorBoard, and shows them on the
    progress bar, or without one prints them as a line. The first step's time is the compile's, printed once and
    kept out of the rates (its metrics are logged and checked as every step's; a line of that step alone has no
    rates: null in metrics.jsonl)."""

    def __init__(self, workdir: Path, config: TrainConfig, start: int, board: TensorBoard, progress: bool):
        self.workdir, self.config, self.start, self.board = workdir, config, start, board
        is_writer = self.is_writer = board.is_writer
        self.file = open(workdir / workdirs.METRICS, "a") if is_writer else None
        self.bar = None
        if progress and is_writer:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)
        self.pending, self.since = [], time.perf_counter()
        self.untimed = 0  # pending steps before `since`: the first, whose time is the compile's

    def add(self, step: int, metrics: dict, saved: int | None) -> None:
        self.pending.append(metrics)
        if step == self.start + 1:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            compile_s, self.since, self.untimed = now - self.since, now, len(self.pending)
            if self.is_writer:
                (self.bar.write if self.bar is not None else print)(f"compiled the train step in {compile_s:.1f} s")
        if self.bar is not None:
            self.bar.update(1)
        if step % self.config.log_every == 0:
            self.flush(step, saved)

    def flush(self, step: int, saved: int | None) -> None:
        """Fetch the metrics since the last flush; a non-finite loss is a TrainingError naming checkpoint `saved`."""
        if not self.pending:
            return
        fetched, now = jax.device_get(self.pending), time.perf_counter()
        losses = np.array([m["loss"] for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = step - len(losses) + int(np.argmax(~np.isfinite(losses))) + 1
            kept = (f"The last good checkpoint (step {saved}) is in {self.workdir / workdirs.CHECKPOINTS}."
                    if saved is not None else "No checkpoint had been saved yet.")
            raise TrainingError(
                f"non-finite loss at step {bad}; stopped without saving. {kept} Try a lower --lr or --grad-clip."
            )
        timed = len(fetched) - self.untimed
        steps_per_s = timed / (now - self.since) if timed else None
        record = {
            "step": step,
            "loss": float(losses.mean()),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "lr": float(fetched[-1]["lr"]),
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * self.config.batch_size if timed else None,
        }
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.board.scalars(step, {k: v for k, v in record.items() if k != "step" and v is not None})
        rate = f"{record['images_per_s']:.1f} img/s" if timed else "(the compile's step)"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=rate)
        elif self.is_writer:
            print(f"step {step}/{self.config.steps}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3g}  "
                  f"lr {record['lr']:.3g}  {rate}", flush=True)
        self.pending, self.since, self.untimed = [], now, 0

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()


class CheckpointSaver:
    """The run's checkpoints: restores the latest at the start, and saves a step once (after the metrics up to
    it are checked), with an error that says what is still intact when a save fails."""

    def __init__(self, workdir: Path, config: TrainConfig):
        self.folder = workdir / workdirs.CHECKPOINTS
        self.manager = checkpoints.manager(workdir, config.keep_checkpoints)
        self.saved = self.manager.latest_step()

    def restore(self, abstract: TrainState) -> TrainState | None:
        """The latest checkpoint's state, or None if there is none."""
        if self.saved is None:
            return None
        try:
            return checkpoints.restore(self.manager, abstract, self.saved)
        except Exception as e:  # orbax reports a missing item as KeyError, damaged data as ValueError and more
            older = [s for s in self.manager.all_steps() if s < self.saved]
            then = f"resume from step {max(older)}" if older else "start afresh"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise TrainingError(
                f"cannot restore the checkpoint of step {self.saved} in {self.folder}: {reason}\n"
                f"It is damaged or incomplete. Move {self.folder / str(self.saved)} away to {then}."
            ) from e

    def __call__(self, state: TrainState, log: MetricsLog) -> None:
        step = int(state.step)
        log.flush(step, self.saved)
        if self.saved == step:
            return
        try:
            checkpoints.save(self.manager, state)
        except Exception as e:  # a full disk arrives as OSError, or as ValueError from tensorstore
            previous = ("No checkpoint was saved before." if self.saved is None else
                        f"The previous checkpoint (step {self.saved}) is intact.")
            raise TrainingError(
                f"could not save the checkpoint of step {step} in {self.folder}: {e}\n"
                f"{previous} Free disk space (or fix the cause above) and run the same command to resume."
            ) from e
        self.saved = step

    def __enter__(self) -> "CheckpointSaver":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.manager.close()
        except Exception:  # Orbax re-raises a failed save's error here; the run's own error already says it
            if exc_type is None:
                raise


class GridSampler:
    """Draws the run's sample grid from the EMA weights (always the same noise) into samples/step_<step>.png and
    TensorBoard."""

    def __init__(self, workdir: Path, config: TrainConfig, graphdef, schedule: Schedule, board: TensorBoard):
        self.workdir, self.config, self.graphdef, self.schedule, self.board = (
            workdir, config, graphdef, schedule, board)
        self.key = jax.random.fold_in(jax.random.key(config.seed), 1 << 30)
        self.sharding = runtime.sample_sharding(config.num_samples)
        self.settings = sampler_settings(config)

    def __call__(self, state: TrainState) -> None:
        c = self.config
        grid = diffusion.sample(nnx.merge(self.graphdef, state.ema), self.schedule, self.key, c.num_samples,
                                c.image_size, self.settings, batch_sharding=self.sharding)
        if self.board.is_writer:
            step = int(state.step)
            path = self.workdir / workdirs.SAMPLES / f"step_{step:06d}.png"
            pixels = images.save_grid(np.asarray(grid, np.float32), path)
            self.board.image(step, pixels)
