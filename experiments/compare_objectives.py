"""Which training objective? The default preset trained with each target, loss weighting and EDM, scored by SWD.

    python experiments/compare_objectives.py --arm v --seed 0         # train (or resume) one arm, then score it
    python experiments/compare_objectives.py --table                  # the table of every record so far
    python experiments/compare_objectives.py --figure docs/training/objectives.png
    python experiments/compare_objectives.py --sampler-figure edm_seed0 docs/sampling/edm_samplers.png

An arm is the default preset (`ddpm-train` with no flags but --workdir and --seed) plus the flags in ARMS. Each
run trains in runs/objectives/<arm>_seed<S> (a killed run resumes), then draws --sets sets of --num samples from
the EMA weights with each sampler of its family in SAMPLERS (sample seeds 7, 8, ...): a DDPM-family arm with the
default sampler (SDE-DPM-Solver++, 20 steps) and DPM-Solver++ ODE at 20 steps, an EDM arm with Euler and Heun at
several step counts, with and without the paper's churn. Each set is scored against --num held-out tiles
(embedded seed 1, never trained on) by SWD and colour W1, as docs/training.md's sweep does. The record, with the machine, the versions and the command,
goes to docs/training/objectives/<arm>_seed<S>.json. Two arms train side by side with one core each:

    JAX_NUM_CPU_DEVICES=1 taskset -c 0 python experiments/compare_objectives.py --arm eps --seed 0 &
    JAX_NUM_CPU_DEVICES=1 taskset -c 1 python experiments/compare_objectives.py --arm v --seed 0 &
"""

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "eps": ["--prediction", "eps", "--loss-weight", "none"],  # the article's: the default preset's before the study
    "v": ["--prediction", "v", "--loss-weight", "none"],
    "x0": ["--prediction", "x0", "--loss-weight", "none"],
    "eps+min-snr": ["--prediction", "eps", "--loss-weight", "min-snr"],
    "v+min-snr": ["--prediction", "v", "--loss-weight", "min-snr"],
    "x0+min-snr": ["--prediction", "x0", "--loss-weight", "min-snr"],
}
ARMS.update({f"{name}+offset": flags + ["--offset-noise", "0.1"] for name, flags in list(ARMS.items())})
ARMS.update({
    "edm": ["--prediction", "edm"],  # the paper's c_noise = ln(sigma) / 4
    "edm+c250": ["--prediction", "edm", "--c-noise-scale", "250"],  # c_noise spans ~660, as t's 0..999 do
})
PAPER_CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}  # its Table 5 (ImageNet-64)
# Per family: name -> (sampler, steps, settings). The first two of each are the figure's rows: stochastic, then
# deterministic, at about 20 network calls each.
SAMPLERS = {
    "ddpm": {"sde-dpmsolver++ 20": ("sde-dpmsolver++", 20, {}), "dpmsolver++ 20": ("dpmsolver++", 20, {})},
    "edm": {"euler 20 churn": ("euler", 20, PAPER_CHURN), "heun 9": ("heun", 9, {}), "heun 5": ("heun", 5, {}),
            "heun 18": ("heun", 18, {}), "heun 9 churn": ("heun", 9, PAPER_CHURN)},
}
HELD_OUT_SEED, FIRST_SAMPLE_SEED = 1, 7


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "devices": os.environ.get("JAX_NUM_CPU_DEVICES"),
            "commit": commit,
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy")}}


def train(workdir: Path, seed: int, flags: list[str]) -> dict:
    """Train (or finish) the run; its wall time, and the median images/s of its metrics lines."""
    command = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), "--seed", str(seed),
               "--no-progress", *flags]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [line["images_per_s"] for line in lines if line["images_per_s"]]
    last = [line["loss"] for line in lines if line["step"] > lines[-1]["step"] - 600]
    return {"command": " ".join(["python", "train.py", *command[2:]]), "seconds": seconds,
            "median_images_per_s": statistics.median(rates), "loss_last_600_steps": statistics.mean(last)}


