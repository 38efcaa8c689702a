"""Does the JAX trainer learn what the PyTorch reference learns? And how good are its samples?

    python experiments/compare_trainers.py --steps 3000 --sampler ddim --sampling-steps 100   # docs/quality.md's

1. Trains the default preset (`python train.py`'s config) with the JAX trainer, and with a minimal
   PyTorch loop over the reference `DiffusionModel` (ddpm_torch.training.train_step): the same
   initial weights (the JAX initialisation exported with `to_torch_state`), the same batches in the
   same order (ddpm_jax.data.get_batch), the same AdamW, warm-up, clipping and EMA schedule. Each side
   draws its own timesteps and noise from its own generator, so agreement is statistical, not bitwise.
2. Scores both EMA models on held-out tiles (embedded seed 1, never trained on): the loss on a fixed set
   of (image, t, noise) triples, and the SWD of --num samples (--sampler and --sampling-steps, each trainer's own
   implementation: the reference has DDIM and DDPM) against --num held-out tiles, for --sample-sets sets of samples
   per trainer (their spread is the SWD's noise).
   The baseline is --num training tiles against the same held-out tiles. SWD standardises each set, so
   the colour distance of the same sets (`colour_distance`) is recorded beside it.
3. For the JAX model, DDIM at 10/25/50/100 steps against DDPM-1000: SWD and wall time.
4. Writes `results.json` (with the machine, the versions and the command), `loss.png` and sample grids to
   --report: 16 held-out tiles and 16 samples of each trainer (and of DDPM-1000), drawn 4x.

Every stage is cached in --out: run it again after an interruption and it continues where it stopped
(the JAX run resumes from its checkpoint; the PyTorch run restarts).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

from ddpm_jax import diffusion, runtime, training
from ddpm_jax.config import PRESETS
from ddpm_jax.checkpoints import load_model
from ddpm_jax.convert import to_torch_state
from ddpm_jax.unets import build_model
from ddpm_jax.data import embedded_dataset, get_batch
from ddpm_jax.evaluate import colour_distance, swd
from ddpm_jax.images import save_grid, to_uint8
from ddpm_jax.schedules import make_schedule
from ddpm_torch import UNETS, DiffusionModel
from ddpm_torch.training import train_step as torch_train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_objectives import machine as jax_machine  # noqa: E402  (the CPU, the cores, the commit, the versions)

HELD_OUT_SEED = 1  # the training tiles are embedded seed 0
SAMPLE_SEED = 7  # of the first sample set of each trainer (the others: 8, 9, ...)
SAMPLERS = [("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddim", 100), ("ddpm", 1000)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the default preset's)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                   help="the sampler scored on both sides, and the JAX run's grids' (default ddim)")
    p.add_argument("--sampling-steps", type=int, default=100, help="DDIM's steps (default 100; DDPM runs all T)")
    p.add_argument("--num", type=int, default=256, help="images per set for SWD and the held-out loss (default 256)")
    p.add_argument("--sample-sets", type=int, default=6,
                   help="sample sets per trainer for the SWD (seeds 7, 8, ...), to show its spread (default 6)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-ddpm", action="store_true", help="leave out DDPM-1000 (the slowest stage)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="work folder (cached stages)")
    p.add_argument("--report", type=Path, default=Path("docs/quality"), help="where results.json and PNGs go")
    return p.parse_args(argv)


def torch_ema_decay(config, step: int) -> float:
    """ema_pytorch's schedule as the article's trainer uses it (1.0 = keep, 0.0 = copy)."""
    if step % config.ema_every:
        return 1.0
    if step - config.ema_every <= config.ema_start:  # copies, and the first update after ema_start copies too
        return 0.0
    return min(config.ema_decay, 1.0 - (1.0 + step - config.ema_start) ** (-2.0 / 3.0))


def torch_lr_factor(config, step: int) -> float:
    """Linear warm-up from 0 over warmup_steps, then 1 or (lr_decay "cosine") half a cosine down to 0 at steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return step / config.warmup_steps
    if config.lr_decay == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def train_torch(config, init_state: dict, images: np.ndarray, out: Path) -> None:
    """The reference's train step in a loop: AdamW, warm-up, clipping, EMA as the JAX trainer configures them."""
    torch.manual_seed(config.seed)
    unet = UNETS[config.model](dim=config.dim, dim_mults=config.dim_mults)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in init_state.items()})
    model = DiffusionModel(unet, config.image_size, beta_scheduler=config.schedule, timesteps=config.timesteps)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, betas=(config.adam_b1, config.adam_b2),
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: torch_lr_factor(config, s))
    if config.grad_clip:  # clip inside the step, between backward and the optimizer, as optax.chain does
        def clip(*_):
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)

        opt.register_step_pre_hook(clip)
    records, window, t0 = [], [], time.perf_counter()
    for step in range(config.steps):
        x = torch.from_numpy(get_batch(images, config.batch_size, config.seed, step)).permute(0, 3, 1, 2)
        t = torch.randint(0, config.timesteps, (config.batch_size,))
        loss = torch_train_step(model, opt, x.contiguous(), t, torch.randn_like(x), config.loss)
        sched.step()
        decay = torch_ema_decay(config, step)
        if decay < 1.0:
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
        window.append(float(loss))
        if (step + 1) % config.log_every == 0:
            records.append({"step": step + 1, "loss": float(np.mean(window))})
            window = []
            if (step + 1) % (20 * config.log_every) == 0:
                print(f"torch step {step + 1}: loss {records[-1]['loss']:.4f}, "
                      f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.save({"model": unet.state_dict(), "ema": ema, "step": config.steps}, out / "final.pt")


def torch_model(config, path: Path) -> DiffusionModel:
    unet = UNETS[config.model](dim=config.dim, dim_mults=config.dim_mults)
    unet.load_state_dict(torch.load(path, weights_only=True)["ema"])
    return DiffusionModel(unet, config.image_size, beta_scheduler=config.schedule, timesteps=config.timesteps).eval()


def read_losses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])


