"""An article-format trainer checkpoint to convert: the `article` preset's U-Net (TwoResUNet dim 64, dim_mults
1,2,4,8) built by the reference with seeded random weights, saved as the article's trainer saves it
({"step", "model", "opt", "ema", "version"}, EMA weights differing from the raw ones).

    python experiments/article_checkpoint.py model-37.pt
    ddpm-convert to-flax model-37.pt flax_model/          # prints the check's worst difference
    ddpm-convert to-torch flax_model/ unet.safetensors

With --record, it then runs those two commands itself, in the checkpoint's folder (which should hold nothing else),
and writes docs/convert.md's record: the parameter count, each command with what it printed, its worst difference
and its wall time, the machine, the versions, the date and the command:

    python experiments/article_checkpoint.py /tmp/convert/model-37.pt --record docs/convert/article_checkpoint.json
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

import ddpm_torch
from ddpm_jax.config import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_objectives  # noqa: E402  (the machine record: CPU, cores, commit, versions)

CONVERSIONS = (["to-flax", "{checkpoint}", "flax_model/"], ["to-torch", "flax_model/", "unet.safetensors"])
# What ddpm-convert prints after its check (cli.py's _convert): the worst difference, as a user reads it.
VERIFIED = re.compile(r"differ by at most (\S+) on random inputs")


def convert(folder: Path, argv: list[str]) -> dict:
    """Run `ddpm-convert argv` in `folder` as a user does, timed; its worst difference as it prints it."""
    command = [str(Path(sys.executable).parent / "ddpm-convert"), *argv]  # the venv's, as installed
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not (found := VERIFIED.search(done.stdout)):
        sys.exit(f"ddpm-convert {' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return {"command": " ".join(["ddpm-convert", *argv]), "worst_difference": float(found.group(1)),
            "wall_s": round(seconds, 1), "printed": done.stdout.strip().splitlines()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the .pt file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", metavar="JSON", help="then convert it with ddpm-convert and write this record")
    args = p.parse_args(argv)
    # Other jobs on the machine slow the conversions down: the load before this script's own work says whether
    # there were any (1, 5 and 15 minutes; 0.5 is half a core busy elsewhere).
    load = [round(x, 2) for x in os.getloadavg()]
    config = PRESETS["article"]
    unets = []
    for seed in (args.seed, args.seed + 1):  # raw, EMA
        torch.manual_seed(seed)
        unets.append(ddpm_torch.UNETS[config.model](config.dim, dim_mults=config.dim_mults))
    raw, ema = (ddpm_torch.DiffusionModel(u, config.image_size, timesteps=config.timesteps) for u in unets)
    ema_state = {f"ema_model.{k}": v for k, v in ema.state_dict().items()}
    ema_state.update(initted=torch.tensor(True), step=torch.tensor(37000))
    opt = torch.optim.Adam(raw.parameters(), lr=config.lr).state_dict()
    torch.save({"step": 37000, "model": raw.state_dict(), "opt": opt, "ema": ema_state, "version": "1.0"}, args.out)
    parameters = sum(p.numel() for p in unets[0].parameters())
    print(f"wrote {args.out}: {config.model} dim {config.dim} dim_mults {list(config.dim_mults)}, "
          f"{parameters:,} parameters")
    if not args.record:
        return
    del unets, raw, ema, ema_state, opt  # the conversions' memory, not this process's
    out = Path(args.out)
    runs = [convert(out.parent, [a.format(checkpoint=out.name) for a in flags]) for flags in CONVERSIONS]
    machine = compare_objectives.machine()
    machine["versions"].update(torch=version("torch"), safetensors=version("safetensors"))
    del machine["devices"]  # JAX_NUM_CPU_DEVICES, which a conversion does not use
    machine["load_average_before"] = load
    if load[0] >= 0.5:
        machine["note"] = (f"shared: other jobs ran on the machine (load {load[0]} on {machine['cores']} cores), so "
                           f"the wall times are slower than on an idle one")
    record = {"model": {"variant": config.model, "dim": config.dim, "dim_mults": list(config.dim_mults),
                        "parameters": parameters, "weights": f"random, seeds {args.seed} (raw) and "
                        f"{args.seed + 1} (EMA, which the conversions take)"},
              "conversions": runs, "machine": machine, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "experiments/article_checkpoint.py", *(argv or sys.argv[1:])])}
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(record, indent=2) + "\n")
    for run in runs:
        print(f"{run['command']}: worst difference {run['worst_difference']:.1e}, {run['wall_s']} s")
    print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
