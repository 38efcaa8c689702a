"""JAX against PyTorch on the same work, timed alternately so that a machine whose speed drifts cannot bias the ratio.

    python benchmarks/bench.py [--config default|article|tiny] [--device cpu|gpu] [--precision fp32|bf16|both]
                               [--rounds 12] [--no-torch-compile] [--json F] [--md F] [--png F]
    python benchmarks/bench.py --from-json F [--md F] [--png F]     # the table and chart of a saved record

Peers, each in a worker process of its own with its framework's default threading, as users run them:

* fp32: PyTorch eager, torch.compile, JAX (on a CPU, one JAX device per core, as train.py runs);
* bf16: PyTorch eager and torch.compile under `torch.autocast(bfloat16)`, JAX computing in bfloat16; both
  keep float32 parameters and optimizer state;
* optional JAX fp32 peers that time the train step only: --jax-depthwise (another depthwise formulation) and
  --jax-objective (another training objective: a prediction target, min-SNR weighting, offset noise), each
  against PyTorch eager and against the default JAX peer.

Workloads: a training step (AdamW as the article's trainer, one t per sample; the JAX step also updates
its EMA), a forward pass of the U-Net, and DDPM sampling of the batch, timed over --sample-steps steps and
scaled to 1000 (every step is the same work; torch.compile is not timed sampling).

Method: every peer builds, compiles and warms up first. Then, in each of --rounds rounds, every workload
runs once on every peer, one peer after the other, the order reversed every other round; a "run" is as
many back-to-back calls as fill about --turn-seconds (at least one), and its time the median call. Each
round gives one ratio JAX / peer. Reported: the median of the per-round ratios with their min and max,
and the median absolute times. A torch.compile peer whose compile and warm-up pass --compile-cap
seconds is dropped with a note. The JSON records the machine (CPU model, cores, AVX-512, AMX; the
GPU's name) and the library versions.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

CONFIGS = {
    "default": dict(model="TwoResUNet", dim=32, dim_mults=(1, 2, 4, 8), image_size=32, batch_size=16),
    "article": dict(model="TwoResUNet", dim=64, dim_mults=(1, 2, 4, 8), image_size=128, batch_size=16),
    "tiny": dict(model="OneResUNet", dim=8, dim_mults=(1,), image_size=16, batch_size=4),  # for tests
}
WORKLOADS = {"train_step": "train step", "forward": "forward", "sample_1000": "DDPM sampling, 1000 steps"}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    framework: str  # "torch" | "jax"
    precision: str  # "fp32" | "bf16"
    compiled: bool = False  # torch.compile
    depthwise: str | None = None  # JAX: force this ddpm_jax.depthwise formulation (DDPM_JAX_DEPTHWISE)
    objective: tuple = ()  # JAX: TrainConfig fields of another training objective, as (name, value) pairs

    @property
    def workloads(self):
        if self.depthwise or self.objective:  # only the train step differs from the default JAX peer's
            return ["train_step"]
        return [w for w in WORKLOADS if not (self.compiled and w == "sample_1000")]


PEERS = {
    "fp32": [Peer("PyTorch eager", "torch", "fp32"), Peer("torch.compile", "torch", "fp32", True),
             Peer("JAX", "jax", "fp32")],
    "bf16": [Peer("PyTorch eager, autocast bf16", "torch", "bf16"),
             Peer("torch.compile, autocast bf16", "torch", "bf16", True), Peer("JAX bf16", "jax", "bf16")],
}


# ----------------------------------------------------------------------------------------------------------
# The machine.


def cpu_info() -> dict:
    """CPU model, usable cores and the vector/matrix extensions that decide which kernels run (Linux)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def field(name):  # the first processor's entry
        m = re.search(rf"^{name}\s*:\s*(.*)$", text, re.M)
        return m.group(1).strip() if m else ""

    flags = set(field("flags").split())
    return {
        "cpu_model": field("model name") or platform.processor() or platform.machine(),
        "vendor": field("vendor_id"),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine_name(machine: dict) -> str:
    cpu = machine["cpu"]
    ext = ", ".join(e for e, on in (("AVX-512", cpu["avx512"]), ("AMX", cpu["amx"])) if on) or "no AVX-512"
    name = f"{cpu['cpu_model']} ({cpu['cores']} cores, {ext})"
    return f"{machine['gpu']} (host: {name})" if machine.get("gpu") else name


# ----------------------------------------------------------------------------------------------------------
# Workers: one process per peer.


def _timed(fn, sync):
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


class Runner:
    """A peer's workloads as zero-argument callables (`self.fns`), each synchronised by `self.sync`."""

    fns: dict
    info: dict

    def sync(self, result):
        return result

    def warm_up(self, warmup: int, turn_seconds: float):
        """Warm-up calls, then the number of calls per run: as many as fill `turn_seconds`, at least one."""
        self.calls = {}
        for name, fn in self.fns.items():
            seconds = [_timed(fn, self.sync) for _ in range(max(1, warmup))]
            self.calls[name] = max(1, min(50, math.floor(turn_seconds / max(seconds[-1], 1e-6))))

    def run(self, workload: str) -> float:
        return statistics.median(_timed(self.fns[workload], self.sync) for _ in range(self.calls[workload]))


class TorchRunner(Runner):
    def __init__(self, peer: Peer, cfg: dict, opts: dict):
        import torch

        import ddpm_torch
        from ddpm_torch import training

        device = "cuda" if opts["device"] == "gpu" else "cpu"
        if device == "cuda":
            self.sync = lambda _: torch.cuda.synchronize()
        dtype = torch.bfloat16 if peer.precision == "bf16" else None
        torch.manual_seed(0)
        unet = ddpm_torch.UNETS[cfg["model"]](cfg["dim"], dim_mults=cfg["dim_mults"]).to(device)
        diffusion = ddpm_torch.DiffusionModel(unet, cfg["image_size"], timesteps=1000).to(device)
        opt = training.make_optimizer(diffusion)
        x, noise, t = (torch.from_numpy(a).to(device) for a in inputs(cfg, "NCHW"))
        step, forward = training.train_step, unet
        if peer.compiled:
            step, forward = torch.compile(step), torch.compile(unet)

        def autocast():
            return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype is not None)

        def forward_call():
            with torch.no_grad(), autocast():
                return forward(x, t)

        def sample_share():  # the reference's own loop, one p_sample per step
            with torch.no_grad(), autocast():
                img = torch.randn_like(x)
                for i in reversed(range(1000 - opts["sample_steps"], 1000)):
                    img = diffusion.p_sample(img, i)
                return img

        t0 = time.perf_counter()
        self.sync(step(diffusion, opt, x, t, noise, autocast_dtype=dtype))
        self.info = {"first_step_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
        fns = {"train_step": lambda: step(diffusion, opt, x, t, noise, autocast_dtype=dtype),
               "forward": forward_call, "sample_1000": sample_share}
        self.fns = {w: fns[w] for w in peer.workloads}
        if device == "cuda":
            self.info["gpu"] = torch.cuda.get_device_name()
            self._peak = lambda: torch.cuda.max_memory_allocated() / 2**20

    def peak_device_mb(self):
        return self._peak() if hasattr(self, "_peak") else None


class JaxRunner(Runner):
    def __init__(self, peer: Peer, cfg: dict, opts: dict):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from ddpm_jax import diffusion
        from ddpm_jax.schedules import make_schedule

        self.sync = jax.block_until_ready
        x_np, _, _ = inputs(cfg, "NHWC")
        compile_step, state, x, key, batch_sharding, graphdef = jax_train_setup(cfg, x_np, peer.precision, peer.objective)
        self.info = {}
        _, self.info["compile_seconds"] = compile_step()  # cold: fills the (empty, temporary) persistent cache
        jax.clear_caches()
        step, self.info["compile_seconds_cached"] = compile_step()
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.info["train_step_flops"] = float(cost.get("flops", 0.0)) if cost else 0.0
        self.info["jax_devices"] = jax.device_count()
        self.info["jax_device_kind"] = jax.devices()[0].device_kind
        holder = {"state": state}

        def train_step():
            holder["state"], metrics = step(holder["state"], x, key)
            return metrics

        # The forward and the sampler get their own copy of the weights: the train step donates its state.
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))
        fwd_graphdef, fwd_state = nnx.split(model)
        forward = jax.jit(lambda s, x, t: nnx.merge(fwd_graphdef, s)(x, t))
        t_B = jax.device_put(jnp.full((x.shape[0],), 500, jnp.int32), batch_sharding)
        share = make_schedule("linear", opts["sample_steps"])  # the same per-step work, fewer steps
        ddpm = diffusion.sampler_settings("ddpm", timesteps=opts["sample_steps"])

        def sample_share():
            return diffusion.sample(model, share, key, x.shape[0], x.shape[1], ddpm, batch_sharding=batch_sharding)

        fns = {"train_step": train_step, "forward": lambda: forward(fwd_state, x, t_B), "sample_1000": sample_share}
        self.fns = {w: fns[w] for w in peer.workloads}  # only these are warmed up, so only these compile
        if opts["device"] == "gpu":
            self.info["gpu"] = jax.devices()[0].device_kind
            self._device = jax.devices()[0]

    def peak_device_mb(self):
        if not hasattr(self, "_device"):
            return None
        return (self._device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20


def inputs(cfg: dict, layout: str):
    """The same images, noise and timesteps for every peer: (x, noise, t), x and noise in `layout`."""
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], cfg["image_size"], cfg["image_size"], 3)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 1000, cfg["batch_size"])
    if layout == "NCHW":
        x, noise = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in (x, noise))
    return x, noise, t


