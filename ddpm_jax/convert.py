"""Weights between the reference (torch, NCHW) and the Flax U-Nets (NHWC), and the torch files that hold them.

A Flax parameter's path, with NNX's `layers` level of Sequential dropped and `kernel`/`scale` read as
`weight`, is the torch `state_dict` key. What is transposed, and nothing else:
  - conv kernels: torch OIHW <-> flax HWIO  (`transpose(2, 3, 1, 0)`, inverse `transpose(3, 2, 0, 1)`)
  - linear weights: torch (out, in) <-> flax (in, out)  (`.T`)
Biases and GroupNorm scales are copied. Key sets and every shape are checked before anything is copied,
and one error lists every mismatch. `checkpoints.load_model` reads torch files through this module; the
`ddpm-convert` command (cli.py) writes either format, and `check_written` checks the result against the reference:

    ddpm-convert to-flax article_checkpoint.pt flax_model/
    ddpm-convert to-torch flax_model/ unet.safetensors     # or unet.pt

torch is optional: .safetensors files are read and written through safetensors' numpy side, and only a .pt file
and the check, which runs the reference U-Net, import torch (without it, a one-line error says how to install it).
"""

import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ddpm_jax.config import ModelConfig
from ddpm_jax.errors import VerificationError
from ddpm_jax.schedules import Schedule

# Schedule buffers a reference DiffusionModel adds to its state_dict next to `model.*`: the same
# seven coefficients the Schedule pytree holds.
DIFFUSION_BUFFERS = frozenset(Schedule._fields)


SAFETENSORS = ".safetensors"
VERIFY_TOLERANCE = 1e-4  # worst |flax - torch| that `check_written` accepts
INSTALL_TORCH = 'pip install -e ".[torch]"'

# What wrapping a model adds in front of every key of its state_dict; stripped on loading, with a note.
WRAPPER_PREFIXES = {"module.": "DataParallel / DistributedDataParallel", "_orig_mod.": "torch.compile"}


class ConversionError(ValueError):
    """A checkpoint that cannot become a model; the message says which file and what is wrong."""


