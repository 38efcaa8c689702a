"""How long `make train` takes on this machine: the default preset on the embedded dataset, every core, from a cold
XLA cache (as on a fresh clone), the whole `python train.py` process timed. README.md's figure comes from these.

    python benchmarks/train_time.py --json docs/perf/train_time_<cpu>_<n>.json [--workdir DIR] [ARGS for train.py]

The record holds the wall time, the median steps/s and images/s of the metrics lines (the first, which holds the
compile, has none), the CPU, the versions, the commit and the command.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_info, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where the record goes")
    parser.add_argument("--workdir", type=Path, help="the run's workdir (default: a fresh temporary folder)")
    args, train_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch) / "run"
        command = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), "--no-progress", *train_args]
        env = {**os.environ, "DDPM_JAX_COMPILATION_CACHE": str(Path(scratch) / "xla")}  # cold: nothing compiled yet
        t0 = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    timed = [line for line in lines if line["steps_per_s"]]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {
        "command": " ".join(["python", "benchmarks/train_time.py", *sys.argv[1:]]),
        "train_command": " ".join(["python", "train.py", *command[2:]]),
        "seconds": round(seconds, 1), "steps": lines[-1]["step"],
        "median_steps_per_s": statistics.median(line["steps_per_s"] for line in timed),
        "median_images_per_s": statistics.median(line["images_per_s"] for line in timed),
        "machine": {"cpu": cpu_info(), "versions": versions(), "commit": commit,
                    "JAX_NUM_CPU_DEVICES": os.environ.get("JAX_NUM_CPU_DEVICES")},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['seconds'] / 60:.1f} min, {record['median_images_per_s']:.0f} images/s -> {args.json}")


if __name__ == "__main__":
    main()
