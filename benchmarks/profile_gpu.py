"""Where the JAX train step spends its GPU time, by kind of work.

    python benchmarks/profile_gpu.py [--config article] [--precision fp32] [--steps 5] [--out prof/]

Compiles the trainer's step for a bench.py config, runs a few warm-up steps, then traces --steps more
with `jax.profiler` (a Perfetto trace in --out, also viewable at ui.perfetto.dev) and prints the GPU
kernel time per step grouped by what the kernels compute: each cuDNN convolution call is classed as
depthwise or dense (from `feature_group_count` in the compiled HLO) and as forward, input gradient or
weight gradient by the cuDNN call it is (XLA writes the input gradient of a depthwise convolution as a
forward call); everything else as XLA reductions or other work. GPU only: the classes are cuDNN's.
(XLA:CPU writes one trace event per operation only under XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true;
README's CPU breakdown was read from such a trace.)
"""

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import time
from pathlib import Path

from bench import CONFIGS, jax_train_setup

CUDNN_KINDS = {
    "__cudnn$convForward": "forward",
    "__cudnn$convBiasActivationForward": "forward",
    "__cudnn$convBackwardInput": "input gradient",
    "__cudnn$convBackwardFilter": "weight gradient",
}
_CUSTOM_CALL = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*custom_call_target=\"([^\"]+)\"")


def conv_classes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "depthwise conv, weight gradient" etc., for every cuDNN convolution call."""
    classes = {}
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.match(line)
        if not m or m.group(2) not in CUDNN_KINDS:
            continue
        groups = re.search(r"feature_group_count=(\d+)", line)
        shape = "depthwise" if groups and int(groups.group(1)) > 1 else "dense"
        classes[m.group(1)] = f"{shape} conv, {CUDNN_KINDS[m.group(2)]}"
    return classes


def summarize(trace: dict, hlo_text: str, steps: int) -> list[tuple[str, float]]:
    """(class, ms per step) of the GPU kernels in a Chrome/Perfetto trace, largest first."""
    gpu_pids = {e["pid"] for e in trace["traceEvents"]
                if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in e["args"]["name"]}
    if not gpu_pids:
        raise SystemExit("error: the trace has no GPU device events (this summary classes cuDNN calls); "
                         "run this on a machine with an NVIDIA GPU")
    classes = conv_classes(hlo_text)
    total = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or e["pid"] not in gpu_pids:
            continue
        op = e.get("args", {}).get("hlo_op", "")
        total[classes.get(op) or ("XLA reductions" if "reduce" in e["name"] else "other")] += e["dur"]
    return [(name, us / 1000 / steps) for name, us in total.most_common()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="article")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="JAX compute precision")
    p.add_argument("--steps", type=int, default=5, help="traced steps (after 3 warm-up and 7 timed)")
    p.add_argument("--out", type=Path, default=Path("prof"), help="folder for the trace and the compiled HLO")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    if jax.default_backend() != "gpu":
        sys.exit(f"error: JAX's backend is {jax.default_backend()!r}; this profile needs a GPU")
    cfg = CONFIGS[args.config]
    shape = (cfg["batch_size"], cfg["image_size"], cfg["image_size"], 3)
    x_np = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    compile_step, state, x, key, _, _ = jax_train_setup(cfg, x_np, args.precision)
    step, _ = compile_step()
    args.out.mkdir(parents=True, exist_ok=True)
    hlo_text = step.as_text()
    (args.out / "hlo.txt").write_text(hlo_text)
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        state, _ = step(state, x, key)
        jax.block_until_ready(state)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    with jax.profiler.trace(str(args.out), create_perfetto_trace=True):
        for _ in range(args.steps):
            state, _ = step(state, x, key)
        jax.block_until_ready(state)
    trace_path = max(args.out.glob("**/perfetto_trace.json.gz"), key=lambda q: q.stat().st_mtime)
    rows = summarize(json.load(gzip.open(trace_path)), hlo_text, args.steps)
    busy = sum(ms for _, ms in rows)
    print(f"{jax.devices()[0].device_kind}, {args.config} config, {args.precision}, batch {cfg['batch_size']}: "
          f"step median {statistics.median(times) * 1e3:.1f} ms, GPU busy {busy:.1f} ms per step "
          f"(trace: {trace_path})\n")
    print("| GPU time per train step | ms | share |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / busy:.0%} |")


if __name__ == "__main__":
    main()
