"""JAX / PyTorch eager time ratios of the committed bench records, per machine, in one figure. Measures nothing.

    python benchmarks/plot_ratios.py [--png docs/perf/ratios.png]

For each record in RECORDS (docs/perf/), the JAX / PyTorch eager ratio of the train step, the forward pass and
DDPM sampling, fp32: the median of the alternating rounds as a point, their min and max as a whisker. The H200
records come from the earlier, sequential benchmark, which timed each peer once: one ratio, no spread, drawn as
a hollow diamond. Left out: docs/perf/bench_cpu_amd_epyc_sequential.json, whose PyTorch ran with
OMP_WAIT_POLICY=PASSIVE, which slowed it (docs/performance.md).
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (machine and config, run, record): the fp32 JAX / PyTorch eager rows of every record with them
RECORDS = [
    ("Intel Xeon, 2 cores\nbench's default config", "run 1", "docs/perf/bench_cpu_intel_fp32_run1.json"),
    ("Intel Xeon, 2 cores\nbench's default config", "run 2", "docs/perf/bench_cpu_intel_fp32_run2.json"),
    ("Intel Xeon, 2 cores\nbench's default config", "run 3", "docs/perf/bench_cpu_intel_fp32_run3.json"),
    ("Intel Xeon, 2 cores\nbench's default config", "run 4", "docs/perf/bench_cpu_intel_fp32_run4.json"),
    ("Intel Xeon, 2 cores\nbench's default config", "six-peer run", "docs/perf/bench_cpu_intel.json"),
    ("AMD EPYC, 2 cores\nbench's default config", "objectives run", "docs/perf/bench_cpu_amd_epyc_objectives.json"),
    ("NVIDIA H200\narticle config", "sequential, no spread", "docs/perf/bench_gpu_h200_fp32_sequential.json"),
]
WORKLOADS = {"train_step": "train step", "forward": "forward", "sample_1000": "DDPM sampling, 1000 steps"}
SEQUENTIAL_KEYS = {"train_step": "train_step_ratio_jax_over_torch", "forward": "forward_ratio_jax_over_torch",
                   "sample_1000": "sample_ratio_jax_over_torch"}


def ratios(record: dict) -> dict:
    """workload -> (median, min, max) of JAX / PyTorch eager, fp32; min and max are None for a sequential record."""
    if "ratios" not in record:  # the earlier, sequential benchmark: one ratio per workload
        return {w: (record[key], None, None) for w, key in SEQUENTIAL_KEYS.items()}
    rows = {row["workload"]: row["ratio"] for row in record["ratios"] if row["label"] == "JAX / PyTorch eager"}
    return {w: (r["median"], r["min"], r["max"]) for w, r in rows.items()}


def plot(records: dict, path: Path):
    """records: path in RECORDS -> the loaded record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(14, 5), sharey=True)
    colours = {machine: f"C{i}" for i, machine in enumerate(dict.fromkeys(m for m, _, _ in RECORDS))}
    ys = list(range(len(RECORDS)))[::-1]
    hi = max(v for _, _, p in RECORDS for r in ratios(records[p]).values() for v in r if v is not None)
    for ax, (workload, title) in zip(axes, WORKLOADS.items()):
        for y, (machine, run, p) in zip(ys, RECORDS):
            median, lo, hi_ = ratios(records[p])[workload]
            if lo is None:
                ax.plot(median, y, "D", mfc="white", mec=colours[machine], mew=2, ms=8)
            else:
                ax.errorbar(median, y, xerr=[[median - lo], [hi_ - median]], fmt="o", color=colours[machine],
                            capsize=4, ms=7)
            ax.annotate(f"{median:.2f}", (median, y), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=8)
        ax.axvline(1.0, color="black", lw=1)
        ax.text(1.0, len(RECORDS) - 0.45, " 1.0: same time", fontsize=8, va="bottom")
        ax.set_title(title)
        ax.set_xlim(0, hi * 1.08)
        ax.set_ylim(-0.6, len(RECORDS) - 0.1)
        ax.set_xlabel("time JAX / time PyTorch eager (fp32)")
        ax.grid(axis="x", color="0.9")
    axes[0].set_yticks(ys, [f"{machine.splitlines()[0]}: {run}"
                            + (f" ({records[p]['rounds']} rounds)" if "rounds" in records[p] else "")
                            for machine, run, p in RECORDS])
    fig.suptitle("JAX / PyTorch eager, fp32, per machine: median of the alternating rounds, whisker min-max; "
                 "below 1.0 JAX is faster\n"
                 "CPUs: bench.py --config default (TwoResUNet dim 32, mults 1,2,4,8, 32 px, batch 16). "
                 "H200: --config article (dim 64, 128 px, batch 16),\nthe earlier sequential benchmark: one ratio, "
                 "no spread. Left out: the AMD EPYC's sequential record, whose PyTorch ran with "
                 "OMP_WAIT_POLICY=PASSIVE, which slowed it", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--png", type=Path, default=ROOT / "docs/perf/ratios.png")
    args = p.parse_args(argv)
    plot({path: json.loads((ROOT / path).read_text()) for _, _, path in RECORDS}, args.png)


if __name__ == "__main__":
    main()
