"""Class labels -> `(context, pooled)`, so class-conditional recipes keep the
SD3 call signature of the MMDiT.

Label `num_classes` is the null class used for classifier-free guidance
(its embedding is learned, like SD3's empty-prompt embedding).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from apt_jax.models import axes


class LabelEmbedder(nn.Module):
    """Learned per-class context tokens and pooled vector.

    Attributes:
      num_classes: real classes; label `num_classes` is the null class.
      context_tokens: L, tokens of context produced per label.
      joint_attention_dim: width of the context tokens (the MMDiT's).
      pooled_projection_dim: width of the pooled vector (the MMDiT's).
    """

    num_classes: int
    context_tokens: int
    joint_attention_dim: int
    pooled_projection_dim: int
    param_dtype: str = "float32"

    @property
    def null_label(self) -> int:
        return self.num_classes

    @nn.compact
    def __call__(self, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """labels `(B,)` int in [0, num_classes] -> context `(B, L, J)`, pooled `(B, P)`."""
        init = nn.initializers.normal(1.0)
        rows = self.num_classes + 1
        context_table = self.param(
            "context",
            nn.with_logical_partitioning(init, (axes.CLASSES, axes.ACT_LENGTH, axes.CONTEXT_IN)),
            (rows, self.context_tokens, self.joint_attention_dim),
            jnp.dtype(self.param_dtype),
        )
        pooled_table = self.param(
            "pooled",
            nn.with_logical_partitioning(init, (axes.CLASSES, axes.POOLED_IN)),
            (rows, self.pooled_projection_dim),
            jnp.dtype(self.param_dtype),
        )
        return context_table[labels], pooled_table[labels]