def torch_available() -> bool:
    """Whether torch imports here: the JAX side (training, sampling, Orbax, .safetensors) runs without it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch(needed_for: str, instead: str = ""):
    """The torch module, imported where it is needed; without it, a ConversionError naming what needed it."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{needed_for} needs PyTorch, which is not installed: {INSTALL_TORCH}{instead}") from None
    return torch


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
        if prefix := _common_prefix(state):
            lines.append(f"  every key of {source} starts with {prefix!r}")
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
            prefix = _common_prefix(state)
            raise ConversionError(
                f"{source}: cannot infer the U-Net architecture, key {key!r} is missing "
                f"(expected a state_dict of the article's OneResUNet/TwoResUNet/AttentionUNet)"
                + (f"; every key starts with {prefix!r}" if prefix else "")
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


def _common_prefix(state: dict) -> str:
    """The dotted prefix that every key of `state` shares, e.g. 'net.' ('' where there is none)."""
    prefix = os.path.commonprefix(list(state))
    return prefix[: prefix.rfind(".") + 1]


def _unwrapped(state: dict, stripped: list) -> dict:
    """`state` without the WRAPPER_PREFIXES that every one of its keys starts with (each appended to `stripped`)."""
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        stripped.append(prefix)
        state = _strip(state, prefix)
    return state


def unet_state_from_checkpoint(obj, *, ema: bool = True, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The U-Net weights inside a loaded torch object or .safetensors file: a U-Net state_dict, a DiffusionModel
    state_dict (`model.*` plus schedule buffers), or the article trainer's {"step", "model", "opt", "ema",
    "version"}. Keys that a wrapper prefixed (WRAPPER_PREFIXES: DataParallel, DDP, torch.compile) are stripped,
    with a warning that says so."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    stripped = []
    obj = _unwrapped(obj, stripped)
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
        obj = _unwrapped(obj, stripped)  # a DiffusionModel around a compiled U-Net: model._orig_mod.*
    if stripped:
        wrappers = [WRAPPER_PREFIXES[p] for p in dict.fromkeys(stripped)]
        warnings.warn(f"{source}: stripped the key prefix {''.join(stripped)!r} that {' and '.join(wrappers)} "
                      f"add{'s' if len(wrappers) == 1 else ''}", stacklevel=2)
    state = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):  # a torch tensor
            state[k] = v.detach().cpu().float().numpy()
        elif isinstance(v, np.ndarray):  # from a .safetensors
            state[k] = np.asarray(v, np.float32)
        else:
            raise ConversionError(f"{source}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    return state


def read_weights_file(path) -> object:
    """A torch file (torch.load with weights_only=True; needs torch) or a .safetensors file (numpy arrays, no
    pickle at all; any dtype, bf16 included); a clear error for a missing, foreign, damaged or unsafe file."""
    import safetensors.numpy

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == SAFETENSORS:
        try:  # numpy reads bf16 as ml_dtypes' bfloat16, which jax has registered with it
            return safetensors.numpy.load_file(path)
        except Exception as e:  # safetensors reports a truncated or foreign file as SafetensorError
            raise ConversionError(f"{path}: is not a readable safetensors file ({type(e).__name__}: {e})") from None

    # torch.save writes a zip archive, or in its legacy format a pickle (PROTO opcode first). Anything
    # else is read as a pickle too, and fails with the UnpicklingError of a checkpoint holding code.
    with path.open("rb") as f:
        pickled = f.read(1) == pickle.PROTO
    if not (pickled or zipfile.is_zipfile(path)):
        raise ConversionError(f"{path}: is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    torch = _torch(f"{path}: reading a torch file", " (a .safetensors file needs none)")
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
    `torch.save` format (needs torch), or safetensors where `path` ends in .safetensors (read it with
    `safetensors.torch.load_file`)."""
    import safetensors.numpy

    path = Path(path)
    torch = None if path.suffix == SAFETENSORS else _torch(f"{path}: writing torch.save's format",
                                                           f" (or write {path.with_suffix(SAFETENSORS).name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_torch_state(model)
    if torch is None:
        safetensors.numpy.save_file(state, path)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def reference_unet(config: ModelConfig, state: dict[str, np.ndarray]):
    """The article's PyTorch U-Net (ddpm_torch) of `config`, holding `state` (strict); needs torch."""
    torch = _torch("the check of converted weights (it runs the PyTorch reference U-Net)")
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


def check_written(path, model: nnx.Module, config: ModelConfig, *, tolerance: float = VERIFY_TOLERANCE) -> float:
    """Check what a conversion of `model` (built from `config`) wrote at `path`, read back from disk: a model
    directory's Flax U-Net against the reference U-Net holding `model`'s weights, or the reference holding a
    weights file's against `model` (`verify`: random inputs, float32). Returns the worst absolute difference;
    above `tolerance`, a VerificationError naming `path`, which is left as it is. Needs torch."""
    from ddpm_jax.checkpoints import load_model  # which reads torch files through this module

    path = Path(path)
    if path.is_dir():
        flax_model, torch_state = load_model(path)[0], to_torch_state(model)
    else:
        flax_model, torch_state = model, unet_state_from_checkpoint(read_weights_file(path), source=str(path))
    worst = verify(flax_model, reference_unet(config, torch_state))
    if not worst <= tolerance:
        raise VerificationError(f"{path}: with the converted weights, the Flax U-Net and the PyTorch reference "
                                f"differ by up to {worst:.2e} on random inputs, above the tolerance of {tolerance:g} "
                                f"(the file is kept for inspection)")
    return worst


@nnx.jit
def _forward(model, x_BHWC, t_B):
    return model(x_BHWC, t_B)


if __name__ == "__main__":  # python -m ddpm_jax.convert
    from ddpm_jax.cli import convert_main

    sys.exit(convert_main())
