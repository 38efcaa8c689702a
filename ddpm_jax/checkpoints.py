"""The one reader and writer of the project's weights on disk: a run's Orbax checkpoints, model directories,
and `load_model`, which reads every format a user may hold (.pt and .safetensors files through convert.py).

    <workdir>/checkpoints/<step>/{params,ema,opt_state}   a training run's state (workdirs.py has the layout)
    <model dir>/model.json + params/                     one model: its ModelConfig and its parameters

Orbax writes each step to a temporary folder and renames it when complete, so a kill mid-write leaves the
previous checkpoint as the latest.
"""

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ddpm_jax import convert, workdirs
from ddpm_jax.config import ModelConfig, read_json
from ddpm_jax.train_state import TrainState
from ddpm_jax.unets import build_model

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
ITEMS = ("params", "ema", "opt_state")


class CheckpointError(ValueError):
    """A path that holds no model this project can read; the message names it and says what was expected."""


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs of `tree`'s arrays (nnx.State as a pure dict) with their own sharding, or `sharding`."""
    pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), pure)


def _filled(template: nnx.State, values) -> nnx.State:
    template = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(template, values)
    return template


# ----------------------------------------------------------------------------------------------------------
# A training run's state.


# Orbax's log lines that say nothing to our users: the time of our own blocking `wait_until_finished()` after a
# save, which Orbax files under the next save ("... consider checkpointing less frequently"), and the notes of a
# manager that only reads (load_model's).
_QUIET = ("Waiting for previous save to complete", "CheckpointManagerOptions.read_only=True",
          "Given directory is read only")


def _not_for_users(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_QUIET)


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax's PyTree handler for each item; on a CPU, one replica writes each array. There Orbax by default
    splits the writing of a replicated array over its replicas, with one eager slice per array and replica,
    which made a save with one JAX device per core slower. The files are the same
    either way. Elsewhere Orbax's default stays."""
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False if jax.default_backend() == "cpu" else None)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler())))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ITEMS:
        registry.add(item, ocp.args.PyTreeSave, handler)
        registry.add(item, ocp.args.PyTreeRestore, handler)
    return registry


def manager(workdir: Path, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of `workdir`'s checkpoints, keeping the newest `keep` (None: all)."""
    logging.getLogger("absl").addFilter(_not_for_users)  # idempotent: a logger keeps one copy of a filter
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, read_only=not create)
    return ocp.CheckpointManager(Path(workdir).absolute() / workdirs.CHECKPOINTS, options=options,
                                 handler_registry=_handlers())


def _restore_args(abstract) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def save(checkpoints: ocp.CheckpointManager, state: TrainState) -> None:
    """Write `state` as the checkpoint of its step and wait until it is complete."""
    checkpoints.save(
        int(state.step),
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(nnx.to_pure_dict(state.params)),
            ema=ocp.args.PyTreeSave(nnx.to_pure_dict(state.ema)),
            opt_state=ocp.args.PyTreeSave(state.opt_state),
        ),
    )
    checkpoints.wait_until_finished()


def restore(checkpoints: ocp.CheckpointManager, abstract: TrainState, step: int) -> TrainState:
    """The state saved at `step`, laid out as `abstract` (ShapeDtypeStructs with shardings) says."""
    restored = checkpoints.restore(
        step,
        args=ocp.args.Composite(
            params=_restore_args(_abstract(abstract.params)),
            ema=_restore_args(_abstract(abstract.ema)),
            opt_state=_restore_args(_abstract(abstract.opt_state)),
        ),
    )
    # The step counter gets the sharding the train step returns, or its second call would compile again.
    step_array = jax.make_array_from_callback((), abstract.step.sharding, lambda _: np.int32(step))
    return TrainState(step_array, _filled(abstract.params, restored.params), _filled(abstract.ema, restored.ema),
                      restored.opt_state)


# ----------------------------------------------------------------------------------------------------------
# One model.


def save_model(model: nnx.Module, config: ModelConfig, out_dir) -> Path:
    """Write a model directory: model.json and an Orbax checkpoint of the parameters."""
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
        raise CheckpointError(f"{path}: not a valid model config ({e})") from None


