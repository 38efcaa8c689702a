"""How long to train? The default preset trained for --steps N, scored by SWD, with its training and held-out loss.

    python experiments/training_length.py --steps 9000 --seed 0     # train (or resume) one run, then score it
    python experiments/training_length.py --table                   # the table of every record so far
    python experiments/training_length.py --plot docs/training/length.png --loss-plot docs/training/loss.png

A run is `train.py --steps N` with the default preset's objective (compare_objectives.py's v+min-snr arm), in
runs/length/steps<N>_seed<S> (a killed run resumes), keeping every checkpoint. It is scored as compare_objectives.py
scores an arm: --sets sets of --num samples from the EMA weights with SDE-DPM-Solver++ and DPM-Solver++ (ODE) at 20
steps, each against --num held-out tiles (embedded seed 1). At every checkpoint it also measures the held-out loss:
the training objective (v, Min-SNR-5 weights) of the raw and the EMA weights on 1,024 fixed (held-out tile, t, noise)
triples, as compare_trainers.py does. The record, with the machine, the versions and the command, goes to
docs/training/length/steps<N>_seed<S>.json. The 4,500-step points of the plot also read the objectives study's
v+min-snr records, which trained the same command. Two runs train side by side with one core each:

    JAX_NUM_CPU_DEVICES=1 taskset -c 0 python experiments/training_length.py --steps 9000 --seed 0 &
    JAX_NUM_CPU_DEVICES=1 taskset -c 1 python experiments/training_length.py --steps 500 --seed 1 &
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent
sys.path.insert(0, str(EXPERIMENTS))
import compare_objectives as study  # noqa: E402  (the same training, scoring and machine record)

ARM = "v+min-snr"  # the default preset's objective, named as the objectives study names it
DEFAULT_RECORDS = study.ROOT / "docs" / "training" / "length"
OBJECTIVES_RECORDS = study.ROOT / "docs" / "training" / "objectives"


def held_out_losses(workdir: Path, num: int) -> list[dict]:
    """Per checkpoint: the objective's loss of the raw and the EMA weights on fixed held-out triples."""
    import jax.numpy as jnp
    from flax import nnx

    from ddpm_jax import diffusion
    from ddpm_jax.checkpoints import load_model
    from ddpm_jax.data import load
    from ddpm_jax.schedules import check_schedule
    from ddpm_jax.workdirs import CHECKPOINTS, read_config, saved_steps

    from compare_trainers import held_out_loss  # its fixed triples, which it scores both trainers on

    run = read_config(workdir)
    schedule = check_schedule(run.schedule, run.timesteps)
    held_out = load("embedded", run.image_size, num=num, embedded_seed=study.HELD_OUT_SEED)
    loss = nnx.jit(lambda model, x0, t, noise: diffusion.p_loss(model, schedule, x0, t, noise, run.objective))
    rows = []
    for step in saved_steps(workdir):
        row = {"step": step}
        for name, ema in (("raw", False), ("ema", True)):
            model, _ = load_model(workdir / CHECKPOINTS / str(step), ema=ema)
            row[name] = held_out_loss(
                run, lambda x0, t, noise: float(loss(model, *map(jnp.asarray, (x0, t, noise)))), held_out)
        rows.append(row)
        print(f"{workdir.name} step {step}: held-out loss raw {row['raw']:.4f}, EMA {row['ema']:.4f}", flush=True)
    return rows


