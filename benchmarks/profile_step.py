"""Where the JAX train step spends its time, by kind of work, on a GPU or a CPU.

    python benchmarks/profile_step.py [--config article|default|tiny] [--precision fp32] [--steps 5] [--out prof/]

Compiles the trainer's step for a bench.py config (on a CPU as train.py runs it: one device per core, the
training compile options), runs a few warm-up steps, then traces --steps more with `jax.profiler` (a
Perfetto trace in --out, also viewable at ui.perfetto.dev) and prints the time per step by class:

* GPU: kernel time. Each cuDNN convolution call is classed as depthwise or dense (from
  `feature_group_count` in the compiled HLO) and as forward, input gradient or weight gradient by the
  cuDNN call it is (XLA writes the input gradient of a depthwise convolution as a forward call);
  everything else as XLA reductions or other work.
* CPU: each device thread's time, under XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (set here), which
  makes XLA:CPU write one event per operation. An operation is classed by what its HLO computes: dense
  convolutions, the depthwise convolution's own operations (ddpm_jax/depthwise.py), all-reduce, layout
  transposes and copies, and the rest by where its op_name says it comes from: the forward pass
  (`jvp(`), the backward pass (`transpose(jvp(`) or outside the loss (optimizer, EMA, noise). Eigen's
  convolutions are not traced for their whole length, so a device's busy time that no event covers is
  counted as dense convolutions.
"""

import argparse
import collections
import gzip
import json
import os
import re
import statistics
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
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


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


DENSE = "dense convolutions traced (YNNPACK's; Eigen's dispatch)"
UNTRACED = "not covered by any event: Eigen's dense convolutions (and the gaps between steps)"


def cpu_op_classes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> class, for every instruction of an XLA:CPU module (see the module docstring)."""
    bodies, current = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and (m := _COMPUTATION.match(line)):
            current = m.group(1)
        elif current:
            bodies[current].append(line)
    classes = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, text = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", text)
        body = "\n".join(bodies.get(called.group(1), [])) if called else ""
        op_name = (re.search(r'op_name="([^"]*)"', text) or re.search(r'op_name="([^"]*)"', body) or re.match("()", ""))[1]
        if name.startswith(("all-reduce", "reduce-scatter", "all-gather")):
            classes[name] = "all-reduce of the gradients (waiting for the other devices included)"
        elif " convolution(" in text or " convolution(" in body:
            classes[name] = DENSE
        elif "_shift_accumulate" in op_name or "_kernel_grad" in op_name:
            classes[name] = "depthwise convolutions (depthwise.py: forward and both gradients)"
        elif name.startswith(("transpose", "copy")):
            classes[name] = "layout transposes and copies"
        elif "transpose(jvp(" in op_name:
            classes[name] = "other backward-pass operations (GELU, GroupNorm, adds, reductions)"
        elif "jvp(" in op_name:
            classes[name] = "other forward-pass operations (GELU, GroupNorm, adds)"
        else:
            classes[name] = "outside the loss: optimizer, EMA, noise"
    return classes


def summarize_cpu(trace: dict, hlo_text: str, steps: int) -> list[tuple[str, float]]:
    """(class, ms per step and device) over XLA:CPU's device threads, largest first.

    Only operations that no other operation contains are counted (a while loop's body is inside the
    loop). A device thread is one whose operations take at least a tenth of the busiest thread's time;
    its span, from its first event to its last, less its counted operations, is the time no event
    covers: Eigen's convolutions (and the short gaps between steps)."""
    classes = cpu_op_classes(hlo_text)
    threads = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and "ts" in e:
            threads[e["tid"]].append(e)
    per_thread = {}
    for tid, events in threads.items():
        ops = sorted((e for e in events if e["name"] in classes), key=lambda e: (e["ts"], -e["dur"]))
        counted, end = collections.Counter(), float("-inf")
        for e in ops:
            if e["ts"] >= end:  # top level: not inside the previous operation
                counted[classes[e["name"]]] += e["dur"]
                end = e["ts"] + e["dur"]
        span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
        per_thread[tid] = (counted, span)
    busiest = max((sum(c.values()) for c, _ in per_thread.values()), default=0)
    devices = [(c, span) for c, span in per_thread.values() if busiest and sum(c.values()) >= busiest / 10]
    if not devices:
        raise SystemExit("error: the trace has no XLA:CPU operation events; run with "
                         "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (this script sets it before JAX starts)")
    total = collections.Counter()
    for counted, span in devices:
        total.update(counted)
        total[UNTRACED] += max(0.0, span - sum(counted.values()))
    return [(name, us / 1000 / steps / len(devices)) for name, us in total.most_common()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="article")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="JAX compute precision")
    p.add_argument("--steps", type=int, default=5, help="traced steps (after 3 warm-up and 7 timed)")
    p.add_argument("--out", type=Path, default=Path("prof"), help="folder for the trace and the compiled HLO")
    p.add_argument("--md", type=Path, help="also write the table here")
    args = p.parse_args(argv)

    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax
    import numpy as np

    from bench import cpu_info, machine_name
    from ddpm_jax.runtime import enable_compilation_cache, use_cpu_cores_as_devices

    cfg = CONFIGS[args.config]
    use_cpu_cores_as_devices(cfg["batch_size"])  # as train.py does; it changes only the CPU backend
    enable_compilation_cache()  # DDPM_JAX_COMPILATION_CACHE, as train.py
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
    trace = json.load(gzip.open(trace_path))
    gpu = jax.default_backend() == "gpu"
    rows = summarize(trace, hlo_text, args.steps) if gpu else summarize_cpu(trace, hlo_text, args.steps)
    busy = sum(ms for _, ms in rows)
    where = jax.devices()[0].device_kind if gpu else f"{machine_name({'cpu': cpu_info()})}, {jax.device_count()} JAX devices"
    lines = [f"{where}, `--config {args.config}`, {args.precision}, batch {cfg['batch_size']}: step median "
             f"{statistics.median(times) * 1e3:.1f} ms, {'GPU' if gpu else 'each device'} busy {busy:.1f} ms per step",
             "", f"| {'GPU' if gpu else 'device'} time per train step | ms | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / busy:.0%} |" for name, ms in rows]
    print(f"(trace: {trace_path})\n" + "\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
