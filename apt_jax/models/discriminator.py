"""The APT discriminator's heads (Seaweed-APT, docs/method.md), as linen modules.

The discriminator is the generator's MMDiT backbone (initialised from the
diffusion teacher) plus small cross-attention-only heads that read the image /
video tokens after a few blocks. Each head has one learnable query token that
attends to all visual tokens of its layer, then an MLP, and outputs one token.
The head tokens are concatenated on channels, normalised and projected to one
scalar logit per sample.

This module holds only the heads (`CrossAttentionHead`, `APTHeads`) and the
choice of layers (`default_head_layers`); the backbone + heads wrapper, with
the parameter tree `{"mmdit", "labels", "heads"}`, is
`apt_jax.models.apt_discriminator.APTDiscriminator`.

Ein-notation: B batch, N visual tokens of a layer, D model width, H heads,
K head width (D = H K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from apt_jax.models import axes
from apt_jax.models.config import MMDiTConfig
from apt_jax.models.layers import (
    FeedForward,
    HeadRMSNorm,
    dense,
    dot_product_attention,
    layer_norm,
)

# Depth fractions of the paper's heads: blocks 16, 26 and 36 of 36.
PAPER_HEAD_FRACTIONS: tuple[float, ...] = (16 / 36, 26 / 36, 36 / 36)


def default_head_layers(num_layers: int) -> tuple[int, ...]:
    """Blocks after which the heads read tokens: 16/36, 26/36 and 36/36 of the depth.

    The paper (36 blocks) reads after blocks 16, 26 and 36 counted from 1. For a
    depth L each fraction f becomes the 1-based block `round(f * L)`, rounding
    halves up (not Python's round-half-to-even, so the choice does not flip
    between neighbouring depths), at least 1; minus 1 gives the 0-based index
    into `MMDiT(..., return_hidden_states=True)`'s hidden states. Coinciding
    indices (shallow models) are merged.

    Examples: 36 -> (15, 25, 35); 24 -> (10, 16, 23); 4 -> (1, 2, 3); 2 -> (0, 1);
    1 -> (0,).

    Args:
      num_layers: blocks in the backbone (`MMDiTConfig.num_layers`), >= 1.

    Returns:
      Sorted, distinct 0-based block indices; the last is always `num_layers - 1`.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}.")
    blocks = {max(1, math.floor(f * num_layers + 0.5)) for f in PAPER_HEAD_FRACTIONS}
    return tuple(sorted(b - 1 for b in blocks))


def check_head_layers(head_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Validates head indices against the depth; returns them as a sorted tuple."""
    layers = tuple(int(i) for i in head_layers)
    if not layers:
        raise ValueError("head_layers is empty; the discriminator needs at least one head.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"head_layers has indices {bad} outside [0, num_layers={num_layers}); they are "
            "0-based block indices (see default_head_layers)."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"head_layers={layers} has duplicates.")
    return tuple(sorted(layers))


class CrossAttentionHead(nn.Module):
    """One learnable query token cross-attends to a layer's tokens, then an MLP.

    query `(1, D)` -> q; LayerNorm(tokens) -> k, v; multi-head attention; output
    projection added to the query (residual); then `x + MLP(LayerNorm(x))` with
    the MMDiT's feed-forward (GELU-tanh, 4x). There is no self-attention: one
    query has nothing to attend to but the tokens.

    The norms have no affine parameters (as every SD3 norm): each is followed by
    a linear map that absorbs a scale and shift. With `config.qk_norm ==
    "rms_norm"` queries and keys get per-head RMSNorm as in the backbone, which
    keeps attention logits bounded at large widths.

    Attributes:
      config: the backbone's architecture (width, heads, dtypes).
      attention_implementation: an entry of `ATTENTION_IMPLEMENTATIONS`, the
        same kernel the backbone runs under that name
        (`apt_jax.models.layers.dot_product_attention`); "xla" and
        "xla_autodiff" have second derivatives (exact R1), "cudnn" has not.
    """

    config: MMDiTConfig
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens `(B, N, D)` -> one token per sample `(B, D)` (compute dtype)."""
        cfg = self.config
        b = tokens.shape[0]
        d, h, k = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        dtype = cfg.compute_dtype
        query = self.param(
            "query",
            # The length-1 axis has no logical name: replicated under any rules.
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
            (1, d),
            cfg.storage_dtype,
        )
        x = jnp.broadcast_to(query.astype(dtype)[None], (b, 1, d))

        kv_in = layer_norm(cfg)(tokens.astype(dtype))
        names = (axes.EMBED, axes.HEADS)
        q = dense(cfg, d, names, "to_q")(x).reshape(b, 1, h, k)
        key = dense(cfg, d, names, "to_k")(kv_in).reshape(b, -1, h, k)
        value = dense(cfg, d, names, "to_v")(kv_in).reshape(b, -1, h, k)
        if cfg.qk_norm == "rms_norm":
            q = HeadRMSNorm(cfg, name="norm_q")(q)
            key = HeadRMSNorm(cfg, name="norm_k")(key)
        out = dot_product_attention(q, key, value, self.attention_implementation)
        x = x + dense(cfg, d, (axes.HEADS, axes.EMBED), "to_out")(out.reshape(b, 1, d))
        x = x + FeedForward(cfg, name="ff")(layer_norm(cfg)(x))
        return x[:, 0]


class APTHeads(nn.Module):
    """The discriminator's heads and output layer on the backbone's hidden states.

    One `CrossAttentionHead` per entry of `head_layers` (named `head_{layer}`),
    their tokens concatenated on channels `(B, len(head_layers) * D)`,
    LayerNorm (no affine: the following Linear absorbs it) and a Linear to one
    logit (named `proj`).

    Attributes:
      config: the backbone's architecture.
      head_layers: 0-based block indices whose outputs the heads read.
      attention_implementation: kernel of the heads' attention (as in
        `CrossAttentionHead`).
    """

    config: MMDiTConfig
    head_layers: tuple[int, ...]
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(self, hidden_states: Sequence[jnp.ndarray]) -> jnp.ndarray:
        """Logits `(B,)` (float32, or wider compute dtype) from every block's hidden states.

        Args:
          hidden_states: the image tokens `(B, N, D)` after each block, all
            `num_layers` of them (as `MMDiT(..., return_hidden_states=True)`
            returns them); only those at `head_layers` are read.
        """
        cfg = self.config
        layers = check_head_layers(self.head_layers, len(hidden_states))
        tokens = [
            CrossAttentionHead(
                cfg, attention_implementation=self.attention_implementation, name=f"head_{i}"
            )(hidden_states[i])
            for i in layers
        ]
        feats = layer_norm(cfg)(jnp.concatenate(tokens, axis=-1))
        logit = dense(cfg, 1, (axes.EMBED, None), "proj")(feats)
        logit = logit[:, 0]
        return logit.astype(jnp.promote_types(logit.dtype, jnp.float32))
