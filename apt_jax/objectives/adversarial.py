"""Adversarial losses and gradient penalties (Seaweed-APT, AAPT; docs/method.md).

Pure functions over logits and over per-sample logit functions; no linen.

A *logits function* is `logits_fn: x (B, ...) -> (B,)`, deterministic, and
**per-sample**: logit i depends on `x[i]` only (no batch statistics, no
cross-sample attention). The APT discriminator with its noising rng fixed is one
(`APTDiscriminator.logits_fn`). Per-sample-ness is what lets one `jax.grad` of
the summed logits give every sample's input gradient at once: `d(sum_j l_j) /
d x_i = d l_i / d x_i`.

Losses return per-sample values `(B,)`, in float32 (float64 inputs stay float64);
the caller averages (and weights).
Convention: D's logit is large for real samples; `softplus(-l) = -log sigmoid(l)`.

Exact penalties (`r1_exact`, `r2_exact`, `gradient_penalty`) take `jax.grad`
inside the loss, so the D update differentiates twice. JAX supports this with
XLA attention (`attention_implementation="xla"`) and under `jax.checkpoint`;
cuDNN / Pallas fused attention kernels have no second-order rule.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]


def _f32(x: jax.Array) -> jax.Array:
    """Upcasts to at least float32 (bf16 logits lose the small differences r1_approx
    measures); float64 stays float64, for gradient checks."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_sample_sq_norm(g: jax.Array) -> jax.Array:
    """`(B, ...)` -> `(B,)` squared L2 norm over all but the batch axis, >= float32."""
    g = _f32(g)
    return jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)


