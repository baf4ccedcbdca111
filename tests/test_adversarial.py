"""Adversarial objectives (losses, R1 / R2 / GP) and the APT discriminator."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.models import ClassConditionalMMDiT, get_variant
from apt_jax.models.apt_discriminator import APTDiscriminator
from apt_jax.models.discriminator import default_head_layers
from apt_jax.objectives import adversarial as adv

NUM_CLASSES = 3
BATCH = 4

# The compiled programs here are tiny; XLA's backend optimisation would cost more
# compile time (seconds each, on a shared CPU) than it saves at run time.
fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


def _random_params(shapes, seed, scale):
    """N(0, scale^2) leaves shaped like `shapes`, drawn on the host (numpy: no per-shape
    compilation). Random everywhere, so adaLN-Zero gates are open and the tiny D's
    logit depends non-trivially on its input ("a perturbed D")."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes
    )


def _generator_shapes(config):
    boxed = jax.eval_shape(
        lambda: ClassConditionalMMDiT(config, NUM_CLASSES).init_boxed(jax.random.key(0))
    )
    return nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def tiny():
    """The "test" MMDiT (2 blocks, D = 32, 8x8x4 latents, 2x2 patches) as a D whose
    backbone is a random "teacher" (copied in by init_boxed) and heads freshly initialised."""
    disc = APTDiscriminator(get_variant("test"), num_classes=NUM_CLASSES)
    teacher = _random_params(_generator_shapes(disc.config), 0, 0.1)
    boxed = fast_jit(disc.init_boxed)(jax.random.key(1), teacher)
    x = jax.random.normal(jax.random.key(2), (BATCH, 8, 8, 4))
    labels = jnp.array([0, 1, 2, 3])  # 3 is the null class
    return disc, boxed, nn.meta.unbox(boxed), teacher, x, labels


@pytest.fixture(scope="module")
def probe(tiny):
    """One compiled program for the forward-pass tests: noised logits, the logits of
    `noise_input`'s (x_t, t), and the times at shift 1 and 12."""
    disc, _, params, _, _, labels = tiny

    @fast_jit
    def run(x, rng):
        x_t, t = disc.noise_input(x, rng, shift=1.0)
        _, t12 = disc.noise_input(x, rng, shift=12.0)
        noised = disc.noised_logits(params, x, labels, rng, shift=1.0)
        return noised, disc.logits(params, x_t, t, labels), x_t, t, t12

    return run


# ----------------------------------------------------------------------------- penalties


def test_r1_exact_equals_analytic_gradient_norms():
    x = jax.random.normal(jax.random.key(0), (3, 2, 5))
    a = jax.random.uniform(jax.random.key(1), (2, 5), minval=0.5, maxval=2.0)
    quad = lambda y: jnp.sum(a * y**2, axis=(1, 2))  # grad 2 a x
    np.testing.assert_allclose(
        adv.r1_exact(quad, x), jnp.sum((2 * a * x) ** 2, axis=(1, 2)), rtol=1e-5
    )
    w = jax.random.normal(jax.random.key(2), (10,))
    linear = lambda y: y.reshape(y.shape[0], -1) @ w  # grad w for every sample
    np.testing.assert_allclose(adv.r1_exact(linear, x), jnp.full((3,), jnp.sum(w**2)), rtol=1e-5)
    np.testing.assert_allclose(adv.r2_exact(linear, x), adv.r1_exact(linear, x))


def test_r1_exact_is_differentiable_wrt_closed_over_params():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    a = jnp.array([0.5, 1.0, 1.5, 2.0])
    # sum_i r1_i = sum 4 a^2 x^2, so d/da = 8 a sum_i x_i^2 (second-order through grad).
    penalty = lambda a: jnp.sum(adv.r1_exact(lambda y: jnp.sum(a * y**2, axis=1), x))
    np.testing.assert_allclose(jax.grad(penalty)(a), 8 * a * jnp.sum(x**2, axis=0), rtol=1e-5)


def test_r1_approx_definition_and_precomputed_logits():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    fn = lambda y: jnp.sum(jnp.sin(y), axis=1)
    rng, sigma = jax.random.key(7), 0.3
    eps = jax.random.normal(rng, x.shape, x.dtype)
    want = (fn(x) - fn(x + sigma * eps)) ** 2
    np.testing.assert_allclose(adv.r1_approx(fn, x, sigma, rng), want, rtol=1e-6)
    np.testing.assert_allclose(adv.r1_approx(fn, x, sigma, rng, logits=fn(x)), want, rtol=1e-6)
    np.testing.assert_allclose(adv.r2_approx(fn, x, sigma, rng), want, rtol=1e-6)


