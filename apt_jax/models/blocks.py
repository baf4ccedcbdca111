"""The SD3 joint transformer block (and its SD3.5 dual-attention form).

Shapes: x `(B, N, D)` image tokens, ctx `(B, L, D)` context tokens, cond
`(B, D)` the timestep + pooled-text conditioning vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from apt_jax.models import axes
from apt_jax.models.config import MMDiTConfig
from apt_jax.models.layers import AdaLNModulation, Attention, FeedForward, layer_norm, modulate

Carry = tuple[jnp.ndarray, jnp.ndarray]

_TOKENS = (axes.BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock`, with a scan-friendly signature.

    Attributes:
      config: the architecture.
      dual: SD3.5 dual attention (extra image self-attention `attn2`, 9 chunks).
      context_pre_only: the last SD3 block; its context norm is adaLN-continuous
        with chunk order (scale, shift) and it has no context output path.
      attention_implementation: "xla", "xla_autodiff" or "cudnn" (`layers.dot_product_attention`).
      collect_hidden: also return the image tokens after the block (used by the
        APT discriminator's heads; under `nn.scan` they come back stacked).
    """

    config: MMDiTConfig
    dual: bool = False
    context_pre_only: bool = False
    attention_implementation: str = "xla"
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, carry: Carry, cond: jnp.ndarray) -> tuple[Carry, jnp.ndarray | None]:
        """(x `(B, N, D)`, ctx `(B, L, D)`), cond `(B, D)` -> ((x, ctx), x or None)."""
        cfg = self.config
        x, ctx = carry
        norm = layer_norm(cfg)

        chunks = AdaLNModulation(cfg, 9 if self.dual else 6, name="norm1")(cond)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        x_normed = norm(x)
        x_in = modulate(x_normed, shift_msa, scale_msa)

        if self.context_pre_only:
            c_scale, c_shift = AdaLNModulation(cfg, 2, name="norm1_context")(cond)
            c_in = modulate(norm(ctx), c_shift, c_scale)
        else:
            c_chunks = AdaLNModulation(cfg, 6, name="norm1_context")(cond)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_chunks
            c_in = modulate(norm(ctx), c_shift_msa, c_scale_msa)

        attn_x, attn_c = Attention(
            cfg,
            joint=True,
            context_pre_only=self.context_pre_only,
            implementation=self.attention_implementation,
            name="attn",
        )(x_in, c_in)
        x = x + gate_msa * attn_x

        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            attn2, _ = Attention(
                cfg, joint=False, implementation=self.attention_implementation, name="attn2"
            )(modulate(x_normed, shift_msa2, scale_msa2))
            x = x + gate_msa2 * attn2

        x = x + gate_mlp * FeedForward(cfg, name="ff")(modulate(norm(x), shift_mlp, scale_mlp))
        x = nn.with_logical_constraint(x, _TOKENS)

        if not self.context_pre_only:
            ctx = ctx + c_gate_msa * attn_c
            ff_in = modulate(norm(ctx), c_shift_mlp, c_scale_mlp)
            ctx = ctx + c_gate_mlp * FeedForward(cfg, name="ff_context")(ff_in)
            ctx = nn.with_logical_constraint(ctx, _TOKENS)

        return (x, ctx), (x if self.collect_hidden else None)
