"""The train state of one trained network, its update, EMA and micro-batching.

Two-player recipes keep one of these per role in a dict (`{"generator": ...,
"discriminator": ...}`) and differentiate only the role being trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """Parameters, their EMA, the optimizer state and the update count.

    Attributes:
      step: int32 scalar, number of optimizer updates applied.
      params: the trained parameter pytree.
      ema_params: exponential moving average of `params` (what samplers use), or
        None for a network nobody samples (APT's discriminator): no copy kept.
      opt_state: optax state of `params`.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def create_train_state(
    params: Any, tx: optax.GradientTransformation, ema: bool = True
) -> TrainState:
    """A fresh state: step 0, EMA equal to the parameters (None without `ema`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        opt_state=tx.init(params),
    )


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay for update number `step + 1`.

    With `warmup`, `min(decay, (1 + step) / (10 + step))` (TensorFlow's
    `num_updates` rule): early averages forget the initialisation quickly
    instead of carrying `decay ** step` of it (a fresh MMDiT predicts 0).
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def apply_gradients(
    state: TrainState,
    grads: Any,
    tx: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool = True,
) -> TrainState:
    """One optimizer update and one EMA update (`ema = d * ema + (1 - d) * params`)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.ema_params is None:
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    d = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(
        lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype),
        state.ema_params,
        params,
    )
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    # Interleave (row i of micro-batch j is global row i * k + j) so that each
    # micro-batch draws rows from every device's shard of the batch.
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def compute_grads(
    loss_fn: LossFn, params: Any, batch: Any, rng: jax.Array, accumulation_steps: int = 1
) -> tuple[Any, dict]:
    """Gradients of `loss_fn(params, batch, rng) -> (loss, metrics)`.

    With `accumulation_steps = k > 1` the batch is split into k micro-batches
    processed sequentially (`lax.scan`: activation memory of one micro-batch);
    gradients and metrics are averaged, so the result estimates the same
    quantity as one pass over the whole batch.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accumulation_steps == 1:
        grads, metrics = grad_fn(params, batch, rng)
        return grads, metrics
    k = accumulation_steps
    micro = jax.tree.map(lambda x: _split_micro(x, k), batch)

    def body(acc, inputs):
        i, mb = inputs
        g, m = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, (g, m)), None

    g0, m0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, m0))
    (g, m), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, (g, m))
