"""Tests for apt_jax.sampling: sigma schedules, CFG, Euler sampler, one-step generator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apt_jax import sampling

# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


def test_diffusers_sigmas_reference_example():
    sig = sampling.diffusers_sigmas(4, 3.0)
    assert sig.shape == (5,)
    np.testing.assert_allclose(sig, [1.0, 0.8577, 0.6022, 0.0089, 0.0], atol=1e-4)


def _diffusers_by_hand(n, s):
    """Independent re-derivation of FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)."""

    def sh(x):
        return s * x / (1 + (s - 1) * x)

    # __init__: sigmas = shift(t / 1000) for t = 1000, 999, ..., 1.
    sigma_max, sigma_min = sh(1000 / 1000), sh(1 / 1000)
    # set_timesteps: n points evenly spaced in [1000 sigma_max, 1000 sigma_min], / 1000, shift.
    if n == 1:
        ts = [1000 * sigma_max]
    else:
        ts = [
            1000 * sigma_max + (1000 * sigma_min - 1000 * sigma_max) * i / (n - 1) for i in range(n)
        ]
    return np.array([sh(t / 1000) for t in ts] + [0.0])


@pytest.mark.parametrize("n", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("s", [1.0, 3.0, 6.0])
def test_diffusers_sigmas_matches_rederivation(n, s):
    sig = sampling.diffusers_sigmas(n, s)
    assert sig.shape == (n + 1,) and sig.dtype == np.float64
    np.testing.assert_allclose(sig, _diffusers_by_hand(n, s), atol=1e-12)
    assert sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0)


def test_diffusers_sigmas_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for n, s in [(1, 1.0), (4, 3.0), (10, 1.0), (28, 3.0), (50, 3.0)]:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=s)
        sched.set_timesteps(n)
        ref = np.asarray(sched.sigmas.cpu().numpy(), dtype=np.float64)
        np.testing.assert_allclose(sampling.diffusers_sigmas(n, s), ref, atol=1e-6)
        np.testing.assert_allclose(
            1000 * sampling.diffusers_sigmas(n, s)[:-1], sched.timesteps.cpu().numpy(), atol=1e-3
        )


def test_shifted_linear_sigmas():
    np.testing.assert_allclose(sampling.shifted_linear_sigmas(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    sig = sampling.shifted_linear_sigmas(8, 3.0)
    lin = np.linspace(1, 0, 9)
    np.testing.assert_allclose(sig, 3 * lin / (1 + 2 * lin), atol=1e-12)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)


def test_schedule_validation():
    for fn in (sampling.diffusers_sigmas, sampling.shifted_linear_sigmas):
        with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
            fn(0, 1.0)
        with pytest.raises(ValueError, match="shift must be > 0, got 0.0"):
            fn(4, 0.0)


# ------------------------------------------------------------------------------------------
# CFG
# ------------------------------------------------------------------------------------------


def _cond_velocity(calls=None):
    """v = scale * x + t * bias, with a dict condition; records the batch sizes it sees."""

    def fn(x, t, cond):
        if calls is not None:
            calls.append((x.shape[0], t.shape[0], cond["scale"].shape[0], cond["bias"].shape[0]))
        assert x.shape[0] == t.shape[0] == cond["scale"].shape[0] == cond["bias"].shape[0]
        return cond["scale"][:, None] * x + t[:, None] * cond["bias"]

    return fn


def _cfg_inputs(b=3, d=5):
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (b, d))
    t = jax.random.uniform(ks[1], (b,))
    cond = {"scale": jax.random.normal(ks[2], (b,)), "bias": jax.random.normal(ks[3], (b, d))}
    uncond = {"scale": jax.random.normal(ks[4], (b,)), "bias": jax.random.normal(ks[5], (b, d))}
    return x, t, cond, uncond


def test_cfg_scale_one_is_cond_velocity_single_call():
    x, t, cond, uncond = _cfg_inputs()
    calls = []
    fn = _cond_velocity(calls)
    v = sampling.guided_velocity(fn, x, t, cond, uncond, 1.0)
    np.testing.assert_allclose(v, _cond_velocity()(x, t, cond), atol=1e-6)
    assert calls == [(3, 3, 3, 3)]
    calls.clear()
    v = sampling.guided_velocity(fn, x, t, cond, None, 7.0)
    np.testing.assert_allclose(v, _cond_velocity()(x, t, cond), atol=1e-6)
    assert calls == [(3, 3, 3, 3)]


@pytest.mark.parametrize("g", [0.0, 4.0, 7.5])
def test_cfg_one_batched_call_and_formula(g):
    x, t, cond, uncond = _cfg_inputs()
    calls = []
    v = sampling.guided_velocity(_cond_velocity(calls), x, t, cond, uncond, g)
    assert calls == [(6, 6, 6, 6)]  # exactly one call, on batch 2B
    v_c = _cond_velocity()(x, t, cond)
    v_u = _cond_velocity()(x, t, uncond)
    np.testing.assert_allclose(v, v_u + g * (v_c - v_u), atol=1e-5)


def test_cfg_traced_scale_under_jit():
    x, t, cond, uncond = _cfg_inputs()
    fn = _cond_velocity()
    f = jax.jit(lambda g: sampling.guided_velocity(fn, x, t, cond, uncond, g))
    for g in (1.0, 3.0):
        v_c, v_u = fn(x, t, cond), fn(x, t, uncond)
        np.testing.assert_allclose(f(jnp.float32(g)), v_u + g * (v_c - v_u), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Euler sampler
# ------------------------------------------------------------------------------------------


def _noise(shape=(2, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    "name,velocity,solution",
    [
        # dx/dt = a x, from t = 1 to t = 0: x(0) = x(1) exp(-a).
        ("autonomous", lambda x, t, c: 1.5 * x, lambda x1: x1 * math.exp(-1.5)),
        # dx/dt = 2 t x: x(0) = x(1) exp(-1); checks that t = sigma_i is passed per sample.
        ("time_dependent", lambda x, t, c: 2.0 * t[:, None] * x, lambda x1: x1 * math.exp(-1.0)),
    ],
)
@pytest.mark.parametrize("s", [1.0, 3.0])
def test_euler_first_order_convergence(name, velocity, solution, s):
    x1 = _noise()
    exact = np.asarray(solution(np.asarray(x1, np.float64)))
    errs = {}
    for n in (16, 32, 64, 128):
        sig = sampling.shifted_linear_sigmas(n, s)
        out = jax.jit(lambda x, sig=sig: sampling.euler_sample(velocity, x, sig, None))(x1)
        errs[n] = np.abs(np.asarray(out, np.float64) - exact).max()
    for n in (16, 32, 64):
        ratio = errs[n] / errs[2 * n]
        assert 1.8 <= ratio <= 2.2, (name, s, n, errs)


def test_euler_matches_manual_loop_and_trajectory():
    x = _noise((3, 4))
    cond = {"w": jnp.array([0.5, -1.0, 2.0])}

    def vel(x, t, c):
        return jnp.tanh(c["w"][:, None] * x) + t[:, None]

    sig = sampling.diffusers_sigmas(5, 3.0)
    final, traj = sampling.euler_sample(vel, x, sig, cond, return_trajectory=True)
    assert traj.shape == (6, 3, 4)
    ref = [np.asarray(x, np.float64)]
    for i in range(5):
        t = np.full((3,), sig[i], np.float32)
        v = np.asarray(vel(jnp.asarray(ref[-1], jnp.float32), jnp.asarray(t), cond), np.float64)
        ref.append(ref[-1] + (sig[i + 1] - sig[i]) * v)
    np.testing.assert_allclose(traj, np.stack(ref), atol=1e-5)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[-1], final)
    only = sampling.euler_sample(vel, x, sig, cond)
    np.testing.assert_allclose(only, final, atol=1e-6)


def test_euler_exact_for_straight_path():
    """With the true (constant) velocity eps - x0, Euler lands exactly on x0 on any schedule."""
    x0, eps = _noise((4, 2, 3), 1), _noise((4, 2, 3), 2)
    cond = {"v": eps - x0}
    for sig in (sampling.diffusers_sigmas(7, 3.0), sampling.shifted_linear_sigmas(3)):
        out = sampling.euler_sample(lambda x, t, c: c["v"], eps, sig, cond)
        np.testing.assert_allclose(out, x0, atol=1e-5)


def test_euler_with_cfg_uses_batched_calls():
    x, _, cond, uncond = _cfg_inputs(b=3)
    calls = []
    sig = sampling.shifted_linear_sigmas(4)
    out = sampling.euler_sample(_cond_velocity(calls), x, sig, cond, uncond=uncond, cfg_scale=4.0)
    assert calls and all(c == (6, 6, 6, 6) for c in calls)
    # Reference: Euler with the guided velocity computed by two separate calls.
    ref = x
    fn = _cond_velocity()
    for i in range(4):
        t = jnp.full((3,), sig[i], jnp.float32)
        v_c, v_u = fn(ref, t, cond), fn(ref, t, uncond)
        ref = ref + (sig[i + 1] - sig[i]) * (v_u + 4.0 * (v_c - v_u))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_euler_preserves_dtype():
    x = _noise((2, 3)).astype(jnp.bfloat16)
    out = sampling.euler_sample(lambda x, t, c: -x, x, sampling.shifted_linear_sigmas(3), None)
    assert out.dtype == jnp.bfloat16


def _euler_product_and_derivative(w, x1, sig):
    """Closed form for v = w x: x_K = x1 prod(1 + w dt_i); d/dw by the product rule."""
    dt = np.diff(sig)
    fac = 1 + w * dt
    prod = np.prod(fac)
    dprod = sum(dt[j] * np.prod(np.delete(fac, j)) for j in range(len(dt)))
    return x1 * prod, x1 * dprod


def test_grad_through_every_euler_step():
    x1 = np.asarray(_noise((2, 3)), np.float64)
    sig = sampling.diffusers_sigmas(6, 3.0)
    w0 = 0.7

    def loss(w, remat):
        out = sampling.euler_sample(
            lambda x, t, c: w * x, jnp.asarray(x1, jnp.float32), sig, None, remat_steps=remat
        )
        return jnp.sum(out**2)

    sig32 = np.asarray(sig, np.float32).astype(np.float64)
    xk, dxk = _euler_product_and_derivative(w0, x1, sig32)
    analytic = np.sum(2 * xk * dxk)
    for remat in (False, True):
        val, g = jax.value_and_grad(loss)(w0, remat)
        np.testing.assert_allclose(val, np.sum(xk**2), rtol=1e-5)
        np.testing.assert_allclose(g, analytic, rtol=1e-4)
        h = 1e-2
        fd = (loss(w0 + h, remat) - loss(w0 - h, remat)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=2e-3)


def test_remat_steps_same_values_and_grads():
    x = _noise((4, 3), 3)
    kw, kb = jax.random.split(jax.random.key(9))
    params = {"W": 0.5 * jax.random.normal(kw, (3, 3)), "b": jax.random.normal(kb, (3,))}
    cond = jnp.array([0.0, 1.0, -1.0, 0.5])
    sig = sampling.diffusers_sigmas(5, 3.0)

    def loss(p, x, remat):
        def vel(x, t, c):
            return jnp.tanh(x @ p["W"] + p["b"]) * (1 + t[:, None]) + c[:, None]

        out = sampling.euler_sample(vel, x, sig, cond, remat_steps=remat)
        return jnp.mean(out**2)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (v0, g0), (v1, g1) = grad_fn(params, x, False), grad_fn(params, x, True)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g0[0]["W"])).max() > 0
    # remat_steps actually inserts a checkpoint around the step.
    jaxpr_remat = str(jax.make_jaxpr(lambda p: loss(p, x, True))(params))
    jaxpr_plain = str(jax.make_jaxpr(lambda p: loss(p, x, False))(params))
    assert "remat" in jaxpr_remat and "remat" not in jaxpr_plain


def test_euler_sharded_batch_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    x = _noise((8, 4))
    cond = jnp.linspace(-1, 1, 8)
    sig = sampling.diffusers_sigmas(4, 3.0)

    def vel(x, t, c):
        return jnp.sin(x) * c[:, None] + t[:, None]

    f = jax.jit(lambda x, c: sampling.euler_sample(vel, x, sig, c), out_shardings=sharding)
    out = f(jax.device_put(x, sharding), jax.device_put(cond, sharding))
    np.testing.assert_allclose(out, sampling.euler_sample(vel, x, sig, cond), atol=1e-6)


# ------------------------------------------------------------------------------------------
# One-step generator
# ------------------------------------------------------------------------------------------


def test_one_step_generate():
    z = _noise((3, 2, 2))
    cond = jnp.array([1.0, 2.0, 3.0])
    seen_t = []

    def vel(x, t, c):
        return 0.5 * x * c[:, None, None] + t[:, None, None]

    def recording_vel(x, t, c):
        seen_t.append(np.asarray(t))
        return vel(x, t, c)

    out = sampling.one_step_generate(recording_vel, z, cond)
    np.testing.assert_array_equal(seen_t[0], np.ones(3, np.float32))
    np.testing.assert_allclose(out, z - vel(z, jnp.ones(3), cond), atol=1e-6)
    # Same as a single Euler step from t = 1 to t = 0.
    np.testing.assert_allclose(
        out, sampling.euler_sample(vel, z, np.array([1.0, 0.0]), cond), atol=1e-6
    )