def _input_grad(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """Per-sample `grad_x logits_fn(x)_i`, `(B, ...)`, via one grad of the sum.

    Valid only for per-sample logits functions (module docstring). Not wrapped
    in `stop_gradient`: the result stays differentiable w.r.t. whatever
    `logits_fn` closes over (D's params), which is the double backward.
    """
    return jax.grad(lambda y: jnp.sum(_f32(logits_fn(y))))(x)


def r1_exact(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """Exact R1 penalty, `||grad_x logits_fn(x)_i||^2` per sample.

    Args:
      logits_fn: per-sample, deterministic `(B, ...) -> (B,)` (e.g. D with its
        noising rng fixed); must use XLA attention if the result is
        differentiated again.
      x: real samples `(B, ...)` (R1 regularises D on the data).

    Returns:
      `(B,)`, float32 (or float64 for float64 inputs). Differentiable w.r.t.
      what `logits_fn` closes over, so `jax.grad` of a D loss containing it
      w.r.t. D's params is the exact gradient of the regularised loss.
    """
    return _per_sample_sq_norm(_input_grad(logits_fn, x))


def r1_exact_and_logits(logits_fn: LogitsFn, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(r1_exact(logits_fn, x), logits_fn(x))` from one forward and one backward pass.

    A D loss needs the real logits as well as the penalty; `jax.vjp` gives both
    from the same forward pass instead of running D on the real batch twice.
    Both outputs are differentiable w.r.t. what `logits_fn` closes over.
    """
    logits, pullback = jax.vjp(lambda y: _f32(logits_fn(y)), x)
    (g,) = pullback(jnp.ones_like(logits))
    return _per_sample_sq_norm(g), logits


def r1_approx(
    logits_fn: LogitsFn,
    x: jax.Array,
    sigma: float,
    rng: jax.Array,
    *,
    logits: jax.Array | None = None,
) -> jax.Array:
    """Approximate R1 (APT), `(logits_fn(x)_i - logits_fn(x + sigma eps)_i)^2` per sample.

    First-order only (no grad inside), so it works with any attention kernel.
    `eps = jax.random.normal(rng, x.shape, x.dtype)`. For small sigma,
    `E_eps[r1_approx] ~ sigma^2 r1_exact` (see `matching_exact_weight`).

    `logits_fn` must be deterministic: with D's internal noising, close over a
    fixed rng so both evaluations see the same t and noise; otherwise the
    difference measures D's noise, not its smoothness.

    Args:
      logits_fn: per-sample, deterministic `(B, ...) -> (B,)`.
      x: real samples `(B, ...)`.
      sigma: perturbation std (paper: 0.01 images, 0.1 video).
      rng: PRNG key of the perturbation.
      logits: `logits_fn(x)` if the caller already has it (the D loss does),
        saving one forward pass; gradients flow through whichever is used.

    Returns:
      `(B,)`, float32 (or float64 for float64 inputs).
    """
    eps = jax.random.normal(rng, x.shape, x.dtype)
    if logits is None:
        logits = logits_fn(x)
    perturbed = logits_fn(x + jnp.asarray(sigma, x.dtype) * eps)
    return jnp.square(_f32(logits) - _f32(perturbed))


def r2_exact(logits_fn: LogitsFn, x_fake: jax.Array) -> jax.Array:
    """Exact R2 (AAPT): `r1_exact` on generated samples `(B, ...)` -> `(B,)`.

    Pass `stop_gradient(x_fake)` in the D step: the penalty regularises D, not G.
    """
    return r1_exact(logits_fn, x_fake)


def r2_approx(
    logits_fn: LogitsFn,
    x_fake: jax.Array,
    sigma: float,
    rng: jax.Array,
    *,
    logits: jax.Array | None = None,
) -> jax.Array:
    """Approximate R2 (AAPT): `r1_approx` on generated samples `(B, ...)` -> `(B,)`."""
    return r1_approx(logits_fn, x_fake, sigma, rng, logits=logits)


def matching_exact_weight(lam: float, sigma: float) -> float:
    """Weight of exact R1 that matches approximate R1 with weight `lam` and std `sigma`.

    Taylor: `D(x + sigma eps) - D(x) = sigma <g, eps> + sigma^2 / 2 eps^T H eps +
    O(sigma^3)` with `g = grad_x D`, and for `eps ~ N(0, I)`, `E[<g, eps>^2] =
    ||g||^2` while the cross term `sigma^3 <g, eps> eps^T H eps` has zero mean (odd
    in eps); so `E[L_aR1] = sigma^2 ||grad_x D||^2 + O(sigma^4)`, i.e. `lam * L_aR1`
    penalises like `lam * sigma^2 * R1`. APT's image setting (lam = 100,
    sigma = 0.01) corresponds to exact R1 weight 0.01.

    Args:
      lam: weight of the approximate penalty.
      sigma: its perturbation std.

    Returns:
      `lam * sigma**2`.
    """
    return lam * sigma**2


# ---------------------------------------------------------------------------------
# Losses. Inputs are logits `(B,)`; outputs per-sample `(B,)`, at least float32.
# ---------------------------------------------------------------------------------


def d_loss_nonsaturating(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """D's non-saturating loss, `softplus(-D(x)) + softplus(D(x_hat))`, `(B,)`."""
    return jax.nn.softplus(-_f32(real_logits)) + jax.nn.softplus(_f32(fake_logits))


def g_loss_nonsaturating(fake_logits: jax.Array) -> jax.Array:
    """G's non-saturating loss, `softplus(-D(x_hat))` (`-log sigmoid`, strong early gradients)."""
    return jax.nn.softplus(-_f32(fake_logits))


def d_loss_relativistic(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """AAPT's relativistic D loss, `softplus(-(D(x) - D(x_hat)))` = `f(D(x_hat) - D(x))`.

    Pairs real and generated samples by batch index (sample i with sample i),
    so both logits must be `(B,)` in matching order. f = softplus.
    """
    return jax.nn.softplus(-(_f32(real_logits) - _f32(fake_logits)))


def g_loss_relativistic(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """AAPT's relativistic G loss, `softplus(-(D(x_hat) - D(x)))`, `(B,)`, paired by index."""
    return jax.nn.softplus(-(_f32(fake_logits) - _f32(real_logits)))


def wgan_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """WGAN critic loss, `D(x_hat) - D(x)`, `(B,)` (add `gradient_penalty`)."""
    return _f32(fake_logits) - _f32(real_logits)


def wgan_g_loss(fake_logits: jax.Array) -> jax.Array:
    """WGAN generator loss, `-D(x_hat)`, `(B,)`."""
    return -_f32(fake_logits)


def gradient_penalty(
    logits_fn: LogitsFn, x_real: jax.Array, x_fake: jax.Array, rng: jax.Array
) -> jax.Array:
    """WGAN-GP penalty `(||grad_x D(x_mix)_i|| - 1)^2` on per-sample interpolates.

    `x_mix = a x_real + (1 - a) x_fake`, `a ~ U(0, 1)` one per sample,
    `a = jax.random.uniform(rng, (B,))`. Double backward like `r1_exact`.

    Args:
      logits_fn: per-sample, deterministic `(B, ...) -> (B,)`.
      x_real: real samples `(B, ...)`.
      x_fake: generated samples `(B, ...)` (stop_gradient them in the D step).
      rng: PRNG key of the mixing weights.

    Returns:
      `(B,)`, float32 (or float64 for float64 inputs).
    """
    a = jax.random.uniform(rng, (x_real.shape[0],), jnp.float32).astype(x_real.dtype)
    a = a.reshape((-1,) + (1,) * (x_real.ndim - 1))
    x_mix = a * x_real + (1 - a) * x_fake
    sq = _per_sample_sq_norm(_input_grad(logits_fn, x_mix))
    # The tiny offset keeps the sqrt's derivative finite where the gradient vanishes.
    return jnp.square(jnp.sqrt(sq + 1e-12) - 1.0)
