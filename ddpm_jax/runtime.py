"""Where the programs run: processes, devices, the data mesh, XLA's compile options and cache, stop signals.

Everything here touches process-wide state (jax.distributed, JAX's CPU device count, the persistent compile
cache, signal handlers); the trainer and the sample command call it, the math modules never do.
"""

import functools
import os
import signal
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.depthwise import largest_divisor_at_most

# ----------------------------------------------------------------------------------------------------------
# Processes and devices.


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
    batch at once, where one device leaves part of the cores idle between and inside XLA's ops. It changes
    only the CPU backend. It does nothing if JAX_NUM_CPU_DEVICES or XLA_FLAGS already set the count, or if JAX
    has already started its backends (as when called from a program that ran JAX code before). Returns the count
    set, or None.
    """
    if "JAX_NUM_CPU_DEVICES" in os.environ or "device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    count = largest_divisor_at_most(batch_size, _cores())
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends are up: their device count stays
        return None
    return count


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
# Compilation.


def enable_compilation_cache() -> None:
    """Persistent XLA cache, so a second run of the same program compiles in seconds."""
    path = os.environ.get("DDPM_JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "ddpm_jax" / "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# XLA:CPU hands dense convolutions to YNNPACK by default. Through XLA's Eigen convolution instead (oneDNN's
# sgemm inside) the U-Net's dense convolutions with both gradients are faster (docs/perf/conv_paths_intel.md);
# forward-only programs (the sampler) were slower that way, so they keep XLA's default. Dots and reductions stay
# with YNNPACK.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# With one JAX device per core every device is busy at once: Eigen's own threads would only contend.
_ONE_THREAD_PER_DEVICE = {"xla_cpu_multi_thread_eigen": False}


@functools.cache
def training_compiler_options() -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a program that differentiates the model.

    On CPU: dense convolutions through XLA's Eigen path, and single-threaded Eigen when there is one JAX
    device per core (`use_cpu_cores_as_devices`). Elsewhere, or on a jaxlib that does not know
    these options, none. Call it after JAX's backends are set up (it queries them)."""
    if jax.default_backend() != "cpu":
        return {}
    options = dict(_CPU_OPTIONS)
    if jax.local_device_count() >= _cores() > 1:
        options.update(_ONE_THREAD_PER_DEVICE)
    try:  # an option this jaxlib does not know is an error at compile time: drop them all then
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return options


def run_once_compiler_options() -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a program that runs once, such as the model's random
    initialisation. XLA:CPU spends most of such a compile optimising machine code that will run for
    milliseconds, so on CPU LLVM's optimisations are turned off. Results can then differ from the optimised program's by float32 rounding. Elsewhere, none."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


# ----------------------------------------------------------------------------------------------------------
# Stop signals.


class StopSignals:
    """SIGTERM/SIGINT, while in use as a context manager, ask for a clean stop at the next step boundary
    instead of ending the process."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether a signal arrived; in a multi-process run, on any process, so that all stop at the same step."""
        requested = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
        return requested
