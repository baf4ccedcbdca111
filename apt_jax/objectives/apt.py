"""The APT discriminator and generator losses, with the R1 / R2 penalties chosen by settings.

Pure functions of `(params, samples, cond, rng)`; the APT recipe
(`apt_jax.tasks.apt`) differentiates them, and `benchmarks/apt_r1.py` times them.

D loss (per batch, averaged over samples):
  nonsaturating  `softplus(-D(x)) + softplus(D(x_hat))`            (Seaweed-APT)
  relativistic   `softplus(-(D(x) - D(x_hat)))`, paired by index    (AAPT)
  wgan_gp        `D(x_hat) - D(x) + gp_weight (||grad D(x_mix)|| - 1)^2`
plus the R1 penalty on real samples (and optionally R2 on generated ones):
  r1_mode="approx"  `lambda * (D(x) - D(x + sigma eps))^2`  (the paper's; first order)
  r1_mode="exact"   `w * ||grad_x D(x)||^2` with `jax.grad` (D's update then
                    differentiates twice); w defaults to `lambda * sigma^2`, the
                    weight at which both penalise alike (`matching_exact_weight`)
  r1_mode="none"

`D(x)` is `APTDiscriminator.noised_logits`: x is noised inside D at one
`t ~ shift(U(0, 1), d_timestep_shift)` per sample. Real sample i and generated
sample i share their t and noise (one key for both): `D(x) = E_t D_hat(x_t, t)`
holds for any coupling of the two estimates, and comparing the pair at the same
noise level removes the noise level's effect on the logit from the difference
the losses see (common random numbers; lower-variance gradients). The penalties
see the same t and noise as the loss terms, so they measure D's smoothness in
x, not its noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from apt_jax.errors import UserError
from apt_jax.models.apt_discriminator import APTDiscriminator
from apt_jax.models.config import SECOND_ORDER_ATTENTION
from apt_jax.objectives import adversarial as adv

LOSSES = ("nonsaturating", "relativistic", "wgan_gp")
PENALTY_MODES = ("approx", "exact", "none")


@dataclasses.dataclass(frozen=True)
class APTLossSettings:
    """How the APT losses are computed (the recipe's config keys of the same names).

    Attributes:
      loss: one of LOSSES.
      r1_mode: one of PENALTY_MODES, R1 on real samples.
      r2_mode: one of PENALTY_MODES, R2 on generated samples (AAPT); same weights.
      r1_weight: lambda of the approximate penalty (paper: 100).
      r1_sigma: sigma of the approximate penalty (paper: 0.01 images, 0.1 video).
      r1_exact_weight: weight of the exact penalty; None means
        `r1_weight * r1_sigma ** 2`.
      gp_weight: WGAN-GP weight (loss="wgan_gp" only).
      d_timestep_shift: s of D's noising density `shift(U(0, 1), s)`.
      exact_attention: attention kernel of D's passes that are differentiated
        twice (exact R1 / R2, gradient penalty): one of
        `SECOND_ORDER_ATTENTION` ("xla", the default, or "xla_autodiff").
    """

    loss: str = "nonsaturating"
    r1_mode: str = "approx"
    r2_mode: str = "none"
    r1_weight: float = 100.0
    r1_sigma: float = 0.01
    r1_exact_weight: float | None = None
    gp_weight: float = 10.0
    d_timestep_shift: float = 1.0
    exact_attention: str = "xla"

    def __post_init__(self):
        if self.exact_attention not in SECOND_ORDER_ATTENTION:
            raise UserError(
                f"exact_attention={self.exact_attention!r} has no second-order rule; exact R1 / "
                f"R2 and the gradient penalty need one of {SECOND_ORDER_ATTENTION}."
            )
        if self.loss not in LOSSES:
            raise UserError(f"loss={self.loss!r} is unknown; use one of {LOSSES}.")
        for name in ("r1_mode", "r2_mode"):
            if getattr(self, name) not in PENALTY_MODES:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is unknown; use one of {PENALTY_MODES}."
                )
        if self.r1_weight < 0 or self.gp_weight < 0:
            raise UserError("r1_weight and gp_weight must be >= 0.")
        if self.r1_sigma <= 0:
            raise UserError(f"r1_sigma={self.r1_sigma} must be > 0.")
        if self.r1_exact_weight is not None and self.r1_exact_weight < 0:
            raise UserError("r1_exact_weight must be >= 0 (or None for lambda * sigma^2).")
        if self.d_timestep_shift <= 0:
            raise UserError(f"d_timestep_shift={self.d_timestep_shift} must be > 0.")

    @property
    def exact_weight(self) -> float:
        if self.r1_exact_weight is not None:
            return float(self.r1_exact_weight)
        return adv.matching_exact_weight(self.r1_weight, self.r1_sigma)


def _penalty(mode, settings, logits_fn, x, rng_eps):
    """(weighted penalty (B,), raw penalty (B,), logits (B,)) for one sample set.

    `logits_fn(impl)` is D at this set's noise with attention kernel `impl`. For
    "exact" the logits come from the same pass as the input gradient (XLA
    attention); otherwise from one pass that "approx" reuses. The caller's loss
    term uses the returned logits.
    """
    if mode == "exact":
        raw, logits = adv.r1_exact_and_logits(logits_fn(settings.exact_attention), x)
        return settings.exact_weight * raw, raw, logits
    fn = logits_fn(None)
    logits = fn(x)
    if mode == "approx":
        raw = adv.r1_approx(fn, x, settings.r1_sigma, rng_eps, logits=logits)
        return settings.r1_weight * raw, raw, logits
    zero = jnp.zeros(x.shape[:1], jnp.float32)
    return zero, zero, logits


def discriminator_loss(
    disc: APTDiscriminator,
    settings: APTLossSettings,
    params: dict,
    real: jax.Array,
    fake: jax.Array,
    cond: Any,
    rng: jax.Array,
    *,
    attention_implementation: str | None = None,
) -> tuple[jax.Array, dict]:
    """D's loss on a batch of real and generated samples.

    Args:
      disc: the discriminator.
      settings: loss and penalty choices.
      params: D's parameters `{"mmdit", "labels", "heads"}`.
      real: real samples `(B, ...)`.
      fake: generated samples `(B, ...)`; pass them through `stop_gradient`
        (only D is trained here).
      cond: the condition of both (sample i of each has condition i): class labels
        `(B,)`, or the text condition `{"context", "pooled"}`.
      rng: PRNG key of D's noising and the penalties' perturbations.
      attention_implementation: kernel of the passes differentiated once.

    Returns:
      (scalar loss, metrics): `d_loss`, `r1`, `r2` (raw, unweighted means),
      `real_logits`, `fake_logits` (means), `d_accuracy`: for the
      non-saturating loss the fraction of real logits > 0 and fake logits < 0;
      for the paired losses (relativistic, WGAN), whose logits carry a free
      common offset, the fraction of pairs with real logit > fake logit.
    """
    r_noise, r_eps1, r_eps2, r_gp = jax.random.split(rng, 4)  # r_noise: real and fake

    def logits_fn(impl):
        return disc.logits_fn(
            params,
            cond,
            r_noise,
            shift=settings.d_timestep_shift,
            attention_implementation=impl or attention_implementation,
        )

    real_pen, r1, real_logits = _penalty(settings.r1_mode, settings, logits_fn, real, r_eps1)
    fake_pen, r2, fake_logits = _penalty(settings.r2_mode, settings, logits_fn, fake, r_eps2)
    if settings.loss == "nonsaturating":
        per_sample = adv.d_loss_nonsaturating(real_logits, fake_logits)
    elif settings.loss == "relativistic":
        per_sample = adv.d_loss_relativistic(real_logits, fake_logits)
    else:
        fn = logits_fn(settings.exact_attention)
        per_sample = adv.wgan_d_loss(real_logits, fake_logits) + settings.gp_weight * (
            adv.gradient_penalty(fn, real, fake, r_gp)
        )
    loss = jnp.mean(per_sample + real_pen + fake_pen)
    metrics = {
        "d_loss": loss,
        "r1": jnp.mean(r1),
        "r2": jnp.mean(r2),
        "real_logits": jnp.mean(real_logits),
        "fake_logits": jnp.mean(fake_logits),
        "d_accuracy": _accuracy(settings.loss, real_logits, fake_logits),
    }
    return loss, metrics


def _accuracy(loss: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    if loss == "nonsaturating":
        return 0.5 * (jnp.mean(real_logits > 0) + jnp.mean(fake_logits < 0))
    return jnp.mean(real_logits > fake_logits)


def generator_loss(
    disc: APTDiscriminator,
    settings: APTLossSettings,
    d_params: dict,
    fake: jax.Array,
    real: jax.Array,
    cond: Any,
    rng: jax.Array,
    *,
    attention_implementation: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """G's loss as a function of its samples `fake` `(B, ...)` (differentiate w.r.t. fake).

    `real` `(B, ...)` is read only by the relativistic loss (paired by index).
    Returns (scalar loss, {"g_loss"}).
    """
    kw = dict(shift=settings.d_timestep_shift, attention_implementation=attention_implementation)
    fake_logits = disc.noised_logits(d_params, fake, cond, rng, **kw)
    if settings.loss == "nonsaturating":
        per_sample = adv.g_loss_nonsaturating(fake_logits)
    elif settings.loss == "relativistic":
        real_logits = disc.noised_logits(d_params, real, cond, rng, **kw)  # paired noise
        per_sample = adv.g_loss_relativistic(jax.lax.stop_gradient(real_logits), fake_logits)
    else:
        per_sample = adv.wgan_g_loss(fake_logits)
    loss = jnp.mean(per_sample)
    return loss, {"g_loss": loss}