def final_loss(losses: np.ndarray, fraction: float = 0.2) -> float:
    """Mean of the logged (already window-averaged) losses over the last `fraction` of training."""
    return float(np.mean(losses[-max(1, int(len(losses) * fraction)):]))


def held_out_loss(config, eval_fn, held_out: np.ndarray) -> float:
    """Mean l2/l1 noise-prediction loss on fixed (image, t, noise) triples: 4 timesteps per image."""
    rng = np.random.default_rng(1234)
    x0 = np.repeat(held_out.astype(np.float32) / 127.5 - 1.0, 4, axis=0)
    t = rng.integers(0, config.timesteps, len(x0))
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    return float(np.mean([eval_fn(x0[i:i + 256], t[i:i + 256], noise[i:i + 256]) for i in range(0, len(x0), 256)]))


def plot_losses(curves: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean per {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def cached(results: dict, key: str, results_path: Path, fn):
    if key not in results:
        results[key] = fn()
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(key, json.dumps(results[key]), flush=True)
    return results[key]


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    runtime.enable_compilation_cache()
    # The PyTorch loop learns the article's objective: eps, unweighted.
    config = dataclasses.replace(PRESETS["default"], prediction="eps", loss_weight="none", sampler=args.sampler,
                                 sampling_steps=args.sampling_steps)
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps, save_every=min(config.save_every, args.steps),
                                     sample_every=args.steps)
    runtime.use_cpu_cores_as_devices(config.batch_size)  # as train.py: one JAX device per core on a CPU
    args.out.mkdir(parents=True, exist_ok=True)
    args.report.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    config_json = json.loads(json.dumps(dataclasses.asdict(config)))
    if results.setdefault("config", config_json) != config_json:
        raise SystemExit(f"{results_path} was made with another config; use another --out")
    results["command"] = " ".join(["python", "experiments/compare_trainers.py", *(argv or sys.argv[1:])])
    results["machine"] = jax_machine()
    results["machine"]["versions"]["torch"] = torch.__version__

    images = embedded_dataset(config.embedded_size, config.image_size, seed=0)
    held_out = embedded_dataset(args.num, config.image_size, seed=HELD_OUT_SEED)

    # 1. Training, the JAX trainer first (it resumes by itself), then the PyTorch loop from the same weights.
    jax_dir, torch_dir = args.out / "jax", args.out / "torch"
    if not (jax_dir / "done").exists():
        t0 = time.perf_counter()
        training.train(config, jax_dir, progress=False)
        (jax_dir / "done").write_text(f"{time.perf_counter() - t0:.1f}\n")
    if not (torch_dir / "final.pt").exists():
        init = to_torch_state(build_model(config.model_config, rngs=nnx.Rngs(config.seed)))
        t0 = time.perf_counter()
        train_torch(config, init, images, torch_dir)
        (torch_dir / "done").write_text(f"{time.perf_counter() - t0:.1f}\n")
    results["train_seconds"] = {k: float((d / "done").read_text()) for k, d in (("jax", jax_dir), ("torch", torch_dir))}

    jax_ema, _ = load_model(jax_dir)  # the EMA weights of the last checkpoint
    ref = torch_model(config, torch_dir / "final.pt")
    schedule = make_schedule(config.schedule, config.timesteps)

    # 2. Losses and SWD of the two trainers.
    curves = {"JAX": read_losses(jax_dir / "metrics.jsonl"), "PyTorch": read_losses(torch_dir / "metrics.jsonl")}
    results["final_train_loss"] = {k: final_loss(v[1]) for k, v in curves.items()}

    def jax_loss(x0, t, noise):
        x0, t, noise = map(jax.numpy.asarray, (x0, t, noise))
        return float(diffusion.p_loss(jax_ema, schedule, x0, t, noise, config.objective))

    def torch_loss(x0, t, noise):
        def nchw(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

        with torch.inference_mode():
            return ref.p_loss(nchw(x0), torch.from_numpy(t), nchw(noise), loss_type=config.loss).item()

    cached(results, "held_out_loss", results_path,
           lambda: {"jax": held_out_loss(config, jax_loss, held_out), "torch": held_out_loss(config, torch_loss, held_out)})

    batch_sharding = runtime.replicate_for_sampling(jax_ema, args.num)  # as the sample CLI

    def seed_suffix(seed):
        return "" if seed == SAMPLE_SEED else f"_seed{seed}"

    def jax_samples(sampler, steps, seed=SAMPLE_SEED):
        path = args.out / f"jax_{sampler}{steps}{seed_suffix(seed)}.npz"
        if not path.exists():
            t0 = time.perf_counter()
            settings = diffusion.sampler_settings(sampler, timesteps=config.timesteps, steps=steps, eta=config.eta,
                                                  prediction=config.prediction)
            x = diffusion.sample(jax_ema, schedule, jax.random.key(seed), args.num, config.image_size, settings,
                                 batch_sharding=batch_sharding)
            x = np.asarray(jax.block_until_ready(x))
            np.savez(path, images=to_uint8(x.clip(0, 1)), seconds=time.perf_counter() - t0)
        with np.load(path) as f:
            return f["images"], float(f["seconds"])

    def torch_samples(seed=SAMPLE_SEED):
        path = args.out / f"torch_{config.sampler}{config.sampling_steps}{seed_suffix(seed)}.npz"
        if not path.exists():
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            shape = (args.num, 3, config.image_size, config.image_size)
            with torch.inference_mode():
                x = (ref.ddim_sample(shape, config.sampling_steps, config.eta) if config.sampler == "ddim"
                     else ref.p_sample_loop(shape))
            np.savez(path, images=to_uint8(x.clamp(0, 1).numpy()), seconds=time.perf_counter() - t0)
        with np.load(path) as f:
            return f["images"], float(f["seconds"])

    train_subset = images[:args.num]
    cached(results, "swd_data_baseline", results_path, lambda: swd(held_out, train_subset))
    steps = config.sampling_steps if config.sampler == "ddim" else config.timesteps
    jax_x, _ = jax_samples(config.sampler, steps)
    torch_x, _ = torch_samples()
    cached(results, "swd_jax", results_path, lambda: swd(held_out, jax_x))
    cached(results, "swd_torch", results_path, lambda: swd(held_out, torch_x))
    more = range(SAMPLE_SEED + 1, SAMPLE_SEED + args.sample_sets)  # the first set is the one scored above
    if results.get("swd_sets", {}).get("seeds") != [SAMPLE_SEED, *more]:  # --sample-sets changed: score anew
        results.pop("swd_sets", None)
        results.pop("colour", None)
    cached(results, "swd_sets", results_path, lambda: {
        "seeds": [SAMPLE_SEED, *more],
        "jax": [results["swd_jax"]["swd"],
                *(swd(held_out, jax_samples(config.sampler, steps, s)[0])["swd"] for s in more)],
        "torch": [results["swd_torch"]["swd"], *(swd(held_out, torch_samples(s)[0])["swd"] for s in more)],
    })
    seeds = results["swd_sets"]["seeds"]
    cached(results, "colour", results_path, lambda: {  # what SWD's per-set standardisation cannot see
        "baseline": colour_distance(held_out, train_subset),
        "jax": [colour_distance(held_out, jax_samples(config.sampler, steps, s)[0]) for s in seeds],
        "torch": [colour_distance(held_out, torch_samples(s)[0]) for s in seeds],
    })
    for name, x in (("held_out", held_out), ("samples_jax", jax_x), ("samples_torch", torch_x)):
        save_grid(x[:16] / 255.0, args.report / f"{name}_zoom.png", zoom=4)  # 16 of each at 4x, to judge the detail
    plot_losses(curves, args.report / "loss.png", config.log_every)

    # 3. Samplers: DDIM at several step counts against DDPM-1000, on the JAX EMA model.
    for sampler, n in SAMPLERS:
        if sampler == "ddpm" and args.skip_ddpm:
            continue

        def score(sampler=sampler, n=n):
            x, seconds = jax_samples(sampler, n)
            return {"swd": swd(held_out, x)["swd"], "seconds": seconds}

        cached(results, f"sampler_{sampler}{n}", results_path, score)
    if not args.skip_ddpm:
        save_grid(jax_samples("ddpm", 1000)[0][:16] / 255.0, args.report / "samples_jax_ddpm1000_zoom.png", zoom=4)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    (args.report / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
