"""Flow-matching (rectified-flow) supervised fine-tuning loss.

`x_t = (1 - t) x0 + t eps`, the network regresses the velocity `eps - x0`
(SD3 / DiffSynth `FlowMatchSFTLoss`), with a configurable timestep density,
stratification over the global batch and a per-timestep weighting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apt_jax import flow
from apt_jax.flow import VelocityFn


def sample_training_timesteps(rng: jax.Array, batch: int, flow_cfg: Mapping[str, Any]) -> jax.Array:
    """`(B,)` training times from `config.flow` (density, its parameters, shift, stratified)."""
    return flow.sample_timesteps(
        rng,
        batch,
        density=flow_cfg["density"],
        logit_mean=flow_cfg.get("logit_mean", 0.0),
        logit_std=flow_cfg.get("logit_std", 1.0),
        mode_scale=flow_cfg.get("mode_scale", 1.29),
        shift=flow_cfg.get("shift", 1.0),
        stratified=flow_cfg.get("stratified", True),
    )


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    cond: Any,
    rng: jax.Array,
    flow_cfg: Mapping[str, Any],
) -> tuple[jax.Array, dict]:
    """Weighted velocity MSE.

    Args:
      velocity_fn: `(x_t, t, cond) -> v`, already closed over the parameters.
      x0: `(B, ...)` clean latents.
      cond: condition pytree with leading dim B (after any dropout).
      rng: PRNG key (noise and timesteps).
      flow_cfg: `config.flow` (density, logit_mean, logit_std, mode_scale, shift,
        stratified, weighting, weighting_shift).

    Returns:
      (loss, metrics): the weighted mean over batch and elements, and metrics
      `loss` and `velocity_mse` (unweighted).
    """
    r_t, r_eps = jax.random.split(rng)
    batch = x0.shape[0]
    t = sample_training_timesteps(r_t, batch, flow_cfg)
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = flow.interpolate(x0, eps, t)
    v = velocity_fn(x_t, t, cond).astype(jnp.float32)
    target = flow.velocity_target(x0, eps).astype(jnp.float32)
    per_sample = jnp.mean(jnp.square(v - target).reshape(batch, -1), axis=1)
    w = flow.loss_weight(
        t, flow_cfg.get("weighting", "none"), shift=flow_cfg.get("weighting_shift", 3.0)
    )
    loss = jnp.mean(w * per_sample)
    return loss, {"loss": loss, "velocity_mse": jnp.mean(per_sample)}
