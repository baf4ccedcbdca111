"""Model-agnostic rectified-flow samplers: sigma schedules, CFG, Euler ODE, one-step generator.

All samplers take a velocity function ``velocity_fn(x, t, cond) -> v`` where ``x`` has shape
``(B, ...)``, ``t`` has shape ``(B,)`` with values in ``[0, 1]`` (``t = 1`` is pure noise, see
:mod:`apt_jax.flow`), ``cond`` is any pytree whose leaves have leading batch dimension ``B``,
and ``v`` has the shape of ``x``. Integration runs from ``t = 1`` (noise) towards ``t = 0``
(data) with ``x_{t'} = x_t + (t' - t) v(x_t, t)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apt_jax.flow import VelocityFn
from apt_jax.flow import shift as _time_shift

__all__ = [
    "VelocityFn",
    "diffusers_sigmas",
    "shifted_linear_sigmas",
    "guided_velocity",
    "euler_sample",
    "one_step_generate",
]

Array = jax.Array
PyTree = Any

_DIFFUSERS_NUM_TRAIN_TIMESTEPS = 1000


def _check_schedule_args(num_steps: int, shift: float) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not float(shift) > 0.0:
        raise ValueError(f"shift must be > 0, got {shift!r}")


def diffusers_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Sigma schedule of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)``.

    Reproduces the default config (``num_train_timesteps=1000``, no dynamic shifting) after
    ``set_timesteps(num_steps)``: the constructor's sigmas are
    ``shift(linspace(1, 1000, 1000)[::-1] / 1000)``, whose first and last entries are
    ``sigma_max`` and ``sigma_min``; ``set_timesteps`` takes
    ``linspace(1000 sigma_max, 1000 sigma_min, num_steps) / 1000``, shifts again and appends a
    terminal 0. Example: ``diffusers_sigmas(4, 3.0) ~ [1.0, 0.8577, 0.6022, 0.0089, 0.0]``.
    Computed in float64 (diffusers itself uses float32, so they agree to ~1e-6).

    Args:
        num_steps: Number of sampling steps ``K`` (>= 1).
        shift: Time shift factor (> 0); SD3 uses 3.0.

    Returns:
        Decreasing sigmas, shape ``(K + 1,)``, float64, starting at 1.0 and ending at 0.0.
    """
    _check_schedule_args(num_steps, shift)
    n_train = _DIFFUSERS_NUM_TRAIN_TIMESTEPS
    base = np.linspace(1, n_train, n_train, dtype=np.float64)[::-1] / n_train
    base = _time_shift(base, float(shift))
    sigma_max, sigma_min = base[0], base[-1]
    sig = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    sig = _time_shift(sig, float(shift))
    return np.concatenate([sig, np.zeros(1)])