def run(args) -> None:
    record_path = args.records / f"steps{args.steps}_seed{args.seed}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    workdir = args.workdirs / f"steps{args.steps}_seed{args.seed}"
    flags = [*study.ARMS[ARM], "--steps", str(args.steps), "--keep-checkpoints", str(args.steps // 500 + 2)]
    if "training" not in record:
        training = study.train(workdir, args.seed, flags)
        lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        training["loss_curve"] = [[line["step"], line["loss"]] for line in lines]
        record.update(arm=ARM, steps=args.steps, flags=flags, seed=args.seed, machine=study.machine(),
                      training=training)
        args.records.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if "held_out_loss" not in record:
        record["held_out_loss"] = held_out_losses(workdir, args.num)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if "scores" not in record:
        record["scores"] = study.score(workdir, args.num, args.sets)
        record["scoring"] = {"num": args.num, "held_out_seed": study.HELD_OUT_SEED, "machine": study.machine(),
                             "data_against_data_swd": study.baseline(args.num)}
        record_path.write_text(json.dumps(record, indent=2) + "\n")


def points(records: Path) -> dict[int, list[dict]]:
    """Steps -> the scored records of that length (this study's, and the objectives study's default arm)."""
    by_steps: dict[int, list[dict]] = {}
    for r in study.records(records):
        if "scores" in r:
            by_steps.setdefault(r["steps"], []).append(r)
    from ddpm_jax.config import PRESETS

    default_steps = PRESETS["default"].steps
    for r in study.records(OBJECTIVES_RECORDS):
        if r["arm"] == ARM and "scores" in r and r["seed"] not in {x["seed"] for x in by_steps.get(default_steps, [])}:
            by_steps.setdefault(default_steps, []).append(r)
    for runs in by_steps.values():
        runs.sort(key=lambda r: r["seed"])
    return dict(sorted(by_steps.items()))


def swd_per_seed(runs: list[dict], sampler: str) -> list[float]:
    return [statistics.mean(s["swd"] for s in r["scores"][sampler]) for r in runs]


def table(records: Path) -> str:
    """Markdown: per length and sampler, each seed's SWD (mean of its sets), their mean and range, the mean over the
    data-against-data SWD, the held-out loss of the EMA weights at the end, and the training wall time."""
    rows = ["| steps | sampler | seeds | SWD per seed (mean, range) | / data-against-data | colour W1 | "
            "held-out loss, EMA (mean of the seeds) | training wall time |", "|---|---|---|---|---|---|---|---|"]
    for steps, runs in points(records).items():
        data = statistics.mean(r["scoring"]["data_against_data_swd"] for r in runs)
        walls = [r["training"]["seconds"] / 60 for r in runs]
        measured = [r for r in runs if "held_out_loss" in r]  # the objectives study's runs did not measure it
        loss = statistics.mean(r["held_out_loss"][-1]["ema"] for r in measured) if measured else None
        loss_cell = "-" if loss is None else f"{loss:.4f}" + (
            "" if len(measured) == len(runs) else f" (seed {', '.join(str(r['seed']) for r in measured)})")
        for sampler in runs[0]["scores"]:
            swds = swd_per_seed(runs, sampler)
            cell = ", ".join(f"{v:.1f}" for v in swds) + (
                f" ({statistics.mean(swds):.1f}, {max(swds) - min(swds):.1f})" if len(swds) > 1 else "")
            colour = statistics.mean(statistics.mean(s["colour_w1"] for s in r["scores"][sampler]) for r in runs)
            rows.append(f"| {steps:,} | {sampler} | {', '.join(str(r['seed']) for r in runs)} | {cell} | "
                        f"{statistics.mean(swds) / data:.2f}x | {colour:.1f} | "
                        f"{loss_cell} | "
                        f"{min(walls):.0f}{f'-{max(walls):.0f}' if len(walls) > 1 else ''} min |")
    return "\n".join(rows)


def plot_swd(records: Path, out: Path) -> None:
    """SWD against training steps: each seed's SWD per sampler, their mean, and the data-against-data line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_steps = points(records)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for sampler, colour in zip(next(iter(by_steps.values()))[0]["scores"], ("tab:blue", "tab:orange")):
        steps = list(by_steps)
        per_seed = [swd_per_seed(by_steps[s], sampler) for s in steps]
        for s, values in zip(steps, per_seed):
            ax.scatter([s] * len(values), values, color=colour, s=12, alpha=0.6)
        ax.plot(steps, [statistics.mean(v) for v in per_seed], color=colour, marker="o",
                label=f"{sampler} (mean of the seeds)")
    data = statistics.mean(r["scoring"]["data_against_data_swd"] for runs in by_steps.values() for r in runs)
    ax.axhline(data, color="grey", linestyle="--", label=f"data against data ({data:.1f})")
    ax.set_xscale("log")
    ax.set_xticks(list(by_steps), [f"{s:,}" for s in by_steps])
    ax.minorticks_off()
    ax.set_xlabel("training steps (--steps; batch 16)")
    ax.set_ylabel("SWD against held-out tiles (x1e3)")
    ax.set_title("Default preset: SWD of 256 EMA samples against training length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    study._save_png(fig, out, dpi=100)


def plot_loss(records: Path, out: Path, steps: int, seed: int) -> None:
    """One run's training loss (its metrics lines) and held-out loss of the raw and EMA weights per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads((records / f"steps{steps}_seed{seed}.json").read_text())
    curve = r["training"]["loss_curve"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], linewidth=0.8, color="tab:blue",
            label="training loss (raw weights, mean of each 25 steps)")
    for name, colour, label in (("raw", "tab:red", "held-out loss, raw weights"),
                                ("ema", "tab:green", "held-out loss, EMA weights")):
        ax.plot([h["step"] for h in r["held_out_loss"]], [h[name] for h in r["held_out_loss"]], marker="o",
                color=colour, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (v, Min-SNR-5 weights)")
    ax.set_title(f"Default preset, {steps:,} steps, training seed {seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    study._save_png(fig, out, dpi=100)


def grid_figure(records: Path, workdirs: Path, out: Path, seed: int, sampler: str = "sde-dpmsolver++ 20",
                tiles: int = 16, zoom: int = 3) -> None:
    """16 held-out tiles, then 16 samples of each length's run of training `seed` (the first sample set of
    `sampler`, the same x_T for every length), each pixel drawn zoom x zoom, titled with the run's SWD."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from ddpm_jax.data import load
    from ddpm_jax.images import grid

    panels = [("held-out tiles", grid(load("embedded", 32, num=tiles, embedded_seed=study.HELD_OUT_SEED) / 255.0))]
    for steps, runs in points(records).items():
        path = study._samples_path(workdirs / f"steps{steps}_seed{seed}", sampler)
        r = next((r for r in runs if r["seed"] == seed), None)
        if r is not None and path.is_file():
            swd = statistics.mean(s["swd"] for s in r["scores"][sampler])
            panels.append((f"{steps:,} steps: SWD {swd:.1f}", grid(np.load(path)[:tiles] / 255.0)))
    size = panels[0][1].shape[0] * zoom
    font = ImageFont.load_default(size=16)
    cols = 3
    rows = -(-len(panels) // cols)
    figure = Image.new("RGB", (cols * (size + 16) + 16, rows * (size + 40) + 16), "white")
    draw = ImageDraw.Draw(figure)
    for i, (title, pixels) in enumerate(panels):
        x, y = 16 + (i % cols) * (size + 16), 16 + (i // cols) * (size + 40)
        draw.text((x, y), title, fill="black", font=font)
        figure.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST), (x, y + 24))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.quantize(256).save(out, optimize=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="train (or resume) and score a run of this many steps")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--num", type=int, default=256, help="images per sample set, and held-out tiles (default 256)")
    p.add_argument("--sets", type=int, default=3, help="sample sets per sampler (default 3)")
    p.add_argument("--workdirs", type=Path, default=study.ROOT / "runs" / "length")
    p.add_argument("--records", type=Path, default=DEFAULT_RECORDS)
    p.add_argument("--table", action="store_true", help="print the table of the records")
    p.add_argument("--plot", type=Path, help="write the PNG of SWD against training steps")
    p.add_argument("--loss-plot", type=Path, help="write the PNG of the loss curves of --loss-run")
    p.add_argument("--loss-run", nargs=2, type=int, default=(4500, 0), metavar=("STEPS", "SEED"),
                   help="the run whose loss curves --loss-plot draws (default: 4500 0, the default run)")
    p.add_argument("--grid-figure", type=Path,
                   help="write a PNG of held-out tiles and 16 samples (SDE-DPM-Solver++ 20) of each length of --seed")
    args = p.parse_args(argv)
    if args.steps:
        run(args)
    if args.table:
        print(table(args.records))
    if args.plot:
        plot_swd(args.records, args.plot)
    if args.loss_plot:
        plot_loss(args.records, args.loss_plot, *args.loss_run)
    if args.grid_figure:
        grid_figure(args.records, args.workdirs, args.grid_figure, args.seed)


if __name__ == "__main__":
    main()
