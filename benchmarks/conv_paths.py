"""XLA:CPU's two paths for the U-Net's dense convolutions: YNNPACK (XLA's default) against Eigen (the train step's).

    python benchmarks/conv_paths.py [--config default|article|tiny] [--rounds 7] [--json out.json]

Collects every dense convolution of the bench config's U-Net from its jaxpr (the shapes one JAX device sees
when train.py splits the batch over one device per core), then times each shape's forward and its
forward + both gradients, compiled with XLA's default options and with `runtime.training_compiler_options()`,
the two alternating in rounds (median per shape). Totals weight each shape by how often the U-Net has it.
Run it as train.py runs: one device per core, so each device has one core (`taskset -c 0` on a 2-core
machine gives the same picture).
"""

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CONFIGS, cpu_info, machine_name, versions  # noqa: E402


def dense_conv_shapes(cfg, batch):
    """Counter of (lhs shape, kernel shape, padding) over the U-Net's dense (feature_group_count 1) convolutions."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ddpm_jax.config import ModelConfig
    from ddpm_jax.unets import build_model

    model = build_model(ModelConfig(cfg["model"], cfg["dim"], dim_mults=tuple(cfg["dim_mults"])), rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((batch, cfg["image_size"], cfg["image_size"], 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    shapes = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] == 1:
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                shapes[(lhs, rhs, tuple(map(tuple, eqn.params["padding"])))] += 1
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(lambda x, t: model(x, t))(x, t).jaxpr)
    return shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax import lax

    from ddpm_jax import runtime

    jax.config.update("jax_platforms", "cpu")
    cfg = CONFIGS[args.config]
    devices = runtime.use_cpu_cores_as_devices(cfg["batch_size"]) or jax.device_count()
    options = {"YNNPACK (XLA's default)": {}, "Eigen (training_compiler_options)": runtime.training_compiler_options()}
    rng = np.random.default_rng(0)
    rows = []
    for (lhs, rhs, padding), count in sorted(dense_conv_shapes(cfg, cfg["batch_size"] // devices).items()):
        x = jnp.asarray(rng.standard_normal(lhs, np.float32))
        w = jnp.asarray(rng.standard_normal(rhs, np.float32) / np.sqrt(np.prod(rhs[:3])))

        def conv(x, w, padding=padding):
            return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def fwd_bwd(x, w):
            y, vjp = jax.vjp(conv, x, w)
            return vjp(y)

        programs = {(name, kind): jax.jit(fn, compiler_options=opts)
                    for name, opts in options.items() for kind, fn in (("forward", conv), ("fwd+bwd", fwd_bwd))}
        times = collections.defaultdict(list)
        for program in programs.values():
            jax.block_until_ready(program(x, w))
        for r in range(args.rounds):
            for key in (list(programs) if r % 2 == 0 else list(programs)[::-1]):
                t0 = time.perf_counter()
                jax.block_until_ready(programs[key](x, w))
                times[key].append(time.perf_counter() - t0)
        row = {"lhs": lhs, "kernel": rhs, "count": count,
               **{f"{name} | {kind} ms": 1e3 * statistics.median(ts) for (name, kind), ts in times.items()}}
        rows.append(row)
        print(row, file=sys.stderr)
    names = list(options)
    lines = [f"`--config {args.config}`, {devices} JAX devices (batch {cfg['batch_size'] // devices} each), on "
             f"{machine_name({'cpu': cpu_info()})}; ms, medians of {args.rounds} alternating rounds", "",
             "| input (B, H, W, C) | kernel | count | " + " | ".join(f"{n}: fwd / fwd+bwd" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = " | ".join(f"{row[f'{n} | forward ms']:.2f} / {row[f'{n} | fwd+bwd ms']:.2f}" for n in names)
        lines.append(f"| {row['lhs']} | {row['kernel'][:2]} {row['kernel'][2]}->{row['kernel'][3]} | {row['count']} | {cells} |")
    totals = {n: {k: sum(r[f"{n} | {k} ms"] * r["count"] for r in rows) for k in ("forward", "fwd+bwd")} for n in names}
    lines.append("| **whole U-Net, per device** | | | " + " | ".join(
        f"**{totals[n]['forward']:.1f} / {totals[n]['fwd+bwd']:.1f}**" for n in names) + " |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"config": {**cfg, "name": args.config}, "devices": devices,
                                         "machine": {"cpu": cpu_info(), "versions": versions()},
                                         "rows": rows, "totals_ms": totals}, indent=2, default=list) + "\n")


if __name__ == "__main__":
    main()
