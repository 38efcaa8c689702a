"""Weights between the reference (torch, NCHW) and the Flax U-Nets (NHWC), checkpoint formats, CLI.

A Flax parameter's path, with NNX's `layers` level of Sequential dropped and `kernel`/`scale` read as
`weight`, is the torch `state_dict` key. What is transposed, and nothing else:
  - conv kernels: torch OIHW <-> flax HWIO  (`transpose(2, 3, 1, 0)`, inverse `transpose(3, 2, 0, 1)`)
  - linear weights: torch (out, in) <-> flax (in, out)  (`.T`)
Biases and GroupNorm scales are copied. Key sets and every shape are checked before anything is copied,
and one error lists every mismatch.

    python -m ddpm_jax.convert to-flax article_checkpoint.pt flax_model/
    python -m ddpm_jax.convert to-torch flax_model/ unet.pt
"""

import argparse
import dataclasses
import json
import pickle
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ddpm_jax import cli
from ddpm_jax.config import ModelConfig, read_json
from ddpm_jax.schedules import Schedule
from ddpm_jax.unets import build_model

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
# Schedule buffers a reference DiffusionModel adds to its state_dict next to `model.*`: the same
# seven coefficients the Schedule pytree holds.
DIFFUSION_BUFFERS = frozenset(Schedule._fields)


class ConversionError(ValueError):
    """A checkpoint that cannot become a model; the message says which file and what is wrong."""


def torch_key(path: tuple) -> str:
    """The torch state_dict key of a Flax parameter path."""
    parts = [str(p) for p in path if p != "layers"]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 2:
        return a.T
    return a


def _to_flax_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 2:
        return a.T
    return a