def test_gradient_penalty_linear_discriminator():
    w = jnp.array([3.0, 4.0])  # ||w|| = 5 everywhere, whatever the interpolate
    linear = lambda y: y @ w
    real = jax.random.normal(jax.random.key(0), (6, 2))
    fake = jax.random.normal(jax.random.key(1), (6, 2))
    gp = adv.gradient_penalty(linear, real, fake, jax.random.key(2))
    np.testing.assert_allclose(gp, jnp.full((6,), 16.0), rtol=1e-5)


def test_gradient_penalty_uses_per_sample_interpolates():
    # D(x) = 0.5 ||x||^2 has grad x, so ||grad D(x_mix)|| = 3 a: the penalty reveals
    # each sample's own a.
    quad = lambda y: 0.5 * jnp.sum(y**2, axis=1)
    real = jnp.ones((8, 1)) * 3.0
    fake = jnp.zeros((8, 1))
    gp = adv.gradient_penalty(quad, real, fake, jax.random.key(0))
    a = jax.random.uniform(jax.random.key(0), (8,))  # the documented draw
    np.testing.assert_allclose(gp, (3.0 * a - 1.0) ** 2, rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(np.asarray(gp), 5))) == 8


def test_matching_exact_weight():
    assert adv.matching_exact_weight(100.0, 0.01) == pytest.approx(0.01)
    assert adv.matching_exact_weight(1000.0, 0.1) == pytest.approx(10.0)


# -------------------------------------------------------------------------------- losses


def test_nonsaturating_losses_hand_values():
    real = jnp.array([0.0, 2.0, -1.0])
    fake = jnp.array([0.0, -3.0, 1.0])
    sp = lambda z: np.log1p(np.exp(z))
    np.testing.assert_allclose(
        adv.d_loss_nonsaturating(real, fake),
        [2 * np.log(2.0), sp(-2.0) + sp(-3.0), sp(1.0) + sp(1.0)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        adv.g_loss_nonsaturating(fake), [np.log(2.0), sp(3.0), sp(-1.0)], rtol=1e-6
    )
    # Large logits: softplus stays finite (no log(sigmoid) underflow).
    assert np.isfinite(np.asarray(adv.d_loss_nonsaturating(jnp.array([-100.0]), 100.0))).all()


def test_relativistic_and_wgan_losses_hand_values():
    real = jnp.array([1.0, -0.5])
    fake = jnp.array([0.0, 1.5])
    sp = lambda z: np.log1p(np.exp(z))
    # D: softplus(-(real - fake)) = softplus(fake - real).
    np.testing.assert_allclose(adv.d_loss_relativistic(real, fake), [sp(-1.0), sp(2.0)], rtol=1e-6)
    # G: softplus(-(fake - real)) = softplus(real - fake).
    np.testing.assert_allclose(adv.g_loss_relativistic(real, fake), [sp(1.0), sp(-2.0)], rtol=1e-6)
    np.testing.assert_allclose(adv.wgan_d_loss(real, fake), [-1.0, 2.0])
    np.testing.assert_allclose(adv.wgan_g_loss(fake), [-0.0, -1.5])


# ------------------------------------------------------------------------- discriminator


def test_default_head_layers():
    assert default_head_layers(36) == (15, 25, 35)
    assert default_head_layers(24) == (10, 16, 23)
    assert default_head_layers(4) == (1, 2, 3)
    assert default_head_layers(2) == (0, 1)
    assert default_head_layers(1) == (0,)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        default_head_layers(0)
    with pytest.raises(ValueError, match=r"head_layers has indices \[5\] outside \[0, num_layers="):
        APTDiscriminator(get_variant("test"), NUM_CLASSES, head_layers=(0, 5))


def test_discriminator_params_heads_and_backbone_tree(tiny):
    disc, boxed, params, teacher, _, _ = tiny
    assert disc.head_layers == (0, 1)
    assert set(params) == {"mmdit", "labels", "heads"}
    assert set(params["heads"]) == {"head_0", "head_1", "proj"}
    d = disc.config.inner_dim
    assert params["heads"]["head_0"]["query"].shape == (1, d)
    assert params["heads"]["proj"]["kernel"].shape == (2 * d, 1)
    # The backbone has exactly the generator's tree, so the teacher's params fit.
    shapes = lambda tree: jax.tree_util.tree_map(lambda p: (p.shape, p.dtype), tree)
    gen = _generator_shapes(disc.config)
    for name in ("mmdit", "labels"):
        assert shapes(params[name]) == shapes(gen[name])
    # Every parameter is boxed with logical axis names (sharding).
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert boxed["heads"]["head_0"]["to_q"]["kernel"].names == ("embed", "heads")
    assert boxed["mmdit"]["context_embedder"]["kernel"].names == ("context_in", "embed")


@pytest.mark.parametrize(
    "config, x_shape",
    [
        (get_variant("test", num_layers=4, scan_layers=True), (3, 8, 8, 4)),
        (
            get_variant(
                "digits-video",
                num_layers=2,
                num_attention_heads=2,
                attention_head_dim=16,
                caption_projection_dim=32,
            ),
            (3, 2, 12, 12, 1),
        ),
    ],
    ids=["scanned-layers", "video"],
)
def test_logits_shape_scanned_and_video(config, x_shape):
    """Shapes only (traced, not compiled): scanned blocks return stacked hidden states
    that the heads index; video tokens are flattened (f h w) like image tokens."""
    disc = APTDiscriminator(config, NUM_CLASSES)
    boxed = jax.eval_shape(lambda: disc.init_boxed(jax.random.key(0)))
    assert set(boxed["heads"]) == {f"head_{i}" for i in disc.head_layers} | {"proj"}
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    out = jax.eval_shape(
        lambda p, x: disc.noised_logits(p, x, jnp.zeros(x.shape[0], jnp.int32), jax.random.key(0)),
        nn.meta.unbox(boxed),
        x,
    )
    assert out.shape == (x_shape[0],) and out.dtype == jnp.float32


def test_init_from_teacher_copies_backbone(tiny):
    disc, _, params, teacher, _, _ = tiny
    for name in ("mmdit", "labels"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], teacher[name])
    other = _generator_shapes(disc.config.replace(num_layers=3))
    with pytest.raises(ValueError, match="same MMDiTConfig"):
        jax.eval_shape(lambda: disc.init_boxed(jax.random.key(0), teacher_params=other))