def score(workdir: Path, num: int, sets: int) -> dict:
    """Per sampler: each set's SWD, colour W1 and seconds (the first includes the compile)."""
    import jax

    from ddpm_jax import diffusion
    from ddpm_jax.checkpoints import load_model
    from ddpm_jax.data import load
    from ddpm_jax.evaluate import colour_distance, swd
    from ddpm_jax.images import to_uint8
    from ddpm_jax.schedules import check_schedule
    from ddpm_jax.workdirs import read_config

    run = read_config(workdir)
    model, model_config = load_model(workdir)
    held_out = load("embedded", run.image_size, num=num, embedded_seed=HELD_OUT_SEED)
    schedule = check_schedule(run.schedule, run.timesteps)
    scores = {}
    for name, (sampler, steps, options) in SAMPLERS[diffusion.family(run.prediction)].items():
        settings = diffusion.sampler_settings(sampler, timesteps=run.timesteps, steps=steps,
                                              prediction=run.prediction, edm=model_config.edm_constants, **options)
        entry = scores[name] = []
        for i in range(sets):
            t0 = time.perf_counter()
            images = np.asarray(diffusion.sample(model, schedule, jax.random.key(FIRST_SAMPLE_SEED + i), num,
                                                 run.image_size, settings), np.float32)
            fake = to_uint8(np.clip(images, 0, 1))
            entry.append({"seed": FIRST_SAMPLE_SEED + i, "seconds": time.perf_counter() - t0,
                          "swd": swd(held_out, fake)["swd"], "colour_w1": colour_distance(held_out, fake)["colour_w1"]})
            if i == 0:
                np.save(_samples_path(workdir, name), fake)
            print(f"{workdir.name} {name} set {i}: SWD {entry[-1]['swd']:.1f}", flush=True)
    return scores


def _samples_path(workdir: Path, name: str) -> Path:
    return workdir / f"samples_{name.replace(' ', '_')}.npy"


def network_calls(name: str) -> int:
    from ddpm_jax import diffusion

    sampler, steps, _ = next(s[name] for s in SAMPLERS.values() if name in s)
    return diffusion.SAMPLERS[sampler].network_calls(steps)


def baseline(num: int) -> float:
    """SWD of the first `num` training tiles (seed 0) against the `num` held-out tiles."""
    from ddpm_jax.data import load
    from ddpm_jax.evaluate import swd

    return swd(load("embedded", 32, num=num, embedded_seed=HELD_OUT_SEED),
               load("embedded", 32, embedded_seed=0)[:num])["swd"]


