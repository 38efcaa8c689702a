"""Which sampler, at how many steps? SWD and colour W1 of sample sets from a trained model, with wall time.

    python experiments/compare_samplers.py --checkpoint runs/default [--num 128] [--sets 2] [--out FILE.json]
    python experiments/compare_samplers.py --checkpoint runs/default --spacings --out docs/sampling/spacings.json
    python experiments/compare_samplers.py --plot docs/sampling/swd_wall.png   # from the records, no sampling

--spacings compares the DPM-Solvers at 20 steps under each of diffusers' time spacings instead.

For each sampler and step count: --sets sets of --num images (seeds 7, 8, ...), each one program split over the
devices, scored against --held-out held-out tiles (embedded seed 1, never trained on) by SWD and colour W1
(ddpm_jax.evaluate). The wall time of a set excludes the compile (the first set's extra time is reported as
the compile). DDPM-1000 runs one set unless --ddpm-sets says more. Results are cached in the --out JSON: run it
again after an interruption and it goes on where it stopped. The record also holds the machine, the versions, the
command and the checkpoint's objective and training steps.

--plot draws SWD against the wall time of a set for every sampler of the --out record, and beside it the samplers
of the objectives study's records (docs/training/objectives: an EDM model and the default preset's v model, sampled
on one core of another machine, so the two panels' seconds do not compare).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import diffusion, runtime
from ddpm_jax.checkpoints import load_model
from ddpm_jax.data import load
from ddpm_jax.evaluate import colour_distance, swd
from ddpm_jax.images import to_uint8
from ddpm_jax.schedules import check_schedule
from ddpm_jax.workdirs import read_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_objectives  # noqa: E402  (the machine record, and the objectives study's records for --plot)

HELD_OUT_SEED = 1
FIRST_SEED = 7
# (sampler, steps, eta, spacing); eta only matters to DDIM, the spacing only to the DPM-Solvers.
CONFIGS = [("dpmsolver++", s, 0.0, "linspace") for s in (10, 20, 50)] + [
    ("sde-dpmsolver++", s, 0.0, "linspace") for s in (10, 20, 50)] + [
    ("ddim", s, e, "linspace") for e in (0.0, 1.0) for s in (20, 50, 100)] + [("ddpm", 1000, 0.0, "linspace")]
SPACING_CONFIGS = [(sampler, 20, 0.0, spacing) for sampler, entry in diffusion.SAMPLERS.items()
                   if "spacing" in entry.takes for spacing in diffusion.SPACINGS]


def name(sampler: str, steps: int, eta: float, spacing: str = "linspace") -> str:
    return (f"{sampler} {steps}" + (f" eta {eta:g}" if sampler == "ddim" else "")
            + (f" {spacing}" if spacing != "linspace" else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default"), help="a training workdir")
    p.add_argument("--num", type=int, default=128, help="images per set (default 128)")
    p.add_argument("--sets", type=int, default=2, help="sample sets per sampler (default 2)")
    p.add_argument("--ddpm-sets", type=int, default=1, help="sample sets of DDPM-1000 (default 1)")
    p.add_argument("--held-out", type=int, default=1024, help="held-out tiles (default 1024)")
    p.add_argument("--out", type=Path, default=Path("docs/sampling/samplers.json"))
    p.add_argument("--spacings", action="store_true", help="the DPM-Solvers at 20 steps under each time spacing")
    p.add_argument("--plot", type=Path, help="draw SWD against wall time from the records into this PNG, and stop")
    args = p.parse_args(argv)
    if args.plot:
        return plot(args.out, compare_objectives.ROOT / "docs" / "training" / "objectives", args.plot)
    configs = SPACING_CONFIGS if args.spacings else CONFIGS

    runtime.use_cpu_cores_as_devices(args.num)
    runtime.enable_compilation_cache()
    run = read_config(args.checkpoint)
    schedule = check_schedule(run.schedule, run.timesteps)
    model, _ = load_model(args.checkpoint)
    sharding = runtime.replicate_for_sampling(model, args.num)
    held_out = load("embedded", run.image_size, num=args.held_out, embedded_seed=HELD_OUT_SEED)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {**compare_objectives.machine(), "devices": jax.device_count(),
                          "backend": jax.default_backend(), "num": args.num, "held_out": args.held_out}
    results["command"] = " ".join(["python", "experiments/compare_samplers.py", *(argv or sys.argv[1:])])
    results["checkpoint"] = {"path": str(args.checkpoint), "steps": run.steps, "seed": run.seed,
                             "prediction": run.prediction, "loss_weight": run.loss_weight}
    for sampler, steps, eta, spacing in configs:
        key_name = name(sampler, steps, eta, spacing)
        settings = diffusion.sampler_settings(sampler, timesteps=run.timesteps, steps=steps, eta=eta,
                                              spacing=spacing, prediction=run.prediction)
        entry = results.setdefault(key_name, {"sets": []})
        entry["network_calls"] = diffusion.SAMPLERS[sampler].network_calls(settings.steps)
        sets = args.ddpm_sets if sampler == "ddpm" else args.sets
        for i in range(len(entry["sets"]), sets):
            t0 = time.perf_counter()
            images = diffusion.sample(model, schedule, jax.random.key(FIRST_SEED + i), args.num, run.image_size,
                                      settings, batch_sharding=sharding)
            images = np.asarray(images, np.float32)
            seconds = time.perf_counter() - t0
            fake = to_uint8(np.clip(images, 0, 1))
            entry["sets"].append({"seed": FIRST_SEED + i, "seconds": seconds, "swd": swd(held_out, fake)["swd"],
                                  "colour_w1": colour_distance(held_out, fake)["colour_w1"]})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{key_name}: set {i}: SWD {entry['sets'][-1]['swd']:.1f}, {seconds:.1f} s", flush=True)
    print(table(results, configs))


def table(results: dict, configs: list) -> str:
    """Markdown: per sampler the mean SWD (min-max over sets), colour W1, and the wall time of a set after the
    first (the first's extra seconds are its compile)."""
    rows = ["| sampler | SWD (sets: min-max) | colour W1 | wall per set | compile |", "|---|---|---|---|---|"]
    for config in configs:
        sets = results.get(name(*config), {}).get("sets", [])
        if not sets:
            continue
        swds, times = [s["swd"] for s in sets], [s["seconds"] for s in sets]
        run_s = statistics.median(times[1:]) if len(times) > 1 else None
        wall = f"{run_s:.1f} s" if run_s else f"{times[0]:.1f} s (with compile)"
        compile_s = f"{times[0] - run_s:.1f} s" if run_s else ""
        spread = f" ({min(swds):.1f}-{max(swds):.1f})" if len(swds) > 1 else ""
        rows.append(f"| {name(*config)} | {statistics.mean(swds):.1f}{spread} | "
                    f"{statistics.mean(s['colour_w1'] for s in sets):.2f} | {wall} | {compile_s} |")
    return "\n".join(rows)


def seconds_per_set(sets: list[dict]) -> float:
    """The median wall time of the sets after the first (whose time includes the compile); the first if alone."""
    times = [s["seconds"] for s in sets]
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def plot(record: Path, objectives: Path, out: Path) -> None:
    """SWD (mean over sets) against the wall time of a set: left the --out record's samplers, right the objectives
    study's EDM and v + Min-SNR-5 runs (each training seed's mean over its sets, per sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(record.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    families = {"ddpm": "tab:grey", "ddim": "tab:blue", "dpmsolver++": "tab:orange", "sde-dpmsolver++": "tab:green"}
    for key, entry in results.items():
        if not isinstance(entry, dict) or "sets" not in entry:
            continue
        sampler = key.split()[0]
        marker = "s" if "eta 0" in key or sampler == "dpmsolver++" else "o"  # deterministic: squares
        left.scatter(seconds_per_set(entry["sets"]), statistics.mean(s["swd"] for s in entry["sets"]),
                     color=families[sampler], marker=marker)
        left.annotate(key, (seconds_per_set(entry["sets"]), statistics.mean(s["swd"] for s in entry["sets"])),
                      fontsize=7, xytext=(4, 2), textcoords="offset points")
    m, c = results["machine"], results["checkpoint"]
    left.set_title(f"{c['prediction']} model, loss weight {c['loss_weight']}, {c['steps']:,} steps: {m['num']} images "
                   f"a set,\n{m['devices']} devices of a {m['cores']}-core {m['cpu']}", fontsize=9)
    for arm, colour in (("v+min-snr", "tab:green"), ("edm", "tab:purple")):
        runs = [r for r in compare_objectives.records(objectives) if r["arm"] == arm and "scores" in r]
        for sampler in runs[0]["scores"] if runs else []:
            xs = [seconds_per_set(r["scores"][sampler]) for r in runs]
            ys = [statistics.mean(s["swd"] for s in r["scores"][sampler]) for r in runs]
            right.scatter(xs, ys, color=colour, s=14, alpha=0.6)
            right.annotate(f"{arm}: {sampler}", (statistics.mean(xs), statistics.mean(ys)), fontsize=7, xytext=(4, 2),
                           textcoords="offset points")
    cpu = next((r["scoring"]["machine"]["cpu"] for r in compare_objectives.records(objectives) if "scoring" in r), "")
    right.set_title(f"objectives study: each training seed, 256 images a set,\none device on one core of a {cpu}",
                    fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("wall time of a set after the first, s (log)")
        ax.set_ylabel("SWD against held-out tiles (x1e3)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    compare_objectives._save_png(fig, out, dpi=100)


if __name__ == "__main__":
    main()