def test_logits_shape_and_no_batch_leakage(tiny, probe):
    _, _, _, _, x, _ = tiny
    rng = jax.random.key(3)
    out = probe(x, rng)[0]
    assert out.shape == (BATCH,) and out.dtype == jnp.float32
    out2 = probe(x.at[0].add(1.0), rng)[0]
    assert abs(float(out2[0] - out[0])) > 1e-4  # the perturbed D is input-sensitive
    # Other samples' logits do not see sample 0 (r1_exact's grad-of-sum needs this).
    np.testing.assert_allclose(out2[1:], out[1:], rtol=0, atol=1e-6)


def test_noised_logits_one_t_per_sample_and_deterministic(tiny, probe):
    _, _, _, _, x, _ = tiny
    rng = jax.random.key(3)
    noised, logits_of_xt, x_t, t, t12 = probe(x, rng)
    assert t.shape == (BATCH,) and len(np.unique(np.asarray(t))) == BATCH
    assert bool(jnp.all((t >= 0) & (t <= 1)))
    # x_t = (1 - t) x + t eps with eps independent of x.
    _, _, zero_t, _, _ = probe(jnp.zeros_like(x), rng)
    np.testing.assert_allclose(x_t - zero_t, (1 - t)[:, None, None, None] * x, atol=1e-5)
    # Shift > 1 moves every time towards noise, sample by sample.
    assert bool(jnp.all(t12 >= t))
    np.testing.assert_allclose(noised, logits_of_xt, rtol=1e-5)
    np.testing.assert_array_equal(noised, probe(x, rng)[0])
    assert not np.allclose(noised, probe(x, jax.random.key(4))[0])


