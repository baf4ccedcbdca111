"""A text-conditioned generator: the MMDiT on precomputed text embeddings, as plain functions.

The condition is a dict `{"context": (B, L, joint_attention_dim), "pooled":
(B, pooled_projection_dim)}` of the user's text-encoder outputs (SD3: CLIP-L/G
+ T5 states and the pooled CLIP vector), passed to the MMDiT unchanged.
Parameters are `{"mmdit": <MMDiT tree>}`, the same key the class-conditional
generator keeps its MMDiT under, so exporters and the APT discriminator find
it in the same place.

Classifier-free guidance: sampling guides against the negative prompt's
embedding (the dataset's, `apt_jax.data.latents.read_negative`; zeros without
one), and training drops a sample's condition by zeroing its context and
pooled vector (SD3's recipe drops each text encoder's output to zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from apt_jax.models.config import MMDiTConfig
from apt_jax.models.mmdit import MMDiT, dummy_inputs

COND_KEYS = ("context", "pooled")


@dataclasses.dataclass(frozen=True)
class TextConditionalMMDiT:
    """Attributes: the MMDiT architecture."""

    config: MMDiTConfig

    def init_boxed(self, rng: jax.Array) -> dict:
        """Parameters `{"mmdit": ...}`, still boxed with their logical axis names."""
        inputs = dummy_inputs(self.config, frames=self.config.patch_size_t or 0)
        # "xla": the parameters do not depend on the kernel, and cuDNN may be absent.
        mmdit = MMDiT(self.config).init(rng, *inputs, attention_implementation="xla")
        return {"mmdit": mmdit["params"]}

    @staticmethod
    def null_condition(cond: dict, negative: dict | None = None) -> dict:
        """CFG's unconditional input, shaped like `cond`: the `negative` prompt's
        embedding `{"context": (L, D), "pooled": (P,)}` for every sample (what
        diffusers' SD3 pipeline guides against), or zeros without one."""
        if negative is None:
            return {k: jnp.zeros_like(cond[k]) for k in COND_KEYS}
        return {
            k: jnp.broadcast_to(jnp.asarray(negative[k], cond[k].dtype), cond[k].shape)
            for k in COND_KEYS
        }

    @staticmethod
    def drop_condition(cond: dict, rng: jax.Array, prob: float) -> dict:
        """Zeroes each sample's context and pooled vector with probability `prob`."""
        if prob <= 0.0:
            return cond
        batch = cond["pooled"].shape[0]
        keep = jax.random.bernoulli(rng, 1.0 - prob, (batch,))

        def apply(x):
            return jnp.where(keep.reshape((batch,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

        return {k: apply(cond[k]) for k in COND_KEYS}

    def velocity(
        self,
        params: dict,
        x: jax.Array,
        t: jax.Array,
        cond: dict,
        *,
        attention_implementation: str | None = None,
        return_hidden_states: bool = False,
    ):
        """v `(B, ...)` for latents x `(B, ...)`, times t `(B,)` and `cond` (see module doc)."""
        return MMDiT(self.config).apply(
            {"params": params["mmdit"]},
            x,
            t,
            cond["context"],
            cond["pooled"],
            attention_implementation=attention_implementation,
            return_hidden_states=return_hidden_states,
        )

    def velocity_fn(self, params: dict, **kwargs) -> Callable:
        """`(x, t, cond) -> v` closed over params, the sampler's interface."""
        return lambda x, t, cond: self.velocity(params, x, t, cond, **kwargs)
