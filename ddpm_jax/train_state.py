"""The training state and the one jitted step: AdamW with warm-up, decay and clipping, and the EMA.

`train_step(state, batch, key) -> (state, metrics)` takes its randomness as `fold_in(key, step)`, so a
resumed run replays exactly what an uninterrupted one would have done. `jit_train_step` compiles it as the
trainer runs it; the benchmark reuses it.
"""

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ddpm_jax import diffusion, runtime
from ddpm_jax.config import TrainConfig
from ddpm_jax.schedules import Schedule
from ddpm_jax.unets import build_model


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (float32)
    ema: Any  # nnx.State, exponential moving average of params
    opt_state: Any  # optax state


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then constant or a cosine decay to 0 at the last step
    (a run that ends within its warm-up never decays)."""
    if config.lr_decay == "cosine":
        after = optax.cosine_decay_schedule(config.lr, max(1, config.steps - config.warmup_steps))
    else:
        after = optax.constant_schedule(config.lr)
    if not config.warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup_steps), after],
                                [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW as the article's trainer (betas 0.9, 0.99; weight decay 0.01), optional warm-up, decay and clipping."""
    adamw = optax.adamw(learning_rate(config), b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip else adamw


def ema_decay(config: TrainConfig, step):
    """ema_pytorch's schedule as the article's trainer uses it: at step s (0-based, counted before the
    update) every `ema_every` steps, copy while s <= ema_start and on the first update after it (ema_pytorch's
    `initted` flag is first set there, and it copies before it averages), then decay
    min(beta, 1 - (1 + e)^(-2/3)) with e = s - ema_start. Returns 0 (copy) on copy steps and 1 (keep) off
    update steps."""
    epoch = jnp.maximum(step - config.ema_start, 0).astype(jnp.float32)
    decay = jnp.clip(1.0 - (1.0 + epoch) ** (-2.0 / 3.0), 0.0, config.ema_decay)
    decay = jnp.where(step - config.ema_every <= config.ema_start, 0.0, decay)
    return jnp.where(step % config.ema_every == 0, decay, 1.0)


def model_dtype(config: TrainConfig):
    return jnp.bfloat16 if config.precision == "bf16" else None


def init_state(config: TrainConfig, tx) -> tuple[nnx.GraphDef, TrainState]:
    model = build_model(config.model_config, rngs=nnx.Rngs(config.seed), dtype=model_dtype(config))
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params))
    return graphdef, state


def train_step(state: TrainState, batch_BHWC, key, *, graphdef, schedule, tx, config: TrainConfig):
    """One optimizer step on a global batch; randomness is fold_in(key, step)."""
    step_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return diffusion.training_loss(model, schedule, batch_BHWC, step_key, config.objective)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": learning_rate(config)(state.step)}
    return TrainState(state.step + 1, params, ema, opt_state), metrics


def jit_train_step(config: TrainConfig, graphdef: nnx.GraphDef, schedule: Schedule, tx, replicated):
    """`train_step` jitted as the trainer runs it: the state donated, state and metrics on `replicated`, and
    the compile options of `runtime.training_compiler_options`. Call it as `step(state, batch, key)`."""
    return jax.jit(
        partial(train_step, graphdef=graphdef, schedule=schedule, tx=tx, config=config),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
        compiler_options=runtime.training_compiler_options(),
    )


def initial_state(config: TrainConfig, tx, sharding) -> tuple[nnx.GraphDef, TrainState, Callable[[], TrainState]]:
    """`(graphdef, abstract, init)` from one trace of the model: its graph, the state as ShapeDtypeStructs on
    `sharding` (what a restore fills), and `init()`, which initialises a fresh run's state on those devices by a
    program compiled without the optimisations a program that runs once does not need
    (`runtime.run_once_compiler_options`). The graph is a pytree without leaves, so it comes out of the trace as
    part of the output's structure."""
    init = partial(init_state, config, tx)
    traced = jax.jit(init, out_shardings=sharding, compiler_options=runtime.run_once_compiler_options()).trace()
    graphdef, abstract = traced.out_info
    return graphdef, abstract, lambda: traced.lower().compile()()[1]
