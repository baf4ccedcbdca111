"""Distillation losses: deterministic (APT's generator initialisation) and
direct (DiffSynth-Studio's `DirectDistillLoss`).

Both regress a student's sample onto a teacher's many-step ODE solution from
the same noise. The noise of a sample is a pure function of its integer seed
(`noise_from_seeds`), so teacher targets made ahead of time into a dataset of
rows `(seed, label, target)` equal the ones made on the fly inside the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apt_jax import sampling
from apt_jax.flow import VelocityFn

_NOISE_KEY = 0x5EED


def noise_from_seeds(seeds: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`(B,)` int seeds -> `(B, *shape)` standard normal noise, one stream per seed."""
    base = jax.random.key(_NOISE_KEY)
    return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(base, s), tuple(shape)))(seeds)


def teacher_solution(
    teacher_fn: VelocityFn,
    z: jax.Array,
    cond: Any,
    uncond: Any,
    *,
    sigmas: np.ndarray,
    cfg_scale: float,
) -> jax.Array:
    """The teacher's Euler ODE solution from noise z (CFG, no gradient)."""
    x = sampling.euler_sample(teacher_fn, z, sigmas, cond, uncond=uncond, cfg_scale=cfg_scale)
    return jax.lax.stop_gradient(x)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def deterministic_distill_loss(
    student_fn: VelocityFn, z: jax.Array, cond: Any, target: jax.Array
) -> tuple[jax.Array, dict]:
    """MSE between `G(z, c) = z - v_student(z, 1, c)` and the teacher's solution."""
    x_hat = sampling.one_step_generate(student_fn, z, cond)
    loss = _mse(x_hat, target)
    return loss, {"loss": loss}


def direct_distill_loss(
    student_fn: VelocityFn,
    z: jax.Array,
    cond: Any,
    target: jax.Array,
    *,
    sigmas: np.ndarray,
    remat_steps: bool = True,
) -> tuple[jax.Array, dict]:
    """MSE between the student's own K-step sample (CFG 1) and the teacher's.

    Gradients flow through all K Euler steps; `remat_steps` recomputes each
    step's activations in the backward pass, so memory holds K states rather
    than K sets of activations.
    """
    x_student = sampling.euler_sample(student_fn, z, sigmas, cond, remat_steps=remat_steps)
    loss = _mse(x_student, target)
    return loss, {"loss": loss}
