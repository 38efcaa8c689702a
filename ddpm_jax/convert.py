"""Weights between the reference (torch, NCHW) and the Flax U-Nets (NHWC), and the torch files that hold them.

A Flax parameter's path, with NNX's `layers` level of Sequential dropped and `kernel`/`scale` read as
`weight`, is the torch `state_dict` key. What is transposed, and nothing else:
  - conv kernels: torch OIHW <-> flax HWIO  (`transpose(2, 3, 1, 0)`, inverse `transpose(3, 2, 0, 1)`)
  - linear weights: torch (out, in) <-> flax (in, out)  (`.T`)
Biases and GroupNorm scales are copied. Key sets and every shape are checked before anything is copied,
and one error lists every mismatch. `checkpoints.load_model` reads torch files through this module; the
`ddpm-convert` command (cli.py) writes either format, and `verify` checks the result against the reference:

    ddpm-convert to-flax article_checkpoint.pt flax_model/
    ddpm-convert to-torch flax_model/ unet.safetensors     # or unet.pt
"""

import pickle
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ddpm_jax.config import ModelConfig
from ddpm_jax.schedules import Schedule

# Schedule buffers a reference DiffusionModel adds to its state_dict next to `model.*`: the same
# seven coefficients the Schedule pytree holds.
DIFFUSION_BUFFERS = frozenset(Schedule._fields)


SAFETENSORS = ".safetensors"
VERIFY_TOLERANCE = 1e-4  # worst |flax - torch| that `ddpm-convert` accepts


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


def read_weights_file(path) -> object:
    """A torch file (torch.load with weights_only=True) or a .safetensors file (no pickle at all; any dtype,
    bf16 included); a clear error for a missing, foreign, damaged or unsafe file."""
    import safetensors.torch
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == SAFETENSORS:
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors reports a truncated or foreign file as SafetensorError
            raise ConversionError(f"{path}: is not a readable safetensors file ({type(e).__name__}: {e})") from None

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


def write_weights_file(model: nnx.Module, path) -> Path:
    """Save the model's weights as a reference U-Net state_dict, which loads with `load_state_dict(strict=True)`:
    `torch.save` format, or safetensors where `path` ends in .safetensors (read it with
    `safetensors.torch.load_file`)."""
    import safetensors.torch
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(v) for k, v in to_torch_state(model).items()}
    if path.suffix == SAFETENSORS:
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


def reference_unet(config: ModelConfig, state: dict[str, np.ndarray]):
    """The article's PyTorch U-Net (ddpm_torch) of `config`, holding `state` (strict)."""
    import torch

    import ddpm_torch

    kwargs = dict(dim=config.dim, init_dim=config.init_dim, out_dim=config.out_dim, dim_mults=config.dim_mults,
                  channels=config.channels, sinusoidal_pos_emb_theta=config.sinusoidal_pos_emb_theta)
    unet = ddpm_torch.UNETS[config.variant](**kwargs)
    unet.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
    return unet.eval()


def verify(model: nnx.Module, unet, *, num: int = 3, seed: int = 0, timesteps: int = 1000) -> float:
    """The worst absolute difference between the Flax `model` and the reference `unet` (torch) on `num` random
    images at times spread over [0, timesteps), both in float32 (highest matmul precision). The images are as
    small as the U-Net's levels allow: 4 px at the lowest level."""
    import torch

    size = 4 * 2 ** (len(model.downs) - 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, size, size, model.channels)).astype(np.float32)
    t = np.linspace(0, timesteps - 1, num).round().astype(np.int32)
    with torch.no_grad():
        expected = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long()).numpy()
    with jax.default_matmul_precision("highest"):
        ours = _forward(model, jax.numpy.asarray(x), jax.numpy.asarray(t))
    return float(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - expected).max())


@nnx.jit
def _forward(model, x_BHWC, t_B):
    return model(x_BHWC, t_B)


if __name__ == "__main__":  # python -m ddpm_jax.convert
    from ddpm_jax.cli import convert_main

    sys.exit(convert_main())
