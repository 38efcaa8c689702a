"""The SHA-256 of the default preset's train step as lowered StableHLO (source locations removed): two checkouts
that print the same hash compile the same program, so their step times can differ only by the machine.

    python benchmarks/program_hash.py --prediction eps  # this checkout, the default preset learning eps
    git worktree add /tmp/before <commit>
    python benchmarks/program_hash.py --tree /tmp/before  # a checkout from before --prediction (eps)
"""

import argparse
import dataclasses
import hashlib
import re
import sys
from pathlib import Path


def program_hash(tree: Path, prediction: str | None) -> tuple[str, int]:
    sys.path.insert(0, str(tree))
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ddpm_jax import runtime, train_state
    from ddpm_jax.config import PRESETS
    try:  # validate's module since config.py became data; a checkout from before holds it in config.py
        from ddpm_jax.validation import validate
    except ImportError:
        from ddpm_jax.config import validate

    config = PRESETS["default"]
    if prediction:  # unweighted, as every checkout before the loss weights
        config = dataclasses.replace(config, prediction=prediction, loss_weight="none")
    schedule = validate(config, 1)
    tx = train_state.make_optimizer(config)
    mesh = runtime.data_mesh()
    replicated = NamedSharding(mesh, P())
    graphdef, abstract, _ = train_state.initial_state(config, tx, replicated)
    step = train_state.jit_train_step(config, graphdef, schedule, tx, replicated)
    batch = jax.ShapeDtypeStruct((config.batch_size, config.image_size, config.image_size, 3), np.float32,
                                 sharding=NamedSharding(mesh, P("data")))
    text = re.sub(r"loc\(.*?\)", "", step.lower(abstract, batch, jax.random.key(0)).as_text())
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#loc"))
    return hashlib.sha256(text.encode()).hexdigest(), len(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout whose ddpm_jax to import (default: this one)")
    p.add_argument("--prediction", help="eps | x0 | v, unweighted, instead of the preset's objective (a checkout with "
                   "--prediction)")
    args = p.parse_args()
    digest, size = program_hash(args.tree.resolve(), args.prediction)
    print(f"{digest}  ({size} characters of StableHLO)")
