"""Softmax attention for XLA with a hand-written backward pass.

`attention` computes `softmax(q k^T / sqrt(K)) v`, the values of
`jax.nn.dot_product_attention(..., implementation="xla")` (to float rounding), but
  * in heads-major layout: `(B, T, H, K)` inputs are transposed once to
    `(B, H, T, K)`, so every product is a plain batched GEMM (on XLA:CPU the
    tokens-major contraction costs about twice as much), and
  * with the closed-form softmax gradient of FlashAttention (Dao et al. 2022):
    dS = P * (dP - rowsum(dO * O)), whose row sum runs over the head width K
    instead of the T key positions that autodiff of the softmax reduces over.
It stays an ordinary JAX function under higher-order reverse mode (the custom
rule is unrolled into plain ops by the first `jax.grad`), so the exact R1
penalty (a gradient of a gradient) works through it. Forward mode (`jax.jvp`)
of a `jax.custom_vjp` function is not supported by JAX; use
`attention_implementation="xla_autodiff"` for that.

Queries and keys may have different token counts (Tq, Tk): the MMDiT's joint
attention has Tq = Tk, the APT discriminator's heads one query (Tq = 1). Pick
this kernel by name through `apt_jax.models.layers.dot_product_attention`.

Ein-notation: B batch, T tokens (Tq queries, Tk keys), H heads, K head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads_major(x: jnp.ndarray) -> jnp.ndarray:
    """`(B, T, H, K)` <-> `(B, H, T, K)`."""
    return jnp.swapaxes(x, 1, 2)


def _forward(q, k, v):
    """Returns the output `(B, T, H, K)` and the residuals of the backward pass."""
    scale = q.shape[-1] ** -0.5
    qh, kh, vh = _heads_major(q), _heads_major(k), _heads_major(v)
    # Logits and softmax in float32 whatever the compute dtype (as jax.nn does).
    logits = jnp.einsum("bhqk,bhsk->bhqs", qh, kh, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1)  # (B, H, T, T)
    out = jnp.einsum("bhqs,bhsk->bhqk", probs.astype(v.dtype), vh)
    return _heads_major(out), (qh, kh, vh, probs, out)


@jax.custom_vjp
def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """q `(B, Tq, H, K)`, k and v `(B, Tk, H, K)` -> `(B, Tq, H, K)`; no mask, scale `K ** -0.5`."""
    return _forward(q, k, v)[0]


def _backward(residuals, d_out):
    qh, kh, vh, probs, out = residuals
    dtype = qh.dtype
    scale = qh.shape[-1] ** -0.5
    d_out = _heads_major(d_out)  # (B, H, T, K)
    d_v = jnp.einsum("bhqs,bhqk->bhsk", probs.astype(dtype), d_out)
    d_probs = jnp.einsum("bhqk,bhsk->bhqs", d_out, vh, preferred_element_type=jnp.float32)
    # rowsum(dP * P) = rowsum(dO * O) since O = P V: a (B, H, T, K) reduction.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = (probs * (d_probs - delta) * scale).astype(dtype)
    d_q = jnp.einsum("bhqs,bhsk->bhqk", d_logits, kh)
    d_k = jnp.einsum("bhqs,bhqk->bhsk", d_logits, qh)
    return _heads_major(d_q), _heads_major(d_k), _heads_major(d_v)


attention.defvjp(_forward, _backward)
