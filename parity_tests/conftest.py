"""Shared set-up of the parity suite: float32 everywhere, highest matmul precision, deterministic torch."""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.use_deterministic_algorithms(True)

import ddpm_torch  # noqa: E402
from ddpm_jax.convert import infer_config, load_torch_state  # noqa: E402
from ddpm_jax.unets import build_model  # noqa: E402


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def torch_and_flax(variant: str, seed: int = 0, **kwargs):
    """A seeded reference U-Net and the Flax U-Net holding its converted weights."""
    torch.manual_seed(seed)
    torch_model = ddpm_torch.UNETS[variant](**kwargs)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    flax_model = load_torch_state(build_model(infer_config(state)), state)
    return torch_model, flax_model


def replayed(key, indices, shape) -> tuple[np.ndarray, np.ndarray]:
    """x_T ~ N(0, 1) and the noise of each of `indices` as diffusion.sample_loop draws them from `key`: x_T from
    the first half of split(key), the noise of step t (a time, or EDM's step index) from fold_in(second half, t),
    all in one program."""
    init_key, step_key = jax.random.split(key)
    draw = jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(step_key, t), shape, jax.numpy.float32))
    x_T = np.asarray(jax.random.normal(init_key, shape, jax.numpy.float32))
    return x_T, np.asarray(jax.jit(draw)(jax.numpy.asarray(indices, jax.numpy.int32)))


@pytest.fixture(scope="session")
def tiny_pair():
    """TwoResUNet dim 8, two levels: small enough for chained steps on two CPU cores."""
    return torch_and_flax("TwoResUNet", dim=8, dim_mults=(1, 2))


# Worst error seen per concern, printed at the end of the run so every run reports its margins.
_WORST: dict[str, tuple[float, float, str]] = {}


def check(concern: str, actual, expected, tolerance: float, metric: str = "abs") -> float:
    """Assert `metric` error <= tolerance and record it. abs: max |a - e|; rel: max |a - e| / max |e|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{concern}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{concern}: NaNs differ"
    finite = ~np.isnan(expected)
    error = float(np.abs(actual - expected)[finite].max(initial=0.0))
    if metric == "rel":
        scale = float(np.abs(expected)[finite].max(initial=0.0))
        assert scale > 0, f"{concern}: the reference is all zeros, the comparison would prove nothing"
        error /= scale
    _record(concern, error, tolerance, metric)
    assert error <= tolerance, f"{concern}: {metric} error {error:.3e} > {tolerance:.0e}"
    return error


def _record(concern: str, error: float, tolerance: float, metric: str) -> None:
    worst = _WORST.get(concern, (-1.0, tolerance, metric))
    _WORST[concern] = (max(worst[0], error), tolerance, metric)


# Under pytest-xdist (make test) the parity tests run in a worker process: it hands its worst errors to the
# process that prints the summary.
def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity_worst"] = dict(_WORST)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for concern, (worst, tolerance, metric) in getattr(node, "workeroutput", {}).get("parity_worst", {}).items():
        _record(concern, worst, tolerance, metric)


def pytest_terminal_summary(terminalreporter, exitstatus):
    if _WORST:
        terminalreporter.section("parity: worst error per concern (float32, highest matmul precision)")
        for concern, (error, tolerance, metric) in sorted(_WORST.items()):
            terminalreporter.write_line(f"{concern:<34} {metric} {error:.2e}  (tolerance {tolerance:.0e})")
    if path := terminalreporter.config.getoption("parity_record"):
        _write_record(Path(path), int(exitstatus))
        terminalreporter.write_line(f"parity: wrote {path}")


def _write_record(path: Path, exitstatus: int) -> None:
    """The figures docs/parity.md quotes, with what made them: another CPU or version rounds differently."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout.splitlines()
        if line.startswith("Model name:")), platform.processor())
    packages = ("jax", "jaxlib", "flax", "numpy", "torch", "diffusers")
    record = {
        "command": shlex.join([os.path.relpath(sys.executable), "-m", "pytest", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu, "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), **{name: version(name) for name in packages}},
        "exitstatus": exitstatus,
        "concerns": {concern: {"worst": error, "tolerance": tolerance, "metric": metric}
                     for concern, (error, tolerance, metric) in sorted(_WORST.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
