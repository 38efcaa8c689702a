"""Where the time goes: each part of a ConvNeXt block, JAX against the PyTorch reference, in one process.

    python benchmarks/layers.py [--config default|article] [--json out.json]

For every level of the bench config's U-Net, times a whole ConvNextBlock (dim -> dim, with its time
embedding) and its parts: the 7x7 depthwise `in_conv`, the GroupNorm, the 3x3 convs (dim -> 2 dim and
2 dim -> dim) and the GELU, forward and forward + backward (gradients of sum(y^2) with respect to the
input and the parameters), median of --repeats runs after warm-up; each framework with its default
threading, one after the other in one process (so noisier than bench.py's alternating rounds). The ratio
JAX / PyTorch per part shows which layers still cost more in XLA than in PyTorch.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CONFIGS  # noqa: E402  (the same configs as the whole-model benchmark)


def median_ms(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_torch(block, x_np, emb_np, repeats, warmup):
    import torch

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    x, emb = nchw(x_np), torch.from_numpy(emb_np)
    wide = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    parts = {
        "ConvNextBlock": (lambda v: block(v, emb), x),
        "depthwise 7x7": (block.in_conv, x),
        "GroupNorm": (block.block[0], x),
        "conv 3x3 C->2C": (block.block[1], x),
        "GELU (2C)": (block.block[2], wide),
        "conv 3x3 2C->C": (block.block[4], wide),
    }
    out = {}
    for name, (fn, inp) in parts.items():
        def forward(fn=fn, inp=inp):
            with torch.no_grad():
                fn(inp)

        leaf = inp.clone().requires_grad_(True)

        def grad(fn=fn, leaf=leaf):
            block.zero_grad(set_to_none=True)
            leaf.grad = None
            (fn(leaf) ** 2).sum().backward()

        out[name] = (median_ms(forward, repeats, warmup), median_ms(grad, repeats, warmup))
    return out


def time_jax(block, x_np, emb_np, repeats, warmup):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    x, emb = jnp.asarray(x_np), jnp.asarray(emb_np)
    wide = jnp.asarray(np.random.default_rng(1).standard_normal((*x.shape[:3], 2 * x.shape[3]), np.float32))
    layers = block.block.layers
    parts = {
        "ConvNextBlock": (lambda m, v: m(v, emb), block, x),
        "depthwise 7x7": (lambda m, v: m(v), block.in_conv, x),
        "GroupNorm": (lambda m, v: m(v), layers[0], x),
        "conv 3x3 C->2C": (lambda m, v: m(v), layers[1], x),
        "GELU (2C)": (lambda m, v: layers[2](v), None, wide),
        "conv 3x3 2C->C": (lambda m, v: m(v), layers[4], wide),
    }
    out = {}
    for name, (fn, module, inp) in parts.items():
        graphdef, params = nnx.split(module) if module is not None else (None, None)

        def apply(p, v, fn=fn, graphdef=graphdef):
            return fn(nnx.merge(graphdef, p) if graphdef is not None else None, v)

        forward = jax.jit(apply)
        grad = jax.jit(jax.grad(lambda p, v, apply=apply: jnp.sum(apply(p, v) ** 2), argnums=(0, 1)))
        out[name] = (
            median_ms(lambda: jax.block_until_ready(forward(params, inp)), repeats, warmup),
            median_ms(lambda: jax.block_until_ready(grad(params, inp)), repeats, warmup),
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    threads = os.cpu_count()
    import jax
    import torch
    from flax import nnx

    import ddpm_jax.blocks as jb
    import ddpm_torch.blocks as tb
    from ddpm_jax.convert import _to_flax_layout, torch_key

    jax.config.update("jax_platforms", "cpu")
    torch.set_num_threads(threads)
    cfg = CONFIGS[args.config]
    rng = np.random.default_rng(0)
    results, lines = [], []
    size = cfg["image_size"]
    for level, mult in enumerate(cfg["dim_mults"]):
        dim, emb_dim = cfg["dim"] * mult, 4 * cfg["dim"]
        shape = (cfg["batch_size"], size >> level, size >> level, dim)
        torch.manual_seed(level)
        t_block = tb.ConvNextBlock(dim, dim, time_embedding_dim=emb_dim)
        j_block = jb.ConvNextBlock(dim, dim, time_embedding_dim=emb_dim, rngs=nnx.Rngs(level))
        # The same weights on both sides, so both compute the same function.
        state = {k: v.detach().numpy() for k, v in t_block.state_dict().items()}
        for path, var in nnx.to_flat_state(nnx.state(j_block, nnx.Param)):
            var.set_value(jax.numpy.asarray(_to_flax_layout(state[torch_key(path)])))
        x = rng.standard_normal(shape, np.float32)
        emb = rng.standard_normal((shape[0], emb_dim), np.float32)
        t_ms = time_torch(t_block, x, emb, args.repeats, args.warmup)
        j_ms = time_jax(j_block, x, emb, args.repeats, args.warmup)
        for part in t_ms:
            row = {"level": level, "shape_BHWC": list(shape), "part": part,
                   "torch_fwd_ms": t_ms[part][0], "jax_fwd_ms": j_ms[part][0],
                   "torch_fwd_bwd_ms": t_ms[part][1], "jax_fwd_bwd_ms": j_ms[part][1]}
            results.append(row)
            lines.append(f"| {level} {tuple(shape)} | {part} | {row['torch_fwd_ms']:.2f} | {row['jax_fwd_ms']:.2f} | "
                         f"{row['jax_fwd_ms'] / row['torch_fwd_ms']:.2f} | {row['torch_fwd_bwd_ms']:.2f} | "
                         f"{row['jax_fwd_bwd_ms']:.2f} | {row['jax_fwd_bwd_ms'] / row['torch_fwd_bwd_ms']:.2f} |")
    print(f"{threads} threads; times in ms, medians of {args.repeats}\n")
    print("| level (B,H,W,C) | part | torch fwd | JAX fwd | ratio | torch fwd+bwd | JAX fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {**cfg, "dim_mults": list(cfg["dim_mults"])},
                                               "threads": threads, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
