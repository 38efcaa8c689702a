"""The deterministic batch stream: the batch for a step is a pure function of (seed, step).

So a resumed run sees exactly the batches it would have seen, on any number of processes: `batch_indices` and
`flip_mask` give the global batch's examples and flips, `get_batch` this process's share of it, and `Prefetcher`
puts the next batches on the device from a background thread.
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 0, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of the global batch at `step`: a pure function of its arguments.

    Global position p = step * batch_size + j is example perm_e[p % N] of epoch e = p // N, where
    perm_e is a permutation drawn from (seed, e): every example once per epoch, whatever the step.
    """
    if num_examples < 1 or batch_size < 1 or seed < 0 or step < 0:
        raise ValueError(f"need num_examples, batch_size >= 1 and seed, step >= 0; got "
                         f"{num_examples}, {batch_size}, {seed}, {step}")
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_examples)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(num_examples, seed, int(e))[offsets[sel]]
    return out


def flip_mask(batch_size: int, seed: int, step: int) -> np.ndarray:
    """Which examples of the global batch at `step` are flipped left-right: bool (batch_size,)."""
    return np.random.default_rng([seed, 1, step]).random(batch_size) < 0.5


def get_batch(images: np.ndarray, batch_size: int, seed: int, step: int, *, flip: bool = True,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's share of the global batch at `step`: float32 (B / process_count, H, W, 3) in [-1, 1].

    `batch_size` is the global batch; every process computes the same global indices and flips and
    keeps the contiguous slice [i * B / n, (i + 1) * B / n). Pixels map as x / 255 * 2 - 1, the
    reference's ToTensor then normalize_to_neg_one_to_one.
    """
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"batch_size {batch_size} must split evenly over {process_count} processes "
                         f"(process_index {process_index})")
    local = batch_size // process_count
    lo, hi = process_index * local, (process_index + 1) * local
    x_BHWC = images[batch_indices(len(images), batch_size, seed, step)[lo:hi]]
    if flip:
        mask = flip_mask(batch_size, seed, step)[lo:hi]
        x_BHWC[mask] = x_BHWC[mask, :, ::-1]
    return x_BHWC.astype(np.float32) / 255.0 * 2.0 - 1.0


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _place(batch, sharding):
    import jax

    if sharding is None:
        return jax.device_put(batch)
    if jax.process_count() > 1:
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)
    return jax.device_put(batch, sharding)


def _produce(fn, sharding, step: int, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetcher's thread: put (step, device batch) for consecutive steps, or a _Failure, on `out`."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            if not put((step, _place(fn(step), sharding))):
                return
            step += 1
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        put(_Failure(e))


class Prefetcher:
    """Iterate (step, device batch) for step = start_step, start_step + 1, ...

    A daemon thread calls `fn(step)` for the host batch and puts it on the device ahead of use, at
    most `depth` batches ahead. With a `sharding`, one process uses `jax.device_put(batch, sharding)`
    and several processes `jax.make_array_from_process_local_data(sharding, local_batch)`. An
    exception in `fn` or in the transfer is raised by the next `next()`. Use as a context manager,
    or call `close()`.
    """

    def __init__(self, fn: Callable[[int], np.ndarray], start_step: int, sharding=None, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread holds no reference to self, so an abandoned Prefetcher is collected and stops it.
        self._thread = threading.Thread(
            target=_produce, args=(fn, sharding, start_step, self._queue, self._stop), daemon=True,
            name="ddpm-prefetch")
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread and drop the batches it prepared. Safe to call more than once."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()