def objective_fields(spec: str) -> tuple:
    """TrainConfig fields of an objective named as experiments/compare_objectives.py names its arms: a prediction
    (eps, x0, v), then optionally +min-snr (gamma 5) and +offset (0.1), e.g. v+min-snr."""
    prediction, *extras = spec.split("+")
    if prediction not in ("eps", "x0", "v") or any(e not in ("min-snr", "offset") for e in extras):
        raise ValueError(f"--jax-objective {spec}: expected eps, x0 or v, then optionally +min-snr and +offset")
    return (("prediction", prediction), ("loss_weight", "min-snr" if "min-snr" in extras else "none")) + (
        (("offset_noise", 0.1),) if "offset" in extras else ())


def jax_train_setup(cfg, x_np, precision, objective=()):
    """The trainer's step on `cfg`, set up as train.py runs it: parameters replicated, the batch split over the
    devices. Returns (compile_step, state, x, key, batch_sharding, graphdef): compile_step() traces, lowers and
    compiles a fresh jit of the step and returns (executable, seconds)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddpm_jax import runtime, train_state
    from ddpm_jax.config import PRESETS
    from ddpm_jax.schedules import make_schedule

    # The article's optimizer (AdamW 1e-4, no warm-up or clipping), as the PyTorch side uses; the JAX step
    # also carries the EMA update, which the PyTorch step leaves out.
    config = dataclasses.replace(PRESETS["article"], model=cfg["model"], dim=cfg["dim"], dim_mults=cfg["dim_mults"],
                                 image_size=cfg["image_size"], batch_size=cfg["batch_size"], precision=precision,
                                 **dict(objective))
    tx = train_state.make_optimizer(config)
    schedule = make_schedule("linear", 1000)
    mesh = runtime.data_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, abstract = nnx.eval_shape(lambda: train_state.init_state(config, tx))
    # Weights drawn with numpy at PyTorch's scale (U(+-1/sqrt(fan_in))): XLA:CPU takes 10-20 s to compile the
    # model's own random initialisation, which a timing does not need. The optimizer state is initialised by JAX.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: (rng.uniform(-1, 1, a.shape) / np.sqrt(max(1, int(np.prod(a.shape[:-1]))))).astype(a.dtype),
        abstract.params)
    state = jax.jit(lambda p: train_state.TrainState(jnp.zeros((), jnp.int32), p, jax.tree.map(jnp.copy, p), tx.init(p)),
                    out_shardings=replicated)(params)
    x = jax.device_put(x_np, batch_sharding)
    key = jax.random.key(0)

    def compile_step():
        t0 = time.perf_counter()
        step = train_state.jit_train_step(config, graphdef, schedule, tx, replicated)
        return step.lower(state, x, key).compile(), time.perf_counter() - t0

    return compile_step, state, x, key, batch_sharding, graphdef


def worker(conn, peer: Peer, cfg: dict, opts: dict):
    """Build the peer, warm it up, report "ready", then run one workload per request until told to stop."""
    try:
        if peer.depthwise:
            os.environ["DDPM_JAX_DEPTHWISE"] = peer.depthwise
        if peer.framework == "jax":
            if opts["device"] == "cpu":
                os.environ["JAX_PLATFORMS"] = "cpu"
            else:  # leave the GPU's memory to the PyTorch workers too
                os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            os.environ["DDPM_JAX_COMPILATION_CACHE"] = opts["compilation_cache"]
            import jax

            from ddpm_jax.runtime import enable_compilation_cache, use_cpu_cores_as_devices

            if opts["device"] == "cpu":
                use_cpu_cores_as_devices(cfg["batch_size"])  # as train.py does: data parallel over the cores
            elif jax.default_backend() != "gpu":
                raise RuntimeError(f"--device gpu, but JAX's backend is {jax.default_backend()!r}")
            enable_compilation_cache()
            runner = JaxRunner(peer, cfg, opts)
        else:
            runner = TorchRunner(peer, cfg, opts)
        runner.warm_up(opts["warmup"], opts["turn_seconds"])
        conn.send(("ready", {**runner.info, "calls_per_run": runner.calls}))
        while (workload := conn.recv()) is not None:
            scale = 1000 / opts["sample_steps"] if workload == "sample_1000" else 1.0
            conn.send(("time", runner.run(workload) * scale))
        import resource

        conn.send(("done", {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "peak_device_mb": runner.peak_device_mb()}))
    except BaseException:  # noqa: BLE001  (the parent reports it)
        conn.send(("error", traceback.format_exc()))


class PeerProcess:
    def __init__(self, peer: Peer, cfg: dict, opts: dict):
        ctx = multiprocessing.get_context("spawn")
        self.peer, self.conn = peer, None
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, peer, cfg, opts), daemon=True)
        self.process.start()
        self.started = time.perf_counter()

    def receive(self, timeout: float | None = None):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.peer.name}: no answer within {timeout:.0f} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.peer.name} failed:\n{value}")
        return value

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)


# ----------------------------------------------------------------------------------------------------------
# Statistics and reports.


def ratio_summary(jax_times, peer_times) -> dict:
    """Per-round ratios JAX / peer (the two lists are paired by round): median, min and max."""
    ratios = [j / p for j, p in zip(jax_times, peer_times)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def comparisons(peers: list[Peer]):
    """(JAX peer, other peer, label) pairs: JAX against every PyTorch peer of its precision; each forced depthwise
    formulation and each other objective against PyTorch eager and against JAX's default; and where both precisions ran, JAX bf16
    against PyTorch eager fp32 as an extra, labelled, row."""
    def first(**match):
        return next((p for p in peers if all(getattr(p, k) == v for k, v in match.items())), None)

    eager32, jax32 = first(framework="torch", precision="fp32", compiled=False), first(name="JAX")
    out = []
    for jax_peer in (p for p in peers if p.framework == "jax"):
        others = ([p for p in (eager32, jax32) if p] if jax_peer.depthwise or jax_peer.objective else
                  [p for p in peers if p.framework == "torch" and p.precision == jax_peer.precision])
        out += [(jax_peer, other, f"{jax_peer.name} / {other.name}") for other in others]
    jax16 = first(framework="jax", precision="bf16")
    if eager32 and jax16:
        out.append((jax16, eager32, f"{jax16.name} / {eager32.name} fp32 (mixed precisions)"))
    return out


def markdown(summary: dict) -> str:
    cfg, m = summary["config"], summary["machine"]
    lines = [f"`--config {cfg['name']}`: {cfg['model']} dim {cfg['dim']} mults {tuple(cfg['dim_mults'])}, "
             f"{cfg['image_size']} px, batch {cfg['batch_size']}, on {machine_name(m)}; "
             f"{summary['rounds']} alternating rounds", "",
             "| workload | JAX / peer | ratio: median (min-max) | peer (s) | JAX (s) |", "|---|---|---|---|---|"]
    for row in summary["ratios"]:
        r = row["ratio"]
        lines.append(f"| {WORKLOADS[row['workload']]} | {row['label']} | **{r['median']:.2f}** ({r['min']:.2f}-{r['max']:.2f}) "
                     f"| {row['peer_seconds']:.4g} | {row['jax_seconds']:.4g} |")
    for name, info in summary["peers"].items():
        if "compile_seconds" in info:
            lines.append(f"\n{name}: compile {info['compile_seconds']:.1f} s cold, {info['compile_seconds_cached']:.1f} s "
                         f"from the persistent cache (tracing and lowering included)")
        elif "first_step_seconds" in info and "compile" in name:
            lines.append(f"\n{name}: first step (compile) {info['first_step_seconds']:.0f} s")
    lines += [f"\n{note}" for note in summary["notes"]]
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path):
    """Median JAX / peer time ratio per row as a bar, the min-max of the rounds as a whisker, on a ratio axis with a
    line at 1.0 (PIL only, so that the GPU check needs no plotting library)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
        except TypeError:
            return ImageFont.load_default()

    text_font, small = font(15), font(13)
    rows = summary["ratios"]
    cfg, m = summary["config"], summary["machine"]
    titles = [f"Time of JAX / time of peer: bench.py --config {cfg['name']} ({cfg['model']} dim {cfg['dim']}, "
              f"mults {tuple(cfg['dim_mults'])}, {cfg['image_size']} px, batch {cfg['batch_size']})",
              f"on {machine_name(m)}; bar: median of {summary['rounds']} alternating rounds, whisker: min-max; "
              f"below 1.0 JAX is faster"]
    width, bar_h, left, top_y = 1200, 22, 520, 70
    step_y = int(bar_h * 1.5)
    plot_w = width - left - 80
    axis_y = top_y + step_y * len(rows)
    height = axis_y + 60
    hi = max(1.0, max(r["ratio"]["max"] for r in rows))
    tick = next((t for t in (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0) if hi / t <= 8),
                10.0 ** math.ceil(math.log10(hi / 8)))  # about 8 ticks
    hi = math.ceil(hi / tick) * tick
    scale = plot_w / hi

    def x_at(value):
        return left + value * scale

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, title in enumerate(titles):
        draw.text((10, 8 + 22 * i), title, fill="black" if i == 0 else (70, 70, 70), font=text_font)
    for k in range(round(hi / tick) + 1):  # the ratio axis: grid lines, ticks and their labels
        v = k * tick
        draw.line([x_at(v), top_y - 6, x_at(v), axis_y], fill=(225, 225, 225), width=1)
        draw.line([x_at(v), axis_y, x_at(v), axis_y + 5], fill="black", width=1)
        draw.text((x_at(v), axis_y + 8), f"{v:g}", fill="black", font=small, anchor="mt")
    draw.line([left, axis_y, x_at(hi), axis_y], fill="black", width=1)
    draw.text((left + plot_w / 2, axis_y + 28), "time JAX / time peer", fill="black", font=text_font, anchor="mt")
    for i, row in enumerate(rows):
        y = top_y + i * step_y
        r = row["ratio"]
        draw.text((10, y + bar_h / 2), f"{WORKLOADS[row['workload']]}: {row['label']}", fill="black", font=small,
                  anchor="lm")
        draw.rectangle([left, y, x_at(r["median"]), y + bar_h],
                       fill=(46, 125, 50) if r["median"] < 1 else (198, 40, 40))
        draw.line([x_at(r["min"]), y + bar_h / 2, x_at(r["max"]), y + bar_h / 2], fill="black", width=2)
        for end in (r["min"], r["max"]):
            draw.line([x_at(end), y + 5, x_at(end), y + bar_h - 5], fill="black", width=2)
        draw.text((x_at(r["max"]) + 6, y + bar_h / 2), f"{r['median']:.2f}", fill="black", font=small, anchor="lm")
    draw.line([x_at(1.0), top_y - 6, x_at(1.0), axis_y], fill="black", width=2)
    draw.text((x_at(1.0) + 4, top_y - 8), "1.0: same time", fill="black", font=small, anchor="lb")
    img.save(path, optimize=True)


