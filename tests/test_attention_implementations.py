"""Every entry of `ATTENTION_IMPLEMENTATIONS` means one kernel everywhere: in the MMDiT
backbone and in the APT discriminator's cross-attention heads, for D's logits, for
the exact R1 penalty (a gradient of a gradient) and for a whole APT train step.

The reference implementation is "xla_autodiff" (`jax.nn.dot_product_attention`'s
XLA kernel, differentiated by JAX). Entries this backend cannot run are skipped,
saying why. Kernel-level checks (values against NumPy, derivatives) live in
tests/test_attention.py.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.models import APTDiscriminator
from apt_jax.models.config import ATTENTION_IMPLEMENTATIONS, SECOND_ORDER_ATTENTION, get_variant
from apt_jax.models.discriminator import APTHeads
from apt_jax.models.layers import dot_product_attention
from apt_jax.objectives import adversarial as adv
from apt_jax.objectives.apt import APTLossSettings
from apt_jax.tasks import build_task
from apt_jax.train import sharding
from configs import digits_apt

REFERENCE = "xla_autodiff"
# The backend each kernel needs, for entries that do not run everywhere.
NEEDS_BACKEND = {"cudnn": "gpu"}
# cuDNN's fused attention takes fp16/bf16 inputs only.
COMPUTE_DTYPE = {"cudnn": "bfloat16"}
# Float32 kernels differ by summation order only (one transposes to heads-major
# and sums the softmax gradient over K instead of T): a few ulps per attention
# output. On D's O(1) logits the two differ by at most 6e-7 (five seeds
# measured); 1e-5 leaves a >10x margin. bf16 (cuDNN) keeps 8 mantissa bits,
# relative rounding 4e-3 per op through ~10 layers of the tiny net: 5e-2, not
# measured here (no GPU).
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}


def _skip_unless_runnable(implementation: str) -> None:
    backend = NEEDS_BACKEND.get(implementation)
    if backend is not None and jax.default_backend() != backend:
        pytest.skip(
            f"attention_implementation={implementation!r} is the fused cuDNN kernel of "
            f"jax.nn.dot_product_attention: it needs a {backend} backend, and this one is "
            f"{jax.default_backend()}."
        )


def _live(shapes, seed: int):
    """Random parameters of the tree of `jax.ShapeDtypeStruct`s `shapes`, every path
    live: no zero-initialised gate (adaLN, D's fresh output projection) hides the
    attention from the output. Kernels ~ N(0, 1 / fan_in), other leaves
    ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
        value = std * rng.standard_normal(leaf.shape) + (name == "scale")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _head_shapes(cfg, head_layers, hidden):
    """The `APTHeads` parameter tree (unboxed `jax.ShapeDtypeStruct`s) for `hidden`."""
    init = APTHeads(cfg, head_layers).init
    return jax.eval_shape(lambda: nn.meta.unbox(init(jax.random.key(0), hidden)))["params"]


def _discriminator(implementation: str = REFERENCE) -> APTDiscriminator:
    dtype = COMPUTE_DTYPE.get(implementation, "float32")
    cfg = get_variant(
        "digits-tiny", qk_norm="rms_norm", attention_implementation=implementation, dtype=dtype
    )
    return APTDiscriminator(cfg, num_classes=10)


@pytest.fixture(scope="module")
def d_inputs():
    """Live D parameters `{"mmdit", "labels", "heads"}`, inputs `(4, 8, 8, 1)`, labels `(4,)`."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_discriminator().init_boxed(jax.random.key(0))))
    params = _live(shapes, seed=1)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    labels = jnp.arange(4) % 10
    return params, x, labels


# ------------------------------------------------------------------- one dispatch
def test_every_entry_is_a_kernel_and_other_names_are_refused():
    q = jnp.ones((1, 1, 2, 8))
    kv = jnp.ones((1, 5, 2, 8))
    for implementation in ATTENTION_IMPLEMENTATIONS:
        try:
            attend = functools.partial(dot_product_attention, implementation=implementation)
            shape = jax.eval_shape(attend, q, kv, kv).shape
        except ValueError as e:  # an entry the dispatch does not know is a bug here
            assert "is unknown" not in str(e), e
        except RuntimeError:  # a kernel whose hardware is absent (cuDNN on CPU)
            assert implementation in NEEDS_BACKEND, implementation
        else:
            assert shape == q.shape, implementation
    with pytest.raises(ValueError, match=r"attention_implementation='flash' is unknown; use one"):
        dot_product_attention(q, kv, kv, "flash")


def test_exact_penalties_refuse_a_kernel_without_second_order_rules():
    with pytest.raises(ValueError, match="exact_attention='cudnn' has no second-order rule"):
        APTLossSettings(r1_mode="exact", exact_attention="cudnn")
    for implementation in SECOND_ORDER_ATTENTION:
        assert APTLossSettings(exact_attention=implementation).exact_attention == implementation


def test_heads_refuse_an_unknown_implementation():
    cfg = get_variant("digits-tiny")
    hidden = [jnp.zeros((1, 3, cfg.inner_dim))] * cfg.num_layers
    heads = APTHeads(cfg, (0, 1), attention_implementation="flash")
    with pytest.raises(ValueError, match=r"attention_implementation='flash' is unknown; use one"):
        jax.eval_shape(heads.init, jax.random.key(0), hidden)


def test_xla_in_the_heads_is_apt_jax_kernel_not_jax_nn():
    """ "xla" is apt_jax's custom-VJP kernel in the heads as in the backbone (it has no
    forward mode), "xla_autodiff" jax.nn's (it has); the heads used to pass the name
    straight to jax.nn, where "xla" is jax.nn's kernel and "xla_autodiff" unknown."""
    cfg = get_variant("digits-tiny")
    hidden = [jax.random.normal(jax.random.key(i), (2, 16, cfg.inner_dim)) for i in range(2)]
    params = _live(_head_shapes(cfg, (0, 1), hidden), seed=4)

    def logits(implementation, h0):
        heads = APTHeads(cfg, (0, 1), attention_implementation=implementation)
        return heads.apply({"params": params}, [h0, hidden[1]])

    jvp = jax.jit(lambda h: jax.jvp(lambda h: logits("xla_autodiff", h), (h,), (h,))[1])
    tangent = jvp(hidden[0])
    assert tangent.shape == (2,) and float(jnp.max(jnp.abs(tangent))) > 0
    with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\) to a custom_vjp function"):
        jax.jvp(lambda h: logits("xla", h), (hidden[0],), (hidden[0],))


