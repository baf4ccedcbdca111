"""Tests for apt_jax.flow: rectified-flow identities, time shift, timestep densities, weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy.special import expit, ndtri

from apt_jax import flow

SHIFTS = (0.25, 0.5, 1.0, 3.0, 12.0)


def _data(shape=(4, 3, 5, 2), seed=0):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k0, shape, minval=-1.0, maxval=1.0)
    eps = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
    t = jax.random.uniform(k2, (shape[0],))
    return x0, eps, t


# ------------------------------------------------------------------------------------------
# Interpolation / targets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (4, 7), (4, 3, 5, 2)])
def test_interpolate_matches_formula_and_endpoints(shape):
    x0, eps, t = _data(shape)
    xt = flow.interpolate(x0, eps, t)
    tb = np.asarray(t).reshape((-1,) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(xt, (1 - tb) * np.asarray(x0) + tb * np.asarray(eps), atol=1e-6)
    b = shape[0]
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.zeros(b)), x0, atol=1e-7)
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.ones(b)), eps, atol=1e-7)


def test_interpolate_is_per_sample():
    x0, eps, t = _data((4, 3))
    xt = flow.interpolate(x0, eps, t)
    for i in range(4):
        np.testing.assert_allclose(
            xt[i], (1 - t[i]) * x0[i] + t[i] * eps[i], atol=1e-6, err_msg=f"row {i}"
        )


def test_interpolate_rejects_bad_t_shape():
    x0, eps, _ = _data((4, 3))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\), got \(4, 1\)"):
        flow.interpolate(x0, eps, jnp.zeros((4, 1)))


@pytest.mark.parametrize("shape", [(8,), (4, 3, 5, 2)])
def test_velocity_round_trips(shape):
    x0, eps, t = _data(shape, seed=1)
    xt = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    np.testing.assert_allclose(v, np.asarray(eps) - np.asarray(x0), atol=1e-7)
    np.testing.assert_allclose(flow.x0_from_velocity(xt, t, v), x0, atol=1e-6)
    np.testing.assert_allclose(flow.eps_from_velocity(xt, t, v), eps, atol=1e-6)
    # An Euler step with the true velocity stays on the straight path.
    t2 = jnp.flip(t)
    tb = (t2 - t).reshape((-1,) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(xt + tb * v, flow.interpolate(x0, eps, t2), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Shift
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", SHIFTS)
def test_shift_endpoints_and_inverse(s):
    t = jnp.linspace(0.0, 1.0, 101)
    st = flow.shift(t, s)
    assert float(flow.shift(0.0, s)) == 0.0
    assert abs(float(flow.shift(1.0, s)) - 1.0) < 1e-12
    np.testing.assert_allclose(flow.shift(st, 1.0 / s), t, atol=1e-6)
    assert np.all(np.diff(np.asarray(st)) >= 0)  # monotone
    if s > 1:
        assert np.all(np.asarray(st)[1:-1] > np.asarray(t)[1:-1])  # towards noise


def test_shift_identity_and_types():
    t = np.linspace(0.0, 1.0, 11)
    np.testing.assert_array_equal(flow.shift(t, 1.0), t)
    assert isinstance(flow.shift(0.3, 3.0), float)
    assert isinstance(flow.shift(t, 3.0), np.ndarray)
    assert isinstance(flow.shift(jnp.asarray(t), 3.0), jax.Array)
    assert flow.shift(0.5, 3.0) == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------
# Densities / timestep sampling
# ------------------------------------------------------------------------------------------


def _sample_many(n_seeds, batch, **kw):
    keys = jax.random.split(jax.random.key(123), n_seeds)
    return np.asarray(jax.jit(jax.vmap(lambda k: flow.sample_timesteps(k, batch, **kw)))(keys))


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_stratified_uniform_one_draw_per_stratum(batch):
    idx = np.arange(batch, dtype=np.float32)
    lo, hi = idx / np.float32(batch), (idx + 1) / np.float32(batch)
    for seed in range(5):
        t = np.asarray(
            flow.sample_timesteps(
                jax.random.key(seed), batch, density="uniform", shift=1.0, stratified=True
            )
        )
        assert t.shape == (batch,) and t.dtype == np.float32
        assert np.all(lo <= t) and np.all(t < hi)
        counts = np.bincount(np.floor(t.astype(np.float64) * batch).astype(int), minlength=batch)
        np.testing.assert_array_equal(counts, np.ones(batch))


def test_iid_uniform_is_not_stratified():
    t = np.asarray(flow.sample_timesteps(jax.random.key(0), 64, density="uniform"))
    counts = np.bincount(np.floor(t * 64).astype(int), minlength=64)
    assert counts.max() > 1  # some stratum gets two draws (deterministic for this seed)


@pytest.mark.parametrize(
    "density,f,exact",
    [
        ("uniform", lambda t: t**2, 1.0 / 3.0),
        ("uniform", lambda t: np.sin(np.pi * t), 2.0 / np.pi),
        # E[sigmoid(N(0,1))] = 1/2 by symmetry.
        ("logit_normal", lambda t: t, 0.5),
    ],
)
def test_stratified_lowers_estimator_variance(density, f, exact):
    n_seeds, batch = 200, 16
    strat = f(_sample_many(n_seeds, batch, density=density, stratified=True)).mean(axis=1)
    iid = f(_sample_many(n_seeds, batch, density=density, stratified=False)).mean(axis=1)
    assert abs(strat.mean() - exact) < 3e-3
    assert abs(iid.mean() - exact) < 4 * iid.std() / math.sqrt(n_seeds)
    assert strat.var() < 0.05 * iid.var(), (strat.var(), iid.var())


@pytest.mark.parametrize("m,s,sh", [(0.0, 1.0, 1.0), (0.5, 0.8, 3.0), (-1.0, 1.5, 1.0)])
def test_logit_normal_stratified_quantiles(m, s, sh):
    batch = 1000
    t = np.asarray(
        flow.sample_timesteps(
            jax.random.key(7),
            batch,
            density="logit_normal",
            logit_mean=m,
            logit_std=s,
            shift=sh,
            stratified=True,
        )
    )

    def q(p):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return flow.shift(expit(m + s * ndtri(p)), sh)

    i = np.arange(batch)
    # Draw i lies in the image of stratum i (the map is monotone increasing).
    assert np.all(t >= q(i / batch) - 1e-5) and np.all(t <= q((i + 1) / batch) + 1e-5)
    for p in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(np.quantile(t, p) - q(p)) < 5e-3, p


def test_mode_density_formula_and_monotone():
    u = jnp.linspace(0.0, 1.0, 1001)
    t = np.asarray(flow.mode(u, 1.29))
    un = np.asarray(u, dtype=np.float64)
    expected = 1 - un - 1.29 * (np.cos(np.pi / 2 * un) ** 2 - 1 + un)
    np.testing.assert_allclose(t, expected, atol=1e-6)
    assert t[0] == pytest.approx(1.0) and t[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(t) <= 1e-7)  # monotone decreasing
    np.testing.assert_allclose(flow.mode(u, 0.0), 1 - un, atol=1e-6)
    # Mode sampling concentrates mass in the middle compared with uniform.
    tm = _sample_many(1, 4000, density="mode", stratified=True)[0]
    assert np.mean(np.abs(tm - 0.5) < 0.25) > 0.6


@pytest.mark.parametrize("density", flow.DENSITIES)
@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("sh", SHIFTS)
def test_densities_in_unit_interval(density, stratified, sh):
    t = flow.sample_timesteps(
        jax.random.key(3), 512, density=density, shift=sh, stratified=stratified
    )
    assert t.shape == (512,) and t.dtype == jnp.float32
    t = np.asarray(t)
    assert np.all(np.isfinite(t)) and np.all(t >= 0.0) and np.all(t <= 1.0)
    assert t.std() > 0.05  # not degenerate


def test_shift_moves_samples_towards_noise():
    t1 = _sample_many(1, 2048, density="logit_normal", stratified=True)[0]
    t3 = _sample_many(1, 2048, density="logit_normal", stratified=True, shift=3.0)[0]
    np.testing.assert_allclose(t3, flow.shift(t1, 3.0), atol=1e-6)
    assert t3.mean() > t1.mean() + 0.1


def test_sample_timesteps_validation():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="density 'cosmap'; valid options: .*uniform"):
        flow.sample_timesteps(key, 4, density="cosmap")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="shift must be > 0"):
            flow.sample_timesteps(key, 4, shift=bad)
    with pytest.raises(ValueError, match=r"mode_scale must be in \[-1, 2/\(pi-2\)"):
        flow.sample_timesteps(key, 4, density="mode", mode_scale=3.0)
    with pytest.raises(ValueError, match="logit_std must be > 0, got 0.0"):
        flow.sample_timesteps(key, 4, logit_std=0.0)
    # Raised at trace time under jit too (the checks are on static python values).
    with pytest.raises(ValueError, match="density 'nope'; valid options: .*logit_normal"):
        jax.jit(lambda k: flow.sample_timesteps(k, 4, density="nope"))(key)


@pytest.mark.parametrize("density", flow.DENSITIES)
def test_stratified_sharded_matches_unsharded(density):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = 64
    key = jax.random.key(42)

    def fn(k):
        return flow.sample_timesteps(k, batch, density=density, shift=3.0, stratified=True)

    sharded = jax.jit(fn, out_shardings=sharding)(key)
    assert len(sharded.sharding.device_set) == 8
    assert sharded.addressable_shards[0].data.shape == (batch // 8,)
    # Same random bits whatever the sharding; transcendental ops may differ by an ulp between
    # differently fused programs, so compare to 1e-6 (uniform with shift 1 is exact).
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(jax.jit(fn)(key)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(fn(key)), atol=1e-6)
    # Stratification is over the global batch index: device r holds strata [8r, 8r + 8).
    u = np.asarray(
        jax.jit(
            lambda k: flow.sample_timesteps(k, batch, density="uniform", stratified=True),
            out_shardings=sharding,
        )(key)
    )
    assert np.all(np.floor(u * batch) == np.arange(batch))
    u_ref = flow.sample_timesteps(key, batch, density="uniform", stratified=True)
    np.testing.assert_array_equal(u, np.asarray(u_ref))


# ------------------------------------------------------------------------------------------
# Loss weights
# ------------------------------------------------------------------------------------------


def _diffsynth_table_by_hand(s):
    sigma_min = 0.003 / 1.002
    n = 1000
    sig = np.array([1.0 + (sigma_min - 1.0) * i / (n - 1) for i in range(n)])
    sig = s * sig / (1 + (s - 1) * sig)
    ts = sig * 1000
    y = np.exp(-2 * ((ts - 500) / 1000) ** 2)
    ys = y - y.min()
    return sig, ys * (1000 / ys.sum())


@pytest.mark.parametrize("s", [1.0, 3.0, 5.0])
def test_diffsynth_grid_and_table(s):
    grid = flow.diffsynth_training_grid(s)
    sig, table = _diffsynth_table_by_hand(s)
    assert grid.shape == (1000,)
    np.testing.assert_allclose(grid, sig, atol=1e-12)
    np.testing.assert_allclose(flow.diffsynth_weight_table(s), table, atol=1e-10)
    assert grid[0] == 1.0 and np.all(np.diff(grid) < 0)


@pytest.mark.parametrize("s", [1.0, 3.0, 5.0])
def test_diffsynth_weights_mean_min_peak(s):
    grid = flow.diffsynth_training_grid(s)
    w = np.asarray(flow.loss_weight(jnp.asarray(grid, jnp.float32), "diffsynth", shift=s))
    _, table = _diffsynth_table_by_hand(s)
    np.testing.assert_allclose(w, table, atol=1e-5)
    assert abs(w.mean() - 1.0) < 1e-5
    assert abs(w.min()) < 1e-6 and np.argmin(w) == 0  # smallest at t = 1
    peak_timestep = 1000 * grid[np.argmax(w)]
    assert abs(peak_timestep - 500) < 2.0
    # Continuous version peaks at t = 0.5 and is >= 0 on [0, 1].
    tt = jnp.linspace(0.0, 1.0, 2001)
    wc = np.asarray(flow.loss_weight(tt, "diffsynth", shift=s))
    assert float(tt[np.argmax(wc)]) == pytest.approx(0.5)
    assert np.all(wc >= -1e-6)


def test_diffsynth_weight_is_not_batch_normalised():
    t = jnp.array([0.2, 0.5, 0.9])
    w_batch = np.asarray(flow.loss_weight(t, "diffsynth", shift=3.0))
    for i in range(3):
        w_one = np.asarray(flow.loss_weight(t[i : i + 1], "diffsynth", shift=3.0))
        assert np.isfinite(w_one).all()
        np.testing.assert_allclose(w_one[0], w_batch[i], rtol=1e-6)
    assert w_batch[1] > w_batch[0] > w_batch[2]


def test_loss_weight_none_and_validation():
    t = jnp.linspace(0, 1, 5)
    np.testing.assert_array_equal(flow.loss_weight(t, "none"), np.ones(5))
    with pytest.raises(ValueError, match="weighting 'min_snr'; valid options: .*diffsynth"):
        flow.loss_weight(t, "min_snr")
    with pytest.raises(ValueError, match="shift must be > 0, got 0.0"):
        flow.loss_weight(t, "diffsynth", shift=0.0)
    w = jax.jit(lambda x: flow.loss_weight(x, "diffsynth", shift=3.0))(t)
    np.testing.assert_allclose(w, flow.loss_weight(t, "diffsynth", shift=3.0), rtol=1e-6)
