"""Building blocks of the MMDiT: dense layers with logical axes, norms, adaLN,
attention and the feed-forward net.

Ein-notation used in shapes: B batch, N image tokens, L context tokens,
T = N + L joint tokens, D model width, H heads, K head width (D = H K).
Module and parameter names mirror diffusers' `SD3Transformer2DModel` so the
weight converter is a renaming plus transposes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apt_jax.models import axes
from apt_jax.models.attention import attention
from apt_jax.models.config import ATTENTION_IMPLEMENTATIONS, MMDiTConfig

Initializer = Any

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


class TokenDense(nn.Dense):
    """`nn.Dense` (same parameters) that multiplies `(..., D)` inputs as one
    `(prod(...), D)` matrix.

    Why: for a 3D `(B, N, D)` input XLA:CPU lays out the weight gradient
    `x^T dy` (a contraction over both B and N) with a transposed copy of an
    activation, ~10% of an MMDiT training step; on 2D operands it contracts
    in place. Same products, same values.
    """

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        if inputs.ndim <= 2:
            return super().__call__(inputs)
        lead = inputs.shape[:-1]
        out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return out.reshape(*lead, out.shape[-1])


def dense(
    config: MMDiTConfig,
    features: int,
    names: tuple[str, str],
    name: str,
    *,
    kernel_init: Initializer = xavier,
) -> nn.Dense:
    """A `TokenDense` with logically-partitioned kernel and bias, in config dtypes."""
    return TokenDense(
        features,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(zeros, (names[1],)),
        name=name,
    )


def layer_norm(config: MMDiTConfig, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm(eps=1e-6) without affine parameters, as every SD3 norm."""
    return nn.LayerNorm(
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        dtype=config.compute_dtype,
        name=name,
    )


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm over the last axis (diffusers `RMSNorm(eps=1e-6)`), in fp32."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: `(..., K)` -> `(..., K)`."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(ones, (axes.HEAD_DIM,)),
            (x.shape[-1],),
            self.config.storage_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
        return (x32 * scale.astype(jnp.float32)).astype(self.config.compute_dtype)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(k * D) on the conditioning vector, split into k chunks.

    The linear layer is zero-initialised (adaLN-Zero, DiT): every gate starts
    at 0, so each residual block starts as the identity and the fresh network
    is exactly its input path; training is stable from the first step without
    warm-up of the residual scales.
    """

    config: MMDiTConfig
    num_chunks: int

    @nn.compact
    def __call__(self, cond: jnp.ndarray) -> list[jnp.ndarray]:
        """cond: `(B, D)` -> `num_chunks` arrays of `(B, 1, D)`."""
        d = self.config.inner_dim
        out = dense(
            self.config,
            self.num_chunks * d,
            (axes.EMBED, axes.MODULATION),
            "linear",
            kernel_init=zeros,
        )(nn.silu(cond))
        return [c[:, None, :] for c in jnp.split(out, self.num_chunks, axis=-1)]


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    return x * (1.0 + scale) + shift


def dot_product_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, implementation: str
) -> jnp.ndarray:
    """Softmax attention `softmax(q k^T / sqrt(K)) v`, no mask, by `implementation`.

    The one place where an entry of `ATTENTION_IMPLEMENTATIONS` becomes a
    kernel: the MMDiT's joint attention and the APT discriminator's
    cross-attention heads both call it, so a name means the same kernel in both.

      "xla": `apt_jax.models.attention` (heads-major, closed-form softmax
        gradient; differentiable twice in reverse mode: exact R1).
      "xla_autodiff": `jax.nn.dot_product_attention(implementation="xla")`
        differentiated by JAX (twice in reverse mode, and in forward mode).
      "cudnn": the fused GPU kernel, first-order only, needing fp16/bf16 inputs.

    Args:
      q: queries `(B, Tq, H, K)`.
      k, v: keys and values `(B, Tk, H, K)`; Tk may differ from Tq (the
        discriminator's heads have one query token).
      implementation: an entry of `ATTENTION_IMPLEMENTATIONS`.

    Returns:
      `(B, Tq, H, K)`, in the inputs' dtype.

    Raises:
      ValueError: `implementation` is not an entry of `ATTENTION_IMPLEMENTATIONS`.
    """
    if implementation == "xla":
        return attention(q, k, v)
    if implementation == "xla_autodiff":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    raise ValueError(
        f"attention_implementation={implementation!r} is unknown; use one of "
        f"{ATTENTION_IMPLEMENTATIONS}."
    )


class Attention(nn.Module):
    """SD3 joint attention (image + context tokens) or image self-attention.

    With `joint=True`, image tokens use `to_q/k/v` and context tokens
    `add_q/k/v_proj`; both are concatenated `[image; context]` for one
    attention and split back. `context_pre_only` (the last SD3 block) drops the
    context output projection `to_add_out`, because that block's context output
    is never used.
    """

    config: MMDiTConfig
    joint: bool = True
    context_pre_only: bool = False
    implementation: str = "xla"

    def _heads(self, x: jnp.ndarray) -> jnp.ndarray:
        b, n, _ = x.shape
        h, k = self.config.num_attention_heads, self.config.attention_head_dim
        x = x.reshape(b, n, h, k)
        return nn.with_logical_constraint(
            x, (axes.BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM)
        )

    def _qkv(self, x, prefix_q, prefix_k, prefix_v, norm_q, norm_k):
        cfg = self.config
        d = cfg.inner_dim
        names = (axes.EMBED, axes.HEADS)
        q = self._heads(dense(cfg, d, names, prefix_q)(x))
        k = self._heads(dense(cfg, d, names, prefix_k)(x))
        v = self._heads(dense(cfg, d, names, prefix_v)(x))
        if cfg.qk_norm == "rms_norm":
            q = HeadRMSNorm(cfg, name=norm_q)(q)
            k = HeadRMSNorm(cfg, name=norm_k)(k)
        return q, k, v

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, context: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """x: `(B, N, D)`, context: `(B, L, D)` -> (`(B, N, D)`, `(B, L, D)` or None)."""
        cfg = self.config
        d = cfg.inner_dim
        names = (axes.HEADS, axes.EMBED)
        q, k, v = self._qkv(x, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        n = x.shape[1]
        if self.joint:
            cq, ck, cv = self._qkv(
                context, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"
            )
            q = jnp.concatenate([q, cq], axis=1)
            k = jnp.concatenate([k, ck], axis=1)
            v = jnp.concatenate([v, cv], axis=1)
        out = dot_product_attention(q, k, v, self.implementation)
        out = out.reshape(out.shape[0], out.shape[1], d)
        x_out = dense(cfg, d, names, "to_out")(out[:, :n])
        if not self.joint or self.context_pre_only:
            return x_out, None
        return x_out, dense(cfg, d, names, "to_add_out")(out[:, n:])


class FeedForward(nn.Module):
    """Linear(D -> 4D) -> GELU(tanh) -> Linear(4D -> D) (diffusers `ff.net.0.proj`, `ff.net.2`)."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        h = dense(cfg, 4 * cfg.inner_dim, (axes.EMBED, axes.MLP), "fc_in")(x)
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        h = nn.gelu(h, approximate=True)
        return dense(cfg, cfg.inner_dim, (axes.MLP, axes.EMBED), "fc_out")(h)
