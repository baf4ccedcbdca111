"""A class-conditional generator: `LabelEmbedder` + `MMDiT`, as plain functions.

Parameters are a dict `{"mmdit": ..., "labels": ...}`. The MMDiT keeps its SD3
signature; labels only pass through the label embedder. Label `num_classes`
is the null class (classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from apt_jax.models.config import MMDiTConfig
from apt_jax.models.label_embedder import LabelEmbedder
from apt_jax.models.mmdit import MMDiT, dummy_inputs


@dataclasses.dataclass(frozen=True)
class ClassConditionalMMDiT:
    """Attributes: the MMDiT architecture, the class count, context tokens per label."""

    config: MMDiTConfig
    num_classes: int
    context_tokens: int = 1

    def __post_init__(self):
        if self.num_classes < 1 or self.context_tokens < 1:
            raise ValueError(
                f"num_classes={self.num_classes} and context_tokens={self.context_tokens} must "
                "be positive."
            )

    @property
    def null_label(self) -> int:
        return self.num_classes

    def null_condition(
        self, labels: jax.Array, negative: int | jax.Array | None = None
    ) -> jax.Array:
        """CFG's unconditional input, shaped like `labels`: the null class, or the
        `negative` class when one is given (>= 0)."""
        if negative is None:
            return jnp.full_like(labels, self.null_label)
        return jnp.full_like(labels, jnp.where(negative < 0, self.null_label, negative))

    def drop_condition(self, labels: jax.Array, rng: jax.Array, prob: float) -> jax.Array:
        """Replaces each label by the null class with probability `prob` (CFG training)."""
        if prob <= 0.0:
            return labels
        drop = jax.random.bernoulli(rng, prob, labels.shape)
        return jnp.where(drop, self.null_label, labels)

    @property
    def label_embedder(self) -> LabelEmbedder:
        return LabelEmbedder(
            num_classes=self.num_classes,
            context_tokens=self.context_tokens,
            joint_attention_dim=self.config.joint_attention_dim,
            pooled_projection_dim=self.config.pooled_projection_dim,
            param_dtype=self.config.param_dtype,
        )

    def init_boxed(self, rng: jax.Array) -> dict:
        """Parameters still boxed with their logical axis names (for sharding)."""
        r_model, r_labels = jax.random.split(rng)
        inputs = dummy_inputs(self.config, frames=self.config.patch_size_t or 0)
        # "xla": the parameters do not depend on the kernel, and cuDNN may be absent.
        mmdit = MMDiT(self.config).init(r_model, *inputs, attention_implementation="xla")
        mmdit = mmdit["params"]
        labels = self.label_embedder.init(r_labels, jnp.zeros((1,), jnp.int32))["params"]
        return {"mmdit": mmdit, "labels": labels}

    def velocity(
        self,
        params: dict,
        x: jax.Array,
        t: jax.Array,
        labels: jax.Array,
        *,
        attention_implementation: str | None = None,
        return_hidden_states: bool = False,
    ):
        """v `(B, ...)` for latents x `(B, ...)`, times t `(B,)`, labels `(B,)`."""
        context, pooled = self.label_embedder.apply({"params": params["labels"]}, labels)
        return MMDiT(self.config).apply(
            {"params": params["mmdit"]},
            x,
            t,
            context,
            pooled,
            attention_implementation=attention_implementation,
            return_hidden_states=return_hidden_states,
        )

    def velocity_fn(self, params: dict, **kwargs) -> Callable:
        """`(x, t, labels) -> v` closed over params, the sampler's interface."""
        return lambda x, t, labels: self.velocity(params, x, t, labels, **kwargs)