# ----------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    cfg = CONFIGS[args.config]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    peers = [p for prec in precisions for p in PEERS[prec] if args.torch_compile or not p.compiled]
    peers += [Peer(f"JAX, depthwise {impl}", "jax", "fp32", depthwise=impl) for impl in args.jax_depthwise]
    peers += [Peer(f"JAX, objective {spec}", "jax", "fp32", objective=objective_fields(spec))
              for spec in args.jax_objective]
    opts = {"device": args.device, "sample_steps": args.sample_steps, "warmup": args.warmup,
            "turn_seconds": args.turn_seconds,
            "compilation_cache": str(args.compilation_cache or tempfile.mkdtemp(prefix="ddpm_bench_xla_"))}
    notes, infos, procs = [], {}, []
    try:
        # One at a time, so that no compile shares the CPU with another; with --parallel-setup all at once
        # (a GPU machine's many cores compile side by side; the timed rounds start when all are ready).
        started = [] if not args.parallel_setup else [PeerProcess(peer, cfg, opts) for peer in peers]
        for i, peer in enumerate(peers):
            proc = started[i] if args.parallel_setup else PeerProcess(peer, cfg, opts)
            cap = args.compile_cap - (time.perf_counter() - proc.started) if peer.compiled else None
            try:
                infos[peer.name] = proc.receive(max(cap, 0.0) if cap is not None else None)
                procs.append(proc)
                print(f"  {peer.name}: ready in {time.perf_counter() - proc.started:.0f} s", file=sys.stderr)
            except TimeoutError:
                proc.close()
                notes.append(f"{peer.name} skipped: its compile and warm-up took longer than --compile-cap "
                             f"{args.compile_cap:.0f} s.")
                print(f"  {notes[-1]}", file=sys.stderr)
        times = {(p.peer.name, w): [] for p in procs for w in p.peer.workloads}
        for r in range(args.rounds):
            order = procs if r % 2 == 0 else procs[::-1]
            for workload in WORKLOADS:
                for proc in order:
                    if workload in proc.peer.workloads:
                        proc.conn.send(workload)
                        times[(proc.peer.name, workload)].append(proc.receive())
            print(f"  round {r + 1}/{args.rounds}", file=sys.stderr)
        for proc in procs:
            proc.conn.send(None)
            infos[proc.peer.name].update(proc.receive(60))
    finally:
        for proc in procs:
            proc.close()
    ran = [p.peer for p in procs]
    ratios = []
    for workload in WORKLOADS:
        for jax_peer, other, label in comparisons(ran):
            if workload in jax_peer.workloads and workload in other.workloads:
                j, o = times[(jax_peer.name, workload)], times[(other.name, workload)]
                ratios.append({"workload": workload, "label": label, "jax_peer": jax_peer.name, "peer": other.name,
                               "jax_seconds": statistics.median(j), "peer_seconds": statistics.median(o),
                               "ratio": ratio_summary(j, o)})
    machine = {"cpu": cpu_info(), "versions": versions(), "device": args.device,
               "gpu": next((i["gpu"] for i in infos.values() if i.get("gpu")), None)}
    summary = {
        "command": " ".join(["python", "benchmarks/bench.py", *args.argv]),
        "config": {**cfg, "dim_mults": list(cfg["dim_mults"]), "name": args.config,
                   "optimizer": "AdamW lr 1e-4 betas (0.9, 0.99) wd 0.01",
                   "sample_note": f"sampling timed over {args.sample_steps} steps, scaled to 1000"},
        "machine": machine, "rounds": args.rounds, "peers": infos, "ratios": ratios, "notes": notes,
        "seconds_per_round": {f"{peer} | {w}": ts for (peer, w), ts in times.items()},
    }
    if args.device == "gpu":
        for name, info in infos.items():
            peak = next((v for k, v in PEAK_FLOPS.items() if k in (machine["gpu"] or "")), None)
            if peak and info.get("train_step_flops"):
                info["mfu_bf16_peak"] = info["train_step_flops"] / statistics.median(times[(name, "train_step")]) / peak
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="fp32")
    p.add_argument("--rounds", type=int, default=12, help="alternating rounds (one ratio each)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per workload before the rounds")
    p.add_argument("--turn-seconds", type=float, default=0.3, help="a run repeats its workload to fill about this long")
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps timed, scaled to 1000")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    p.add_argument("--jax-depthwise", type=lambda v: [i for i in v.split(",") if i], default=[],
                   help="extra JAX fp32 peers, train step only, each forcing a depthwise formulation "
                        "(comma-separated: shift,lax,swap,taps; see ddpm_jax/depthwise.py)")
    p.add_argument("--jax-objective", type=lambda v: [i for i in v.split(",") if i], default=[],
                   help="extra JAX fp32 peers, train step only, each training another objective (comma-separated, "
                        "e.g. v,x0,eps+min-snr,v+min-snr+offset; the default JAX peer trains eps)")
    p.add_argument("--parallel-setup", action=argparse.BooleanOptionalAction, default=None,
                   help="start every peer at once (default: on with --device gpu)")
    p.add_argument("--compile-cap", type=float, default=900.0,
                   help="seconds a torch.compile peer may take to compile and warm up before it is dropped")
    p.add_argument("--compilation-cache", type=Path,
                   help="JAX's persistent compilation cache for every JAX peer (default: a new, empty folder, so "
                        "that the first compile of each program is cold; programs the peers share compile once)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    p.add_argument("--png", type=Path, help="write a bar chart of the ratios here")
    p.add_argument("--from-json", type=Path, help="measure nothing: write --md and --png from this saved --json record")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.rounds < 1 or args.sample_steps < 1 or args.sample_steps > 1000:
        p.error("--rounds must be >= 1 and --sample-steps in 1..1000")
    impls = ("shift", "lax", "swap", "taps")  # ddpm_jax.depthwise.IMPLS, without importing JAX here
    if unknown := [i for i in args.jax_depthwise if i not in impls]:
        p.error(f"--jax-depthwise {','.join(unknown)}: expected names from {','.join(impls)}")
    for spec in args.jax_objective:
        try:
            objective_fields(spec)
        except ValueError as e:
            p.error(str(e))
    if args.parallel_setup is None:
        args.parallel_setup = args.device == "gpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    summary = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    table = markdown(summary)
    print(table)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.md:
        args.md.write_text(table + "\n")
    if args.png:
        bar_chart(summary, args.png)
    return summary


if __name__ == "__main__":
    main()
