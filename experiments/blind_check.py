"""A blind check of sample grids: reviewers who see only unlabeled grids say what each depicts and rate it 0-10.

    python experiments/blind_check.py make /tmp/blind --reviewers 3     # each reviewer's shuffled grids, and the key
    # give reviewer i the folder /tmp/blind/reviewer<i> and PROMPT (printed by `make`); save its answer, a JSON
    # list of {"grid", "depicts", "rating", "defects"}, as /tmp/blind/reviewer<i>/answer.json
    python experiments/blind_check.py record /tmp/blind docs/quality/blind_check.json
    python experiments/blind_check.py table docs/quality/blind_check.json

The grids are 16 images each at 32 px, drawn 4x: held-out embedded tiles (seed 1), the default preset's samples
after 500 to 9,000 steps (experiments/training_length.py's runs, SDE-DPM-Solver++ at 20 steps, sample seed 7), and
the JAX trainer's and the PyTorch loop's samples of experiments/compare_trainers.py (3,000 steps, eps, DDIM 100 at
eta 1). Each reviewer gets them in its own random order, named grid_1.png ... grid_N.png, with nothing else. The
recorded reviewers were language-model agents, each in its own session, shown only its folder and PROMPT.
"""

import argparse
import json
import random
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_objectives import ROOT, machine  # noqa: E402

TILES, ZOOM = 16, 4
# name -> where its images come from (what ddpm_jax.data.load reads, and the embedded seed)
GRIDS = {
    "held-out tiles": ("embedded", 1),
    "500 steps, training seed 0": ("runs/length/steps500_seed0/samples_sde-dpmsolver++_20.npy", 0),
    "2,000 steps, training seed 0": ("runs/length/steps2000_seed0/samples_sde-dpmsolver++_20.npy", 0),
    "4,500 steps (the default), training seed 0": ("runs/length/steps4500_seed0/samples_sde-dpmsolver++_20.npy", 0),
    "9,000 steps, training seed 0": ("runs/length/steps9000_seed0/samples_sde-dpmsolver++_20.npy", 0),
    "9,000 steps, training seed 1": ("runs/length/steps9000_seed1/samples_sde-dpmsolver++_20.npy", 0),
    "JAX trainer, eps, 3,000 steps": ("runs/compare/jax_ddim100.npz", 0),
    "PyTorch loop, eps, 3,000 steps": ("runs/compare/torch_ddim100.npz", 0),
}
REVIEWERS = ("language-model agents, each in its own session, told to open only the PNGs of its folder and given "
             "only PROMPT")
PROMPT = """You are shown {n} images, grid_1.png to grid_{n}.png, in the folder {folder}. Each is a grid of 16 small
square images (32 x 32 pixels each, drawn 4x). Look at every grid (open each PNG). For each grid, say in a few words
what the images depict, rate from 0 to 10 how clearly and convincingly they depict it (10: as clear as real
photographs of the subject), and name their main defects. Judge each grid on its own; nothing else is known about
them. Answer with only a JSON list, one object per grid: {{"grid": "grid_1", "depicts": "...", "rating": 7,
"defects": "..."}}."""


def make(folder: Path, reviewers: int, seed: int) -> None:
    from ddpm_jax.data import load
    from ddpm_jax.images import save_grid

    pictures = {}
    for name, (spec, embedded_seed) in GRIDS.items():
        spec = spec if spec == "embedded" else str(ROOT / spec)
        pictures[name] = load(spec, 32, num=TILES, embedded_seed=embedded_seed) / 255.0
    rng = random.Random(seed)
    key = {}
    for i in range(1, reviewers + 1):
        order = list(GRIDS)
        rng.shuffle(order)
        for j, name in enumerate(order, 1):
            save_grid(pictures[name], folder / f"reviewer{i}" / f"grid_{j}.png", zoom=ZOOM)
        key[f"reviewer{i}"] = {f"grid_{j}": name for j, name in enumerate(order, 1)}
    (folder / "key.json").write_text(json.dumps({"seed": seed, "key": key}, indent=2) + "\n")
    print(PROMPT.format(n=len(GRIDS), folder=f"{folder}/reviewer<i>"))


def record(folder: Path, out: Path) -> None:
    shuffles = json.loads((folder / "key.json").read_text())
    key = shuffles["key"]
    answers = {}
    for reviewer, grids in key.items():
        for a in json.loads((folder / reviewer / "answer.json").read_text()):
            answers.setdefault(grids[a["grid"]], {})[reviewer] = {k: a[k] for k in ("rating", "depicts", "defects")}
    out.write_text(json.dumps({"grids": {name: list(GRIDS[name]) for name in GRIDS}, "reviewers": REVIEWERS,
                               "prompt": PROMPT, "shuffle_seed": shuffles["seed"], "key": key,
                               "answers": {name: answers[name] for name in GRIDS}, "machine": machine(),
                               "command": " ".join(["python", "experiments/blind_check.py", *sys.argv[1:]])},
                              indent=2) + "\n")


def table(path: Path) -> str:
    """Markdown: each grid's rating by each reviewer, and their mean."""
    answers = json.loads(path.read_text())["answers"]
    reviewers = sorted({r for a in answers.values() for r in a})
    rows = ["| grid (16 images) | " + " | ".join(reviewers) + " | mean |", "|---" * (len(reviewers) + 2) + "|"]
    for name, by in answers.items():
        ratings = [by[r]["rating"] for r in reviewers]
        rows.append(f"| {name} | " + " | ".join(f"{x:g}" for x in ratings) + f" | {statistics.mean(ratings):.1f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--reviewers", type=int, default=3)
    m.add_argument("--seed", type=int, default=0, help="of the shuffles")
    r = sub.add_parser("record")
    r.add_argument("folder", type=Path)
    r.add_argument("out", type=Path)
    t = sub.add_parser("table")
    t.add_argument("record", type=Path)
    args = p.parse_args(argv)
    if args.command == "make":
        make(args.folder, args.reviewers, args.seed)
    elif args.command == "record":
        record(args.folder, args.out)
    else:
        print(table(args.record))


if __name__ == "__main__":
    main()