def shifted_linear_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Shifted uniform grid ``shift(linspace(1, 0, K + 1), shift)``.

    Args:
        num_steps: Number of sampling steps ``K`` (>= 1).
        shift: Time shift factor (> 0).

    Returns:
        Decreasing sigmas from 1.0 to 0.0, shape ``(K + 1,)``, float64.
    """
    _check_schedule_args(num_steps, shift)
    return _time_shift(np.linspace(1.0, 0.0, num_steps + 1), float(shift))


def _is_static_one(cfg_scale: Any) -> bool:
    return isinstance(cfg_scale, int | float | np.number) and float(cfg_scale) == 1.0


def guided_velocity(
    velocity_fn: VelocityFn,
    x: Array,
    t: Array,
    cond: PyTree,
    uncond: PyTree | None,
    cfg_scale: float | Array,
) -> Array:
    """Classifier-free-guided velocity ``v = v_u + g (v_c - v_u)``.

    If ``uncond`` is None or ``cfg_scale`` is the python number 1.0, this is just
    ``velocity_fn(x, t, cond)`` (one call of batch ``B``). Otherwise the model is called
    **once** on a batch of ``2B``: ``x`` and ``t`` duplicated, ``cond`` and ``uncond``
    concatenated leaf-wise on axis 0 (the first ``B`` rows conditional).

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        x: Noisy samples, shape ``(B, ...)``.
        t: Times, shape ``(B,)``.
        cond: Condition pytree, leaves of shape ``(B, ...)``.
        uncond: Null-condition pytree with the same structure and shapes as ``cond``, or None.
        cfg_scale: Guidance scale ``g``; a python float (static) or a scalar array.

    Returns:
        Guided velocity, shape ``(B, ...)``.
    """
    if uncond is None or _is_static_one(cfg_scale):
        return velocity_fn(x, t, cond)
    b = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)
    t2 = jnp.concatenate([t, t], axis=0)
    c2 = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    v2 = velocity_fn(x2, t2, c2)
    v_c, v_u = v2[:b], v2[b:]
    g = jnp.asarray(cfg_scale, dtype=v2.dtype)
    return v_u + g * (v_c - v_u)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: Array,
    sigmas: np.ndarray | Array,
    cond: PyTree,
    *,
    uncond: PyTree | None = None,
    cfg_scale: float | Array = 1.0,
    remat_steps: bool = False,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Euler integration of the flow ODE over a sigma schedule.

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)`` for ``i = 0 .. K-1``, with
    ``v`` the (optionally classifier-free-guided, see :func:`guided_velocity`) velocity. Runs as
    a ``jax.lax.scan`` over the ``(sigma_i, sigma_{i+1})`` pairs, so it is jittable and
    differentiable through every step (direct distillation). The update is computed in at
    least float32 and cast back to ``noise.dtype``.

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        noise: Starting point ``x_0`` (usually pure noise at ``sigmas[0] = 1``), shape
            ``(B, ...)``.
        sigmas: Schedule, shape ``(K + 1,)`` (numpy or jax; ``K`` is static), usually
            decreasing from 1 to 0, e.g. :func:`diffusers_sigmas` or
            :func:`shifted_linear_sigmas`.
        cond: Condition pytree with leading dim ``B``.
        uncond: Null condition for CFG (same structure as ``cond``), or None.
        cfg_scale: Guidance scale (python float 1.0 disables CFG statically).
        remat_steps: Wrap each step in ``jax.checkpoint`` so that differentiating through all
            steps stores only the per-step states, recomputing the model activations.
        return_trajectory: Also return all states.

    Returns:
        Final sample, shape ``(B, ...)``; with ``return_trajectory``, also the trajectory
        ``(K + 1, B, ...)`` whose entry 0 is ``noise`` and entry ``K`` the final sample.
    """
    sigmas = jnp.asarray(sigmas, dtype=jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must have shape (K + 1,) with K >= 1, got {sigmas.shape}")
    batch = noise.shape[0]
    out_dtype = noise.dtype
    compute_dtype = jnp.promote_types(out_dtype, jnp.float32)

    def step(x: Array, pair: tuple[Array, Array]) -> tuple[Array, Array | None]:
        s_cur, s_next = pair
        t = jnp.full((batch,), s_cur, dtype=jnp.float32)
        v = guided_velocity(velocity_fn, x, t, cond, uncond, cfg_scale)
        dt = (s_next - s_cur).astype(compute_dtype)
        x_next = (x.astype(compute_dtype) + dt * v.astype(compute_dtype)).astype(out_dtype)
        return x_next, (x_next if return_trajectory else None)

    if remat_steps:
        step = jax.checkpoint(step)

    x_final, traj = jax.lax.scan(step, noise, (sigmas[:-1], sigmas[1:]))
    if return_trajectory:
        return x_final, jnp.concatenate([noise[None], traj], axis=0)
    return x_final


def one_step_generate(velocity_fn: VelocityFn, z: Array, cond: PyTree) -> Array:
    """One-step generator ``G(z, c) = z - v(z, t=1, c)`` (APT / deterministic distillation).

    This is a single Euler step from ``t = 1`` to ``t = 0``, i.e. the clean estimate
    ``x0 = x_t - t v`` at ``t = 1``.

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        z: Noise, shape ``(B, ...)``.
        cond: Condition pytree with leading dim ``B``.

    Returns:
        Generated sample, shape ``(B, ...)``.
    """
    t = jnp.ones((z.shape[0],), dtype=jnp.float32)
    v = velocity_fn(z, t, cond)
    return z - v.astype(z.dtype)