# ---------------------------------------------------------------- D's logits and R1
@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
def test_discriminator_logits_match_the_reference(d_inputs, implementation):
    """The config's kernel reaches backbone and heads (no per-call override here)."""
    _skip_unless_runnable(implementation)
    params, x, labels = d_inputs
    t = jnp.linspace(0.1, 0.9, x.shape[0])
    want = jax.jit(_discriminator(REFERENCE).logits)(params, x, t, labels)
    disc = _discriminator(implementation)
    got = jax.jit(disc.logits)(params, x, t, labels)
    assert got.shape == (x.shape[0],) and got.dtype == jnp.float32
    assert float(jnp.std(want)) > 1e-2  # the samples' logits differ: not a constant
    tol = TOLERANCE[disc.config.dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_exact_r1_through_the_heads_matches_the_reference():
    """`r1_exact` of the heads and its gradient w.r.t. their params (the double
    backward of D's exact update): "xla" (a custom VJP whose backward is plain JAX,
    so differentiable again) against jax.nn's autodiff. The backbone's double
    backward is checked in tests/test_models.py. "cudnn" has no second-order rule;
    exact penalties run D with `APTLossSettings.exact_attention` instead."""
    cfg = get_variant("digits-tiny", qk_norm="rms_norm")
    x = jax.random.normal(jax.random.key(5), (4, 16, cfg.inner_dim))  # tokens (B, N, D)
    params = _live(_head_shapes(cfg, (0,), [x]), seed=6)

    @functools.partial(jax.jit, static_argnums=1)
    def r1_and_grad(p, implementation):
        heads = APTHeads(cfg, (0,), attention_implementation=implementation)

        def mean_r1(p):
            return jnp.mean(adv.r1_exact(lambda y: heads.apply({"params": p}, [y]), x))

        return jax.value_and_grad(mean_r1)(p)

    got_r1, got_grad = r1_and_grad(params, "xla")
    want_r1, want_grad = r1_and_grad(params, REFERENCE)
    assert float(want_r1) > 1e-3
    np.testing.assert_allclose(got_r1, want_r1, rtol=1e-5)
    # The query kernels get R1's gradient only through d attention / d x: the
    # check reaches the attention's second derivative.
    assert float(jnp.max(jnp.abs(want_grad["head_0"]["to_q"]["kernel"]))) > 1e-6
    flat_got = jax.tree_util.tree_leaves_with_path(got_grad)
    for (path, a), b in zip(flat_got, jax.tree.leaves(want_grad), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-6)
        np.testing.assert_allclose(a, b, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------- APT step
@pytest.fixture(scope="module")
def apt_step(teacher_dir):
    """`(implementation, r1_mode) -> metrics` of one tiny APT step, memoised.

    Every task starts from one state (the tiny SFT run as teacher and generator)
    and takes the same batch and key, so the metrics differ by the kernel only.
    """
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    tasks, metrics = {}, {}

    def task(implementation, r1_mode):
        if (implementation, r1_mode) not in tasks:
            c = digits_apt.get_config("tiny")
            c.teacher_workdir = c.generator_workdir = teacher_dir
            c.r1_mode = r1_mode
            c.model.attention_implementation = implementation
            c.model.dtype = COMPUTE_DTYPE.get(implementation, "float32")
            tasks[implementation, r1_mode] = build_task(c, mesh)
        return tasks[implementation, r1_mode]

    first = task(REFERENCE, "approx")
    state = first.init_state(jax.random.key(0))
    batch = sharding.make_global_batch(next(first.make_iterator()), mesh)

    def run(implementation, r1_mode):
        if (implementation, r1_mode) not in metrics:
            fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
            _, m = task(implementation, r1_mode).train_step(fresh, batch, jax.random.key(7))
            metrics[implementation, r1_mode] = jax.tree.map(float, m)
            tasks.pop((implementation, r1_mode))  # its compiled step is not needed again
        return metrics[implementation, r1_mode]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("r1_mode", ["approx", "exact"])
@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
def test_apt_step_runs(apt_step, implementation, r1_mode):
    _skip_unless_runnable(implementation)
    metrics = apt_step(implementation, r1_mode)
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    assert not bad, f"non-finite metrics with {implementation}, r1_mode={r1_mode}: {bad}"
    assert metrics["r1"] > 0 and metrics["d_grad_norm"] > 0 and metrics["g_grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("r1_mode", ["approx", "exact"])
def test_apt_step_metrics_agree_between_xla_and_xla_autodiff(apt_step, r1_mode):
    """One step's metrics agree to float32 rounding (measured: at most 4e-7 relative,
    so rtol 1e-5), except the approximate R1, a mean of squared differences
    d_i = D(x_i) - D(x_i + sigma eps_i) ~ 1e-3 of O(1) logits: cancellation makes
    its relative error ~1e-4 (measured 6e-5). Its absolute error is bounded by the
    logits': |d r1| <= 2 mean|d_i| * 2 |d logit| <= 4 sqrt(r1) |d logit|, with
    |d logit| <= 1e-6 (6e-7 measured in the logits test above)."""
    got, want = apt_step("xla", r1_mode), apt_step("xla_autodiff", r1_mode)
    assert got.keys() == want.keys()
    for key in want:
        atol = 4e-6 * np.sqrt(want["r1"]) if key == "r1" else 0.0
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=atol, err_msg=key)