def recorded_config(path) -> ModelConfig | None:
    """The model config that the model at `path` records (its run's config.json, or its model.json), with its
    prediction target and EDM constants; None for a torch file, which records neither, or a folder that holds no
    model."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (run := workdirs.run_config(path)) is not None:
        return run.model_config
    if (path / MODEL_JSON).is_file():
        return read_model_config(path)
    return None


def load_model(path, *, ema: bool = True, dtype=None) -> tuple[nnx.Module, ModelConfig]:
    """A ready Flax U-Net, called as `model(x_BHWC, t_B)`, and the config it was built from.

    `path` is one of: a torch file (.pt/.pth) holding a U-Net state_dict, a DiffusionModel state_dict,
    or the article trainer's checkpoint; a .safetensors file holding a U-Net or DiffusionModel state_dict; a
    model directory written by `convert to-flax`/`save_model`; a training workdir (its latest checkpoint) or one
    of its `checkpoints/<step>` folders. EMA weights are taken where a checkpoint has them, unless ema=False. The
    architecture comes from the weights or the saved config; nothing has to be passed by hand.
    """
    path = Path(path)
    if not path.is_dir():
        state = convert.unet_state_from_checkpoint(convert.read_weights_file(path), ema=ema, source=str(path))
        config = convert.infer_config(state, str(path))  # a torch file cannot hold the time embedding's theta
        return convert.load_torch_state(build_model(config, dtype=dtype), state, str(path)), config
    if (path / MODEL_JSON).is_file() and (path / PARAMS_DIR).is_dir():
        config = read_model_config(path)
        model = build_model(config, dtype=dtype)
        return _restore_params(model, lambda a: _read_model_dir(path / PARAMS_DIR, a), str(path)), config
    step_folder = path.name.isdigit() and path.parent.name == workdirs.CHECKPOINTS
    workdir = path.parent.parent if step_folder else path
    steps = workdirs.saved_steps(workdir)
    if not steps or not (workdir / workdirs.CONFIG_JSON).is_file() or (step_folder and int(path.name) not in steps):
        raise CheckpointError(
            f"{path}: not a model directory ({MODEL_JSON} + {PARAMS_DIR}/), nor a training workdir with "
            f"{workdirs.CONFIG_JSON} and a complete checkpoint under {workdirs.CHECKPOINTS}/"
        )
    try:
        config = workdirs.read_config(workdir).model_config
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    item = "ema" if ema else "params"
    if step_folder:
        return _read_step(workdir, int(path.name), item, config, dtype), config
    # A live run's rotation may delete the newest checkpoint while it is read here. Where the run has moved on (the
    # checkpoint is gone, or a newer one is complete), the newest complete one is read instead; a checkpoint that
    # fails while it is still there and the newest is damaged: an error.
    step = steps[-1]
    while True:
        try:
            return _read_step(workdir, step, item, config, dtype), config
        except CheckpointError:
            steps = workdirs.saved_steps(workdir)
            if not steps or (step in steps and steps[-1] == step):
                raise
        warnings.warn(f"{workdir}: the checkpoint of step {step} was deleted or superseded while it was read (the "
                      f"run's rotation); reading step {steps[-1]}")
        step = steps[-1]


def _read_step(workdir: Path, step: int, item: str, config: ModelConfig, dtype) -> nnx.Module:
    def read(abstract):
        with manager(workdir, create=False) as checkpoints:
            return checkpoints.restore(step, args=ocp.args.Composite(**{item: _restore_args(abstract)}))[item]

    return _restore_params(build_model(config, dtype=dtype), read, f"{workdir} (step {step}, {item})")


def _read_model_dir(params_dir: Path, abstract):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(params_dir.absolute(), abstract)


def _restore_params(model: nnx.Module, read, source: str) -> nnx.Module:
    """Fill `model`'s parameters with `read(abstract pure dict)`, on this host's first device whatever
    topology wrote them."""
    target = nnx.state(model, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        restored = read(_abstract(target, device))
    except Exception as e:  # orbax reports a missing item as KeyError, damaged data as ValueError and more
        raise CheckpointError(f"{source}: cannot restore the parameters ({type(e).__name__}: {e})") from None
    nnx.update(model, _filled(target, restored))
    return model
