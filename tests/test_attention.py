"""apt_jax's attention kernel against `jax.nn.dot_product_attention` and a NumPy
reference: values, first and second derivatives, low precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.models.attention import attention
from apt_jax.models.layers import dot_product_attention

B, T, H, K = 2, 13, 3, 8  # odd token count: no layout is square


def _inputs(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, H, K)), dtype) for _ in range(4))


def _numpy_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(K)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshk->bqhk", p, v)


def _reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def test_forward_matches_numpy_and_jax_nn():
    q, k, v, _ = _inputs()
    out = attention(q, k, v)
    assert out.shape == (B, T, H, K) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _numpy_attention(q, k, v), atol=1e-5)
    np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-6)


def test_vjp_matches_autodiff():
    q, k, v, g = _inputs(1)
    _, vjp = jax.vjp(attention, q, k, v)
    _, vjp_ref = jax.vjp(_reference, q, k, v)
    for got, want, name in zip(vjp(g), vjp_ref(g), "qkv", strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"d{name}")


def test_vjp_matches_finite_differences():
    q, k, v, g = _inputs(2)
    w = np.asarray(g, np.float64)
    grads = jax.grad(lambda *a: jnp.sum(attention(*a) * g), argnums=(0, 1, 2))(q, k, v)
    rng = np.random.default_rng(3)
    for i, grad in enumerate(grads):
        direction = rng.normal(size=(B, T, H, K))
        eps = 1e-3
        args_p = [np.asarray(a, np.float64) for a in (q, k, v)]
        args_m = [a.copy() for a in args_p]
        args_p[i] = args_p[i] + eps * direction
        args_m[i] = args_m[i] - eps * direction
        numeric = (
            np.sum(_numpy_attention(*args_p) * w) - np.sum(_numpy_attention(*args_m) * w)
        ) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad, np.float64) * direction))
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric)), (i, numeric, analytic)


def test_second_order_reverse_mode_matches_autodiff():
    """What the exact R1 penalty needs: a gradient of a squared input gradient."""
    q, k, v, g = _inputs(4)

    def penalty(fn, k, v):
        d_q = jax.grad(lambda q: jnp.sum(fn(q, k, v) * g))(q)
        return jnp.sum(jnp.square(d_q))

    got = jax.grad(lambda k, v: penalty(attention, k, v), argnums=(0, 1))(k, v)
    want = jax.grad(lambda k, v: penalty(_reference, k, v), argnums=(0, 1))(k, v)
    for a, b in zip(got, want, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-3  # the check is not vacuous
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_stays_close_and_keeps_its_dtype():
    q, k, v, g = _inputs(5, jnp.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v), atol=3e-2)
    grads = jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32) * g), (0, 1, 2))(q, k, v)
    assert all(d.dtype == jnp.bfloat16 for d in grads)


@pytest.mark.parametrize("implementation", ["xla", "xla_autodiff"])
def test_dispatch(implementation):
    q, k, v, _ = _inputs(6)
    out = dot_product_attention(q, k, v, implementation)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v), atol=1e-5)


def test_forward_mode_needs_the_autodiff_implementation():
    q, k, v, dq = _inputs(7)
    _, tangent = jax.jvp(lambda q: dot_product_attention(q, k, v, "xla_autodiff"), (q,), (dq,))
    assert tangent.shape == (B, T, H, K)
    with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\) to a custom_vjp function"):
        jax.jvp(lambda q: attention(q, k, v), (q,), (dq,))
