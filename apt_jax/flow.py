"""Rectified-flow algebra: interpolation, targets, time shift, timestep densities, loss weights.

Convention (shared with SD3, Flux and Seaweed-APT; see docs/method.md#rectified-flow)::

    x_t = (1 - t) * x0 + t * eps,      t in [0, 1],  t = 1 is pure noise
    v   = eps - x0                     (the network's regression target)
    x0  = x_t - t * v,     eps = x_t + (1 - t) * v
    Euler step from t to t':  x_{t'} = x_t + (t' - t) * v

Times ``t`` are always per sample: an array of shape ``(B,)`` that broadcasts over the
trailing (non-batch) dimensions of ``x`` of shape ``(B, ...)``.

Training timesteps are drawn as ``t = shift(F^-1(u), s)`` where ``F^-1`` is the inverse CDF of
one of the densities below (``uniform``, ``logit_normal``, ``mode``) and ``u`` is either
i.i.d. uniform or stratified over the global batch index (CogVideoX "parallel uniform
sampling", docs/method.md#stratified-timesteps).

All functions are pure ``jax.numpy`` (the DiffSynth grid helpers also use numpy for their
constants) and can be used inside ``jit`` / ``grad`` / ``vmap``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

__all__ = [
    "VelocityFn",
    "DENSITIES",
    "LOSS_WEIGHTINGS",
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "eps_from_velocity",
    "shift",
    "uniform",
    "logit_normal",
    "mode",
    "timestep_inverse_cdf",
    "sample_timesteps",
    "diffsynth_training_grid",
    "diffsynth_weight_table",
    "loss_weight",
]

#: ``velocity_fn(x: (B, ...), t: (B,), cond: pytree with leading dim B) -> v: (B, ...)``,
#: the network's velocity under the convention above; every sampler and loss takes one.
VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

Array = jax.Array

#: Valid names for the ``density`` argument of :func:`sample_timesteps`.
DENSITIES: tuple[str, ...] = ("uniform", "logit_normal", "mode")

#: Valid names for the ``kind`` argument of :func:`loss_weight`.
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "diffsynth")

# u is clipped to [_U_EPS, 1 - _U_EPS] before ndtri (1 - 1e-6 is representable in float32).
_U_EPS = 1e-6

# The SD3 paper's mode density is a monotone map of [0, 1] onto [0, 1] only for
# mode_scale in [-1, 2 / (pi - 2)].
_MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

# DiffSynth-Studio training grid (FlowMatchScheduler, FLUX.1 template, set_timesteps(1000,
# training=True)): sigma_max = 1.0, sigma_min = 0.003 / 1.002, 1000 points.
_DIFFSYNTH_NUM_STEPS = 1000
_DIFFSYNTH_SIGMA_MAX = 1.0
_DIFFSYNTH_SIGMA_MIN = 0.003 / 1.002


# --------------------------------------------------------------------------------------------
# Interpolation and targets
# --------------------------------------------------------------------------------------------


def _bcast(t: Array, x: Array) -> Array:
    """Reshapes per-sample times to broadcast against a batch.

    Args:
        t: Times, shape ``(B,)`` (or a scalar, returned unchanged).
        x: Batch, shape ``(B, ...)`` of rank >= 1.

    Returns:
        ``t`` reshaped to ``(B, 1, ..., 1)`` with ``x.ndim`` dimensions.
    """
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {t.shape}")
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch dimension, got shape {x.shape}")
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def interpolate(x0: Array, eps: Array, t: Array) -> Array:
    """Noisy sample on the straight path, ``x_t = (1 - t) x0 + t eps``.

    Args:
        x0: Clean data, shape ``(B, ...)``.
        eps: Noise, same shape as ``x0``.
        t: Times in ``[0, 1]``, shape ``(B,)`` (``t = 1`` is pure noise).

    Returns:
        ``x_t``, shape ``(B, ...)``.
    """
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: Array, eps: Array) -> Array:
    """Rectified-flow regression target ``v = eps - x0``.

    Args:
        x0: Clean data, shape ``(B, ...)``.
        eps: Noise, same shape.

    Returns:
        ``v``, shape ``(B, ...)``.
    """
    return eps - x0


def x0_from_velocity(x_t: Array, t: Array, v: Array) -> Array:
    """Clean estimate from a velocity, ``x0 = x_t - t v``.

    Args:
        x_t: Noisy sample, shape ``(B, ...)``.
        t: Times, shape ``(B,)``.
        v: Velocity, shape ``(B, ...)``.

    Returns:
        ``x0``, shape ``(B, ...)``.
    """
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: Array, t: Array, v: Array) -> Array:
    """Noise estimate from a velocity, ``eps = x_t + (1 - t) v``.

    Args:
        x_t: Noisy sample, shape ``(B, ...)``.
        t: Times, shape ``(B,)``.
        v: Velocity, shape ``(B, ...)``.

    Returns:
        ``eps``, shape ``(B, ...)``.
    """
    return x_t + (1.0 - _bcast(t, x_t)) * v


# --------------------------------------------------------------------------------------------
# Time shift
# --------------------------------------------------------------------------------------------


def shift(t: Any, s: Any) -> Any:
    """Time shift ``shift(t, s) = s t / (1 + (s - 1) t)`` (SD3 / Flux / APT).

    Maps ``[0, 1]`` monotonically onto itself with ``shift(0) = 0`` and ``shift(1) = 1``;
    ``s > 1`` moves mass towards noise (``t = 1``), ``s = 1`` is the identity, and
    ``shift(shift(t, s), 1 / s) = t``. Works elementwise on python floats, numpy and jax arrays
    (the result has the input's array type).

    Args:
        t: Times, any shape.
        s: Shift factor (> 0), scalar or broadcastable against ``t``.

    Returns:
        Shifted times, same shape as ``t``.
    """
    return s * t / (1 + (s - 1) * t)


_time_shift = shift  # alias: ``sample_timesteps`` has an argument named ``shift``.


def _check_positive(name: str, value: Any) -> None:
    """Raises ValueError if a concrete ``value`` is not > 0 (traced values are not checked)."""
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not v > 0.0:  # also catches NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# Timestep densities as inverse CDFs of u in (0, 1)
# --------------------------------------------------------------------------------------------


def uniform(u: Array) -> Array:
    """Inverse CDF of ``U(0, 1)``: ``t = u``.

    With a ``shift`` applied afterwards this is the continuous version of DiffSynth-Studio's
    draw of a uniform index into its shifted 1000-step grid.

    Args:
        u: Uniform variates in ``[0, 1]``, any shape.

    Returns:
        ``t``, same shape.
    """
    return jnp.asarray(u)


def logit_normal(u: Array, logit_mean: float = 0.0, logit_std: float = 1.0) -> Array:
    """Inverse CDF of the logit-normal density: ``t = sigmoid(m + s * Phi^-1(u))``.

    ``u`` is clipped to ``[1e-6, 1 - 1e-6]`` so that ``Phi^-1`` stays finite.

    Args:
        u: Uniform variates in ``[0, 1]``, any shape.
        logit_mean: ``m``, mean of the underlying normal (SD3: 0).
        logit_std: ``s``, standard deviation of the underlying normal (SD3: 1).

    Returns:
        ``t`` in ``(0, 1)``, same shape as ``u``.
    """
    u = jnp.clip(jnp.asarray(u), _U_EPS, 1.0 - _U_EPS)
    return jax.nn.sigmoid(logit_mean + logit_std * ndtri(u))


def mode(u: Array, mode_scale: float = 1.29) -> Array:
    """SD3 paper's "mode" sampling: ``t = 1 - u - s (cos^2(pi u / 2) - 1 + u)``.

    The map is a monotone (decreasing) bijection of ``[0, 1]`` for
    ``s in [-1, 2 / (pi - 2)]``; ``s = 0`` is uniform, ``s > 0`` concentrates mass at mid
    times. Being monotone, stratified ``u`` still gives one draw per image of each stratum.

    Args:
        u: Uniform variates in ``[0, 1]``, any shape.
        mode_scale: ``s`` (SD3 default 1.29).

    Returns:
        ``t`` in ``[0, 1]``, same shape as ``u``.
    """
    u = jnp.asarray(u)
    t = 1.0 - u - mode_scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)
    return jnp.clip(t, 0.0, 1.0)


def _check_density(density: str, mode_scale: Any, logit_std: Any) -> None:
    if density not in DENSITIES:
        raise ValueError(f"unknown timestep density {density!r}; valid options: {DENSITIES}")
    if density == "mode":
        try:
            ms = float(mode_scale)
        except (TypeError, jax.errors.ConcretizationTypeError):
            ms = None
        if ms is not None and not (-1.0 <= ms <= _MODE_SCALE_MAX):
            raise ValueError(
                f"mode_scale must be in [-1, 2/(pi-2)={_MODE_SCALE_MAX:.4f}] for the mode "
                f"density to be monotone, got {mode_scale!r}"
            )
    if density == "logit_normal":
        _check_positive("logit_std", logit_std)


def timestep_inverse_cdf(
    u: Array,
    density: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Array:
    """Applies the inverse CDF of a named timestep density (no shift).

    Args:
        u: Uniform variates in ``[0, 1]``, any shape.
        density: One of :data:`DENSITIES`.
        logit_mean: Logit-normal mean.
        logit_std: Logit-normal standard deviation.
        mode_scale: Mode-sampling scale.

    Returns:
        ``t`` in ``[0, 1]``, same shape as ``u``.

    Raises:
        ValueError: Unknown density or invalid parameter.
    """
    _check_density(density, mode_scale, logit_std)
    if density == "uniform":
        return uniform(u)
    if density == "logit_normal":
        return logit_normal(u, logit_mean, logit_std)
    return mode(u, mode_scale)


def sample_timesteps(
    rng: Array,
    batch_size: int,
    *,
    density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    stratified: bool = False,
) -> Array:
    """Draws training timesteps ``t = shift(F^-1(u), shift)``.

    If ``stratified``, ``u_i = (i + U_i) / B`` with ``U_i ~ U(0, 1)`` i.i.d., ``i`` the index in
    the *global* batch: one draw per stratum ``[i / B, (i + 1) / B)``, a lower-variance
    estimate of the expected loss (CogVideoX "parallel uniform sampling", see
    docs/method.md#stratified-timesteps).
    This is plain ``jnp`` arithmetic on a ``(B,)`` array, so under ``jit`` with a batch-sharded
    output it gives the same values as unsharded (with ``jax_threefry_partitionable`` on).
    Otherwise ``u ~ U(0, 1)`` i.i.d.

    Args:
        rng: PRNG key.
        batch_size: ``B`` (static python int).
        density: One of :data:`DENSITIES` (``"uniform"``, ``"logit_normal"``, ``"mode"``).
            ``"uniform"`` with ``shift=s`` is the continuous counterpart of DiffSynth-Studio's
            uniform index draw from its shifted 1000-step grid.
        logit_mean: Logit-normal mean ``m``.
        logit_std: Logit-normal std ``s`` (> 0).
        mode_scale: Mode-sampling scale, in ``[-1, 2 / (pi - 2)]``.
        shift: Time shift factor (> 0) applied after the inverse CDF; 1 is no shift.
        stratified: Stratify ``u`` over the batch index.

    Returns:
        ``t``, shape ``(B,)``, float32, in ``[0, 1]``.

    Raises:
        ValueError: Unknown density, non-positive shift or invalid density parameter (raised
            before anything is traced).
    """
    _check_density(density, mode_scale, logit_std)
    _check_positive("shift", shift)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    u = jax.random.uniform(rng, (batch_size,), dtype=jnp.float32)
    if stratified:
        idx = jnp.arange(batch_size, dtype=jnp.float32)
        u = (idx + u) / batch_size
        # Keep each stratum [i/B, (i+1)/B) half-open after float32 rounding.
        upper = (idx + 1.0) / batch_size
        u = jnp.minimum(u, jnp.nextafter(upper, jnp.zeros_like(upper)))
    t = timestep_inverse_cdf(
        u, density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
    )
    t = _time_shift(t, shift)
    return jnp.clip(t, 0.0, 1.0).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Loss weightings
# --------------------------------------------------------------------------------------------


def diffsynth_training_grid(shift: float = 3.0) -> np.ndarray:
    """DiffSynth-Studio's 1000-step training sigma grid.

    Equals ``FlowMatchScheduler.set_timesteps(1000, training=True)`` (FLUX.1 template):
    ``shift(linspace(1.0, 0.003 / 1.002, 1000), shift)``, decreasing from 1.

    Args:
        shift: Time shift factor (> 0).

    Returns:
        Sigmas, shape ``(1000,)``, float64.
    """
    _check_positive("shift", shift)
    s = np.linspace(
        _DIFFSYNTH_SIGMA_MAX, _DIFFSYNTH_SIGMA_MIN, _DIFFSYNTH_NUM_STEPS, dtype=np.float64
    )
    return _time_shift(s, float(shift))


def _diffsynth_raw(sigma: Any, xp: Any = jnp) -> Any:
    """``y = exp(-2 ((1000 sigma - 500) / 1000)^2) = exp(-2 (sigma - 1/2)^2)``."""
    timestep = sigma * _DIFFSYNTH_NUM_STEPS
    half = _DIFFSYNTH_NUM_STEPS / 2
    return xp.exp(-2.0 * ((timestep - half) / _DIFFSYNTH_NUM_STEPS) ** 2)


@functools.lru_cache(maxsize=64)
def _diffsynth_constants_cached(shift: float) -> tuple[float, float]:
    y = _diffsynth_raw(diffsynth_training_grid(shift), np)
    y_min = float(y.min())
    norm = float((y - y_min).mean())
    return y_min, norm


def _diffsynth_constants(shift: float) -> tuple[float, float]:
    """Returns ``(y_min, norm)``: min of ``y`` and mean of ``y - y_min`` over the grid."""
    _check_positive("shift", shift)
    return _diffsynth_constants_cached(float(shift))


def diffsynth_weight_table(shift: float = 3.0) -> np.ndarray:
    """DiffSynth-Studio's ``linear_timesteps_weights`` table over its 1000-step grid.

    ``w = (y - min y) * 1000 / sum(y - min y)`` with ``y`` as in :func:`loss_weight`; its mean
    over the grid is 1 and its minimum 0.

    Args:
        shift: Time shift factor of the grid.

    Returns:
        Weights aligned with :func:`diffsynth_training_grid`, shape ``(1000,)``, float64.
    """
    y = _diffsynth_raw(diffsynth_training_grid(shift), np)
    ys = y - y.min()
    return ys * (_DIFFSYNTH_NUM_STEPS / ys.sum())


def loss_weight(t: Array, kind: str = "none", *, shift: float = 3.0) -> Array:
    """Per-sample loss weight ``w(t)``.

    Kinds:
        - ``"none"``: ones.
        - ``"diffsynth"``: DiffSynth-Studio ``FlowMatchSFTLoss`` weighting,
          ``w(t) = (y(t) - y_min) / mean_grid(y - y_min)`` with
          ``y(t) = exp(-2 ((1000 t - 500) / 1000)^2)``, where min and mean are taken over
          DiffSynth's 1000-step training grid for this ``shift``
          (:func:`diffsynth_training_grid`), not over the batch. At grid points it equals
          DiffSynth's table (:func:`diffsynth_weight_table`); it peaks at ``t = 0.5`` and is
          >= 0 on ``[0, 1]`` (the grid contains ``t = 1``, where ``y`` is smallest).

    Args:
        t: Times in ``[0, 1]``, shape ``(B,)``.
        kind: One of :data:`LOSS_WEIGHTINGS`.
        shift: Shift of the DiffSynth grid (DiffSynth's FLUX.1 default is 3); only used by
            ``"diffsynth"``. Should match the shift used to draw ``t``.

    Returns:
        Weights, shape ``(B,)``, dtype of ``t`` (float32 for integer input).

    Raises:
        ValueError: Unknown kind or non-positive shift.
    """
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}; valid options: {LOSS_WEIGHTINGS}")
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    if kind == "none":
        return jnp.ones_like(t)
    y_min, norm = _diffsynth_constants(shift)
    return ((_diffsynth_raw(t) - y_min) / norm).astype(t.dtype)