def _flat_params(model: nnx.Module):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def to_torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as a reference state_dict (numpy arrays, torch layout, contiguous)."""
    return {
        torch_key(path): np.array(_to_torch_layout(np.asarray(var.get_value())), order="C")
        for path, var in _flat_params(model)
    }


def load_torch_state(model: nnx.Module, state: dict[str, np.ndarray], source: str = "state_dict") -> nnx.Module:
    """Copy a reference state_dict into `model` (may be abstract); strict: one error lists every mismatch."""
    flat = _flat_params(model)
    expected = {torch_key(path): tuple(_to_torch_layout(np.empty(var.shape)).shape) for path, var in flat}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ConversionError("\n".join(lines))
    params = nnx.from_flat_state(
        {path: jax.numpy.asarray(_to_flax_layout(np.asarray(state[torch_key(path)], dtype=np.float32))) for path, _ in flat}
    )
    nnx.update(model, params)
    return model


def infer_config(state: dict[str, np.ndarray], source: str = "state_dict") -> ModelConfig:
    """Read variant, dim, init_dim, out_dim, dim_mults and channels off a reference state_dict's shapes."""

    def shape(key):
        if key not in state:
            raise ConversionError(
                f"{source}: cannot infer the U-Net architecture, key {key!r} is missing "
                f"(expected a state_dict of the article's OneResUNet/TwoResUNet/AttentionUNet)"
            )
        return tuple(state[key].shape)

    init_dim, channels = shape("init_conv.weight")[:2]
    dim = shape("time_mlp.1.weight")[1]
    out_dim = shape("final_conv.weight")[0]
    levels = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("downs.")), default=-1)
    if levels < 1:
        shape("downs.0.0.in_conv.weight")
    level_dims = [shape(f"downs.{i}.2.net.1.weight")[0] for i in range(levels - 1)]
    level_dims.append(shape(f"downs.{levels - 1}.2.weight")[0])
    if any(d % dim for d in level_dims):
        raise ConversionError(f"{source}: level widths {level_dims} are not multiples of dim={dim}")
    if "ups.0.0.gate_conv.weight" in state:
        variant = "AttentionUNet"
    elif shape("ups.0.1.in_conv.weight")[0] == shape("ups.0.0.in_conv.weight")[0]:
        variant = "TwoResUNet"
    else:
        variant = "OneResUNet"
    return ModelConfig(
        variant=variant,
        dim=dim,
        init_dim=init_dim,
        out_dim=out_dim,
        dim_mults=tuple(d // dim for d in level_dims),
        channels=channels,
    )


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def unet_state_from_checkpoint(obj, *, ema: bool = True, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The U-Net weights inside a loaded torch object: a U-Net state_dict, a DiffusionModel state_dict
    (`model.*` plus schedule buffers), or the article trainer's {"step", "model", "opt", "ema", "version"}."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        if ema:
            if not isinstance(obj.get("ema"), dict):
                raise ConversionError(
                    f"{source}: trainer checkpoint has no 'ema' weights; load the raw weights with ema=False "
                    f"(CLI: --no-ema)"
                )
            obj = _strip(obj["ema"], "ema_model.")
        else:
            obj = obj["model"]
    if any(k.startswith("model.") for k in obj):
        obj = {k: v for k, v in obj.items() if k not in DIFFUSION_BUFFERS}
        obj = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in obj.items()}
    state = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{source}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        state[k] = v.detach().cpu().float().numpy()
    return state


def read_torch_file(path) -> object:
    """torch.load with weights_only=True; a clear error for a missing, foreign or unsafe file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    # torch.save writes a zip archive, or in its legacy format a pickle (PROTO opcode first). Anything
    # else is read as a pickle too, and fails with the UnpicklingError of a checkpoint holding code.
    with path.open("rb") as f:
        pickled = f.read(1) == pickle.PROTO
    if not (pickled or zipfile.is_zipfile(path)):
        raise ConversionError(f"{path}: is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, which "
            f"weights_only=True does not run (only load checkpoints you trust). Detail: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        raise ConversionError(f"{path}: is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def save_model(model: nnx.Module, config: ModelConfig, out_dir) -> Path:
    """Write the project's model directory: model.json and an Orbax checkpoint of the parameters."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    (out_dir / MODEL_JSON).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return out_dir


def read_model_config(directory) -> ModelConfig:
    path = Path(directory) / MODEL_JSON
    try:
        return ModelConfig.from_dict(read_json(path), str(path))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: not a valid model config ({e})") from None


def restore_params(model: nnx.Module, params_dir, source: str) -> nnx.Module:
    """Fill `model` (may be abstract) from an Orbax checkpoint of its parameters' pure dict."""
    import orbax.checkpoint as ocp

    target = nnx.state(model, nnx.Param)
    # Restore onto this host's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), nnx.to_pure_dict(target))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(Path(params_dir).absolute(), abstract)
    except Exception as e:
        raise ConversionError(f"{source}: cannot restore parameters from {params_dir} ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(target, restored)
    nnx.update(model, target)
    return model


def _latest_step_dir(checkpoints: Path) -> Path | None:
    """The newest complete Orbax step folder (half-written ones carry a temporary suffix)."""
    steps = [d for d in checkpoints.iterdir() if d.name.isdigit() and d.is_dir()] if checkpoints.is_dir() else []
    return max(steps, key=lambda d: int(d.name), default=None)


def load_model(path, *, ema: bool = True, dtype=None) -> nnx.Module:
    """A ready Flax U-Net, called as `model(x_BHWC, t_B)`, from any supported checkpoint (see
    `load_model_and_config`)."""
    return load_model_and_config(path, ema=ema, dtype=dtype)[0]


def load_model_and_config(path, *, ema: bool = True, dtype=None) -> tuple[nnx.Module, ModelConfig]:
    """A ready Flax U-Net, called as `model(x_BHWC, t_B)`, and the config it was built from.

    `path` is one of: a torch file (.pt/.pth) holding a U-Net state_dict, a DiffusionModel state_dict,
    or the article trainer's checkpoint; a model directory written by `convert to-flax`/`save_model`;
    a training workdir (its latest checkpoint) or one of its `checkpoints/<step>` folders. EMA weights
    are taken where a checkpoint has them, unless ema=False. The architecture comes from the weights
    or the saved config; nothing has to be passed by hand.
    """
    from ddpm_jax.config import TrainConfig

    path = Path(path)
    if not path.is_dir():
        state = unet_state_from_checkpoint(read_torch_file(path), ema=ema, source=str(path))
        config = infer_config(state, str(path))  # a torch file cannot hold the time embedding's theta
        return load_torch_state(build_model(config, dtype=dtype), state, str(path)), config
    if (path / MODEL_JSON).is_file() and (path / PARAMS_DIR).is_dir():
        config = read_model_config(path)
        return restore_params(build_model(config, dtype=dtype), path / PARAMS_DIR, str(path)), config
    step_dir = path if path.name.isdigit() and (path / "params").is_dir() else _latest_step_dir(path / "checkpoints")
    workdir = path.parent.parent if step_dir == path else path
    if step_dir is None or not (workdir / "config.json").is_file():
        raise ConversionError(
            f"{path}: not a model directory ({MODEL_JSON} + {PARAMS_DIR}/), nor a training workdir with "
            f"config.json and a complete checkpoint under checkpoints/"
        )
    try:
        config = TrainConfig.from_dict(read_json(workdir / "config.json"), str(workdir / "config.json"))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{workdir / 'config.json'}: not a valid training config ({e})") from None
    model = build_model(config.model_config, dtype=dtype)
    return restore_params(model, step_dir / ("ema" if ema else "params"), str(step_dir)), config.model_config


def main(argv=None) -> int:
    cli.one_line_warnings()
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.convert",
        description="Convert U-Net weights between the article's PyTorch checkpoints and this project's Flax models.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    to_flax = sub.add_parser(
        "to-flax", help="torch checkpoint -> Flax model directory (model.json + Orbax params)"
    )
    to_flax.add_argument("input", help="a .pt/.pth: U-Net or DiffusionModel state_dict, or the article trainer's checkpoint")
    to_flax.add_argument("output", help="directory to write (created if needed)")
    to_flax.add_argument(
        "--no-ema", dest="ema", action="store_false", help="from a trainer checkpoint, take the raw weights, not the EMA"
    )
    to_torch = sub.add_parser("to-torch", help="any checkpoint -> a U-Net state_dict .pt for the reference model")
    to_torch.add_argument("input", help="a Flax model directory or any checkpoint that to-flax accepts")
    to_torch.add_argument("output", help="the .pt file to write; loads with load_state_dict(strict=True)")
    to_torch.add_argument("--no-ema", dest="ema", action="store_false", help="take the raw weights, not the EMA")
    args = parser.parse_args(argv)
    out = Path(args.output)
    try:
        if args.command == "to-flax" and out.exists() and not out.is_dir():
            raise ConversionError(f"{out}: is a file; expected a directory for {MODEL_JSON} and {PARAMS_DIR}/")
        if args.command == "to-torch" and out.is_dir():
            raise ConversionError(f"{out}: is a directory; expected a file path to write, e.g. {out / 'model.pt'}")
        model, config = load_model_and_config(args.input, ema=args.ema)
        if args.command == "to-flax":
            out = save_model(model, config, out)
        else:
            import torch

            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: torch.from_numpy(v) for k, v in to_torch_state(model).items()}, out)
    except (ConversionError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    theta = config.sinusoidal_pos_emb_theta
    note = f"; build the reference with sinusoidal_pos_emb_theta={theta}" if args.command == "to-torch" and theta != (
        ModelConfig.sinusoidal_pos_emb_theta) else ""
    print(f"wrote {out} ({config.variant}, dim={config.dim}, dim_mults={list(config.dim_mults)}{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