def test_r1_approx_over_sigma_squared_approaches_r1_exact(tiny):
    disc, _, params, _, x, labels = tiny
    logits_fn = disc.logits_fn(params, labels, jax.random.key(3), attention_implementation="xla")
    sigma, draws = 1e-2, 1024
    keys = jax.random.split(jax.random.key(9), draws)

    @fast_jit
    def exact_approx_linear(x):
        exact = adv.r1_exact(logits_fn, x)
        logits, vjp = jax.vjp(logits_fn, x)
        grad = vjp(jnp.ones_like(logits))[0]  # per-sample input gradients

        def one(key):
            eps = jax.random.normal(key, x.shape, x.dtype)  # r1_approx's documented draw
            lin = jnp.sum((grad * eps).reshape(BATCH, -1), axis=1) ** 2
            return adv.r1_approx(logits_fn, x, sigma, key, logits=logits) / sigma**2, lin

        return exact, *jax.vmap(one)(keys)

    exact, approx, linear = exact_approx_linear(x)
    exact, approx_mean = np.asarray(exact), np.asarray(approx.mean(0))
    assert np.all(exact > 1e-3)
    # Same draws: only the Taylor remainder (O(sigma) relative per draw) differs: 1%.
    np.testing.assert_allclose(approx_mean, linear.mean(0), rtol=1e-2)
    # Against the exact value the Monte Carlo error dominates: (g.eps)^2 has relative
    # std sqrt(2), so a mean of 1024 draws has ~4.4% per sample and ~2.2% for the sum
    # over 4 samples; 15% and 8% are > 3 standard deviations (and the seeds are fixed).
    np.testing.assert_allclose(approx_mean, exact, rtol=0.15)
    np.testing.assert_allclose(approx_mean.sum(), exact.sum(), rtol=0.08)


@pytest.mark.slow  # heavy: compiles a float64 double backward through D and its heads
def test_exact_r1_d_loss_param_gradient_matches_finite_differences():
    """Double backward through the MMDiT + heads with XLA attention, in float64.

    MMDiTConfig accepts only float32/bf16/fp16 compute dtypes, so the config is
    edited in place (test-only) to run in float64. jax.nn.dot_product_attention
    still takes its softmax in float32, which sets a floor of ~1e-5 on the relative
    error of the finite differences; a 4-point stencil (truncation O(h^4)) at
    h = 1e-2 (direction and params both of scale 0.1) stays under it: 1e-4 tolerance.
    """
    with jax.enable_x64(True):
        cfg = get_variant("test")
        object.__setattr__(cfg, "dtype", "float64")
        object.__setattr__(cfg, "param_dtype", "float64")
        disc = APTDiscriminator(cfg, NUM_CLASSES)
        shapes = nn.meta.unbox(jax.eval_shape(lambda: disc.init_boxed(jax.random.key(0))))
        params = _random_params(shapes, 0, 0.1)
        direction = _random_params(shapes, 1, 0.1)
        assert params["mmdit"]["proj_out"]["kernel"].dtype == jnp.float64
        rng = np.random.default_rng(2)
        x_real = jnp.asarray(rng.standard_normal((2, 8, 8, 4)))
        x_fake = jnp.asarray(rng.standard_normal((2, 8, 8, 4)))
        labels = jnp.array([0, 2])

        def terms(p):
            """(mean non-saturating D loss, mean exact R1): the exact-R1 D loss's parts."""
            fn = disc.logits_fn(p, labels, jax.random.key(4), attention_implementation="xla")
            adv_term = jnp.mean(adv.d_loss_nonsaturating(fn(x_real), fn(x_fake)))
            return jnp.stack([adv_term, jnp.mean(adv.r1_exact(fn, x_real))])

        @fast_jit
        def value_and_directional(s):
            """terms at params + s * direction, and (reverse mode) each term's derivative
            along the direction."""
            p = jax.tree_util.tree_map(lambda a, v: a + s * v, params, direction)
            value, vjp = jax.vjp(terms, p)
            leaves = jax.tree_util.tree_leaves(direction)
            along = lambda g: sum(
                jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), leaves, strict=True)
            )
            # One batched backward pass for both terms (a smaller program than two).
            return value, jax.vmap(lambda c: along(vjp(c)[0]))(jnp.eye(2, dtype=value.dtype))

        value, analytic = value_and_directional(0.0)
        f = lambda s: value_and_directional(s)[0]
        h = 1e-2
        numeric = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
        assert value.dtype == jnp.float64 and np.all(np.abs(analytic) > 1e-3)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4)
        # The exact-R1 D loss, mean(softplus(-D(x)) + softplus(D(x_fake)) + gamma R1).
        gamma = 10.0
        np.testing.assert_allclose(
            analytic[0] + gamma * analytic[1], numeric[0] + gamma * numeric[1], rtol=1e-4
        )