def run_arm(args) -> None:
    record_path = args.records / f"{args.arm}_seed{args.seed}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    workdir = args.workdirs / f"{args.arm}_seed{args.seed}"
    if "training" not in record:
        record.update(arm=args.arm, flags=ARMS[args.arm], seed=args.seed, machine=machine(),
                      training=train(workdir, args.seed, ARMS[args.arm]))
        args.records.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if "scores" not in record:
        record["scores"] = score(workdir, args.num, args.sets)
        record["scoring"] = {"num": args.num, "held_out_seed": HELD_OUT_SEED, "machine": machine(),
                             "data_against_data_swd": baseline(args.num)}
        record_path.write_text(json.dumps(record, indent=2) + "\n")


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def table(folder: Path) -> str:
    """Markdown: per arm and sampler, each seed's SWD (mean of its sample sets), their mean and range (max - min
    over the seeds), the mean over the data-against-data SWD, the colour W1 and the training wall time."""
    by_arm: dict[str, list[dict]] = {}
    for r in records(folder):
        if "scores" in r:
            by_arm.setdefault(r["arm"], []).append(r)
    rows = ["| arm | flags | sampler | network calls | seeds | SWD per seed (mean, range) | / data-against-data | "
            "colour W1 | training wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in sorted(by_arm.items(), key=lambda kv: list(ARMS).index(kv[0])):
        runs.sort(key=lambda r: r["seed"])
        data = statistics.mean(r["scoring"]["data_against_data_swd"] for r in runs)
        walls = [r["training"]["seconds"] for r in runs]
        for name in runs[0]["scores"]:
            def per_seed(key):
                return [statistics.mean(s[key] for s in r["scores"][name]) for r in runs]

            swds = per_seed("swd")
            cell = ", ".join(f"{v:.1f}" for v in swds) + (
                f" ({statistics.mean(swds):.1f}, {max(swds) - min(swds):.1f})" if len(swds) > 1 else "")
            rows.append(f"| {arm} | `{' '.join(ARMS[arm]) or '(none)'}` | {name} | {network_calls(name)} | "
                        f"{', '.join(str(r['seed']) for r in runs)} | {cell} | {statistics.mean(swds) / data:.2f}x | "
                        f"{statistics.mean(per_seed('colour_w1')):.1f} | "
                        f"{'-'.join(sorted({f'{w / 60:.0f}' for w in (min(walls), max(walls))}, key=float))} min |")
    return "\n".join(rows)


def figure(folder: Path, workdirs: Path, out: Path, tiles: int = 16) -> None:
    """A grid of `tiles` samples per arm (columns) and kind of sampler (rows: stochastic, then deterministic, at
    about 20 network calls, from the same x_T; the first two of the arm's family in SAMPLERS), from each arm's
    lowest training seed whose workdir holds its samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_jax import diffusion
    from ddpm_jax.images import grid

    shown = {}
    for r in sorted(records(folder), key=lambda r: r["seed"]):
        workdir = workdirs / f"{r['arm']}_seed{r['seed']}"
        names = list(SAMPLERS[diffusion.family(_prediction(r["arm"]))])[:2]
        if r["arm"] not in shown and all(_samples_path(workdir, n).is_file() for n in names):
            shown[r["arm"]] = (r["seed"], workdir, names)
    arms = sorted(shown, key=list(ARMS).index)
    fig, axes = plt.subplots(2, len(arms), figsize=(2.2 * len(arms), 2.6 * 2), squeeze=False)
    for row in range(2):
        for ax, arm in zip(axes[row], arms):
            seed, workdir, names = shown[arm]
            samples = np.load(_samples_path(workdir, names[row]))[:tiles].astype(np.float32) / 255.0
            ax.imshow(grid(samples, arm), interpolation="nearest")
            ax.set_title(f"{arm} (seed {seed}),\n{names[row]}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    _save_png(fig, out, dpi=90)


def sampler_figure(folder: Path, workdirs: Path, run: str, out: Path, tiles: int = 36) -> None:
    """One run's samples (`run` = <arm>_seed<S>), `tiles` per sampler of its family, from the same x_T, each titled
    with its network calls and the run's SWD (mean of its sets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_jax.images import grid

    scores = json.loads((folder / f"{run}.json").read_text())["scores"]
    fig, axes = plt.subplots(1, len(scores), figsize=(2.6 * len(scores), 3.0), squeeze=False)
    for ax, (name, sets) in zip(axes[0], scores.items()):
        samples = np.load(_samples_path(workdirs / run, name))[:tiles].astype(np.float32) / 255.0
        ax.imshow(grid(samples, name), interpolation="nearest")
        ax.set_title(f"{name}: {network_calls(name)} calls,\nSWD {statistics.mean(s['swd'] for s in sets):.1f}",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{run}: the same x_T per sampler", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save_png(fig, out, dpi=100)


def _save_png(fig, out: Path, dpi: int) -> None:
    """The figure as a 256-colour PNG: a few hundred KB, not a MB."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)


def _prediction(arm: str) -> str:
    flags = ARMS[arm]
    if "--prediction" in flags:
        return flags[flags.index("--prediction") + 1]
    from ddpm_jax.config import PRESETS

    return PRESETS["default"].prediction


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", choices=list(ARMS))
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--num", type=int, default=256, help="images per sample set, and held-out tiles (default 256)")
    p.add_argument("--sets", type=int, default=3, help="sample sets per sampler (default 3)")
    p.add_argument("--workdirs", type=Path, default=ROOT / "runs" / "objectives")
    p.add_argument("--records", type=Path, default=ROOT / "docs" / "training" / "objectives")
    p.add_argument("--table", action="store_true", help="print the table of the records")
    p.add_argument("--figure", type=Path, help="write the PNG of a grid per arm and sampler (its lowest training seed with samples)")
    p.add_argument("--sampler-figure", nargs=2, metavar=("RUN", "PNG"),
                   help="write the PNG of one run's samples (RUN: <arm>_seed<S>) with each sampler of its family")
    args = p.parse_args(argv)
    if args.arm:
        run_arm(args)
    if args.table:
        print(table(args.records))
    if args.figure:
        figure(args.records, args.workdirs, args.figure)
    if args.sampler_figure:
        sampler_figure(args.records, args.workdirs, args.sampler_figure[0], Path(args.sampler_figure[1]))


if __name__ == "__main__":
    main()
