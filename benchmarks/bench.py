"""JAX vs the PyTorch reference on the same work, same machine, same thread count, in one process.

    python benchmarks/bench.py [--config default|article] [--json out.json] [--png chart.png]

Times (medians of --repeats runs after warm-up) a training step (AdamW, one t per sample), a forward
pass, and 1000-step DDPM sampling of the batch. Sampling is timed over --sample-steps steps and
scaled to 1000: every step does the same work. Compile time is reported apart: cold, and again from
the persistent compilation cache. PyTorch runs eager and, unless --no-torch-compile, torch.compile.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "default": dict(model="TwoResUNet", dim=32, dim_mults=(1, 2, 4, 8), image_size=32, batch_size=16),
    "article": dict(model="TwoResUNet", dim=64, dim_mults=(1, 2, 4, 8), image_size=128, batch_size=16),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak


class PeakRSS:
    """Peak resident memory above the starting point while the block runs (CPU: both frameworks' heap)."""

    def __init__(self):
        import psutil

        self._proc, self.peak_mb = psutil.Process(), 0.0

    def __enter__(self):
        self._start, self._stop = self._proc.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, (self._proc.memory_info().rss - self._start) / 2**20)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def median_time(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_torch(cfg, args, x_np, t_np, noise_np, compiled: bool):
    import torch

    import ddpm_torch
    from ddpm_torch import training as torch_training

    device = "cuda" if args.device == "gpu" else "cpu"
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    torch.manual_seed(0)
    unet = ddpm_torch.UNETS[cfg["model"]](cfg["dim"], dim_mults=cfg["dim_mults"]).to(device)
    diffusion = ddpm_torch.DiffusionModel(unet, cfg["image_size"], timesteps=1000).to(device)
    opt = torch_training.make_optimizer(diffusion)
    x, noise = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(device) for a in (x_np, noise_np))
    t = torch.from_numpy(t_np).long().to(device)
    step = torch_training.train_step
    forward = unet
    if compiled:
        step, forward = torch.compile(step), torch.compile(unet)
    out = {}
    t0 = time.perf_counter()
    sync(step(diffusion, opt, x, t, noise))
    out["first_step_seconds"] = time.perf_counter() - t0
    for _ in range(args.warmup):
        sync(step(diffusion, opt, x, t, noise))
    with PeakRSS() as mem:
        out["train_step"] = median_time(lambda: step(diffusion, opt, x, t, noise), args.repeats, sync)
    out["peak_rss_mb"] = mem.peak_mb
    with torch.no_grad():
        for _ in range(args.warmup):
            sync(forward(x, t))
        out["forward"] = median_time(lambda: forward(x, t), args.repeats, sync)
    if not compiled:  # the reference's own sampling loop, one p_sample per step
        def sample_share():
            img = torch.randn_like(x)
            for i in reversed(range(1000 - args.sample_steps, 1000)):
                img = diffusion.p_sample(img, i)
            return img

        sample_share()
        out["sample_1000"] = median_time(sample_share, max(3, args.repeats // 2), sync) * 1000 / args.sample_steps
    if device == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def jax_train_setup(cfg, x_np, precision):
    """The trainer's step on `cfg`, set up as train.py runs it: parameters replicated, the batch split over the
    devices. Returns (compile_step, state, x, key, batch_sharding, graphdef): compile_step() traces, lowers and
    compiles a fresh jit of the step and returns (executable, seconds)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddpm_jax import training
    from ddpm_jax.config import PRESETS
    from ddpm_jax.schedules import make_schedule

    # The article's optimizer (AdamW 1e-4, no warm-up or clipping), as the PyTorch side uses; the JAX step
    # also carries the EMA update, which the PyTorch step leaves out.
    config = dataclasses.replace(PRESETS["article"], model=cfg["model"], dim=cfg["dim"], dim_mults=cfg["dim_mults"],
                                 image_size=cfg["image_size"], batch_size=cfg["batch_size"], precision=precision)
    tx = training.make_optimizer(config)
    schedule = make_schedule("linear", 1000)
    mesh = training.data_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, state = training.init_state(config, tx)
    state = jax.device_put(state, replicated)
    x = jax.device_put(x_np, batch_sharding)
    key = jax.random.key(0)

    def compile_step():
        t0 = time.perf_counter()
        step = jax.jit(
            lambda s, b, k: training.train_step(s, b, k, graphdef=graphdef, schedule=schedule, tx=tx, config=config),
            donate_argnums=0,
            out_shardings=(replicated, replicated),
        )
        return step.lower(state, x, key).compile(), time.perf_counter() - t0

    return compile_step, state, x, key, batch_sharding, graphdef


def bench_jax(cfg, args, x_np, noise_np, precision):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ddpm_jax import diffusion
    from ddpm_jax.schedules import make_schedule

    compile_step, state, x, key, batch_sharding, graphdef = jax_train_setup(cfg, x_np, precision)
    sync = jax.block_until_ready
    out = {}

    _, out["compile_seconds"] = compile_step()  # cold: fills the (empty, temporary) persistent cache
    jax.clear_caches()
    compiled, out["compile_seconds_cached"] = compile_step()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["train_step_flops"] = float(cost.get("flops", 0.0)) if cost else 0.0

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], x, key)
        return metrics

    for _ in range(args.warmup):
        sync(one_step())
    with PeakRSS() as mem:
        out["train_step"] = median_time(one_step, args.repeats, sync)
    out["peak_rss_mb"] = mem.peak_mb
    memory = compiled.memory_analysis()
    if memory is not None:
        out["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20

    model = nnx.merge(graphdef, holder["state"].params)
    fwd_graphdef, fwd_state = nnx.split(model)
    forward = jax.jit(lambda s, x, t: nnx.merge(fwd_graphdef, s)(x, t))
    t_B = jax.device_put(jnp.full((x.shape[0],), 500, jnp.int32), batch_sharding)
    for _ in range(args.warmup):
        sync(forward(fwd_state, x, t_B))
    out["forward"] = median_time(lambda: forward(fwd_state, x, t_B), args.repeats, sync)

    share = make_schedule("linear", args.sample_steps)  # same per-step work, fewer steps

    def sample_share():
        return diffusion.sample(model, share, key, x.shape[0], x.shape[1], batch_sharding=batch_sharding)

    sync(sample_share())
    out["sample_1000"] = median_time(sample_share, max(3, args.repeats // 2), sync) * 1000 / args.sample_steps
    if args.device == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        out["peak_device_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return out


def bar_chart(rows, path: Path, title: str):
    """Horizontal bars of JAX time / PyTorch-eager time per workload (PIL only, no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, bar_h, left = 720, 26, 230
    height = 70 + bar_h * len(rows) * 1.4
    img = Image.new("RGB", (width, int(height)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    draw.text((10, 28), "time relative to PyTorch eager (shorter is faster; line = 1.0)", fill="gray")
    scale = (width - left - 60) / max(1.0, max(r for _, r in rows))
    for i, (label, ratio) in enumerate(rows):
        y = 55 + i * bar_h * 1.4
        draw.text((10, y + 6), label, fill="black")
        color = (46, 125, 50) if ratio < 1 else (198, 40, 40)
        draw.rectangle([left, y, left + ratio * scale, y + bar_h], fill=color)
        draw.text((left + ratio * scale + 6, y + 6), f"{ratio:.2f}x", fill="black")
    x1 = left + scale
    draw.line([x1, 50, x1, height - 5], fill="black", width=1)
    img.save(path, optimize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="JAX compute precision")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=20, help="sampling steps timed, scaled to 1000")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="write a bar chart here")
    args = parser.parse_args(argv)

    threads = os.cpu_count()
    # Without it torch's OpenMP threads spin after each op and fight XLA's pool for the same cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    cache = tempfile.mkdtemp(prefix="ddpm_bench_xla_")
    os.environ["DDPM_JAX_COMPILATION_CACHE"] = cache
    import jax

    from ddpm_jax.training import enable_compilation_cache, use_cpu_cores_as_devices

    cfg = CONFIGS[args.config]
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        use_cpu_cores_as_devices(cfg["batch_size"])  # as train.py does: data parallel over the cores
    enable_compilation_cache()
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], cfg["image_size"], cfg["image_size"], 3)
    x_np = rng.uniform(-1, 1, shape).astype(np.float32)
    noise_np = rng.standard_normal(shape).astype(np.float32)
    t_np = rng.integers(0, 1000, cfg["batch_size"])

    results = {"torch_eager": bench_torch(cfg, args, x_np, t_np, noise_np, compiled=False)}
    if args.torch_compile:
        results["torch_compile"] = bench_torch(cfg, args, x_np, t_np, noise_np, compiled=True)
    results["jax"] = bench_jax(cfg, args, x_np, noise_np, args.precision)
    jx, te = results["jax"], results["torch_eager"]
    summary = {
        "config": {**cfg, "dim_mults": list(cfg["dim_mults"]), "name": args.config, "precision": args.precision,
                   "optimizer": "AdamW lr 1e-4 betas (0.9, 0.99) wd 0.01", "threads": threads,
                   "device": args.device, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                   "jax_device": str(jax.devices()[0].device_kind), "jax_devices": jax.device_count(),
                   "torch": torch.__version__, "jax": jax.__version__,
                   "sample_note": f"sampling timed over {args.sample_steps} steps, scaled to 1000"},
        "train_step_ratio_jax_over_torch": jx["train_step"] / te["train_step"],
        "forward_ratio_jax_over_torch": jx["forward"] / te["forward"],
        "sample_ratio_jax_over_torch": jx["sample_1000"] / te["sample_1000"],
        "compile_seconds": jx["compile_seconds"],
        "compile_seconds_cached": jx["compile_seconds_cached"],
        "peak_memory_mb": {side: r.get("peak_device_mb", r["peak_rss_mb"]) for side, r in results.items()},
        "seconds": results,
    }
    if "torch_compile" in results:
        tc = results["torch_compile"]
        summary["train_step_ratio_jax_over_torch_compile"] = jx["train_step"] / tc["train_step"]
        summary["forward_ratio_jax_over_torch_compile"] = jx["forward"] / tc["forward"]
        summary["torch_compile_seconds"] = tc["first_step_seconds"]
    if args.device == "gpu":
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
        if peak:
            summary["mfu"] = jx["train_step_flops"] / jx["train_step"] / peak

    lines = [f"config `{args.config}`: {cfg['model']} dim {cfg['dim']} mults {cfg['dim_mults']}, "
             f"{cfg['image_size']} px, batch {cfg['batch_size']}, {threads} threads, {summary['config']['machine']}",
             "", "| workload | PyTorch eager (s) | " + ("torch.compile (s) | " if args.torch_compile else "")
             + f"JAX {args.precision} (s) | JAX / eager |", "|---|---|" + ("---|" if args.torch_compile else "") + "---|---|"]
    for name, label in (("train_step", "train step"), ("forward", "forward"), ("sample_1000", "DDPM sampling, 1000 steps")):
        tc_cell = f"{results['torch_compile'][name]:.3f} | " if args.torch_compile and name in results["torch_compile"] else ("- | " if args.torch_compile else "")
        lines.append(f"| {label} | {te[name]:.3f} | {tc_cell}{jx[name]:.3f} | {jx[name] / te[name]:.2f} |")
    lines += ["", f"JAX compile: {jx['compile_seconds']:.1f} s cold, {jx['compile_seconds_cached']:.1f} s from the "
              f"persistent cache" + (f"; torch.compile first step {summary['torch_compile_seconds']:.0f} s" if args.torch_compile else "")]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.png:
        rows = [("train step", summary["train_step_ratio_jax_over_torch"]),
                ("forward", summary["forward_ratio_jax_over_torch"]),
                ("DDPM sampling (1000 steps)", summary["sample_ratio_jax_over_torch"])]
        bar_chart(rows, Path(args.png), f"JAX {args.precision} vs PyTorch eager - {lines[0].split(': ', 1)[1]}")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
