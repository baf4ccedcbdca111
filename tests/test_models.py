"""The MMDiT and its helpers: shapes, layouts, numerics against hand-written
references, input validation, logical axes and sharding.

Everything runs on tiny configs (variant "test": 2 layers, D = 32) so the file
stays fast on CPU; parameters are shared through module-scoped fixtures and
jitted forwards are cached per (config, call options).
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from apt_jax.models import (
    RELEASED_PARAMETER_COUNTS,
    LabelEmbedder,
    MMDiT,
    MMDiTConfig,
    abstract_params,
    axes,
    dummy_inputs,
    get_variant,
    init_params,
    param_count,
    stack_layers,
    unstack_layers,
)
from apt_jax.models.embeddings import (
    sd3_pos_table,
    spatial_positions,
    temporal_positions,
    timestep_embedding,
)

# --------------------------------------------------------------------------- helpers
# XLA's CPU compile time dominates this file, so: parameters and inputs are drawn
# with numpy (no PRNG programs to compile), jitted programs are cached per
# (config, call options) and tests share configs and input shapes. LLVM at -O0
# with XLA's older fusion emitters compiles these programs ~5x faster; the HLO
# program (what these tests are about) is the same. Options the installed jaxlib
# does not know are dropped rather than failing the file.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _supported_compiler_options(options):
    supported = {}
    for key, value in options.items():
        try:
            jax.jit(lambda a: a + 1).lower(1.0).compile(compiler_options={key: value})
        except Exception:  # an option this jaxlib does not have
            continue
        supported[key] = value
    return supported


jit = functools.partial(jax.jit, compiler_options=_supported_compiler_options(_FAST_COMPILE))


@functools.cache
def shapes_of(cfg: MMDiTConfig):
    """`abstract_params(cfg)`, cached: tracing the model's init is not free."""
    return abstract_params(cfg)


@functools.cache
def forward(cfg: MMDiTConfig, **call_kwargs):
    """Jitted `(params, x, t, context, pooled) -> v`, cached per config and options."""
    model = MMDiT(cfg)
    return jit(lambda p, x, t, c, pl: model.apply({"params": p}, x, t, c, pl, **call_kwargs))


def make_inputs(cfg, seed, *, batch=4, hw=(8, 6), frames=None, ctx_len=3):
    """Random `(x, t, context, pooled)`; the defaults are the shared "standard" shapes."""
    rng = np.random.default_rng(seed)
    lead = (batch, frames) if frames else (batch,)
    x = rng.standard_normal((*lead, *hw, cfg.in_channels))
    t = rng.uniform(size=(batch,))
    c = rng.standard_normal((batch, ctx_len, cfg.joint_attention_dim))
    pl = rng.standard_normal((batch, cfg.pooled_projection_dim))
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, t, c, pl))


def live_params(cfg, seed=0):
    """Random parameters of the unrolled layout, every path live (no zero gates).

    Kernels ~ N(0, 1 / fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
    """
    assert not cfg.scan_layers, "build unrolled params and convert with stack_layers"
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes_of(cfg))


def perturb(params, seed, scale=0.1):
    """Adds Gaussian noise to every leaf (so zero-initialised paths become live)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), a.dtype),
        params,
    )


def as64(a):
    return np.asarray(a).astype(np.float64)


def max_abs(a):
    return float(np.max(np.abs(as64(a))))


def max_abs_diff(a, b):
    return float(np.max(np.abs(as64(a) - as64(b))))


def tree_max_abs_diff(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        max_abs_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tree_max_abs(a):
    return max(max_abs(x) for x in jax.tree.leaves(a))


# Five blocks; dual attention in 0, 1, 3 gives scanned runs [0, 2) dual, [2, 3)
# plain, [3, 4) dual, and the unrolled context-pre-only block 4.
DUAL_CFG = get_variant("test", num_layers=5, dual_attention_layers=(0, 1, 3), qk_norm="rms_norm")
DEEP_CFG = get_variant("test", num_layers=4)


@pytest.fixture(scope="module")
def tiny_cfg():
    return get_variant("test")


@pytest.fixture(scope="module")
def tiny_params(tiny_cfg):
    return live_params(tiny_cfg)


@pytest.fixture(scope="module")
def std_inputs(tiny_cfg):
    """The standard shapes: batch 4, 8x6 latents (4x3 patches), 3 context tokens."""
    return make_inputs(tiny_cfg, 100)


@pytest.fixture(scope="module")
def std_output(tiny_cfg, tiny_params, std_inputs):
    return forward(tiny_cfg)(tiny_params, *std_inputs)


# --------------------------------------------------------------------------- 1. shapes

SHAPE_CASES = {
    # name: (config overrides, latent h x w, frames, context length)
    "image-p2-8x6-L1": (dict(), (8, 6), None, 1),
    "image-p1-6x8-L13": (dict(patch_size=1), (6, 8), None, 13),
    "image-p2-no-table-6x10-L2": (dict(pos_embed_max_size=None), (6, 10), None, 2),
    "video-pt1-F3-8x6-L4": (dict(patch_size_t=1), (8, 6), 3, 4),
    "video-pt2-p1-F4-4x6-L7": (dict(patch_size_t=2, patch_size=1), (4, 6), 4, 7),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES), ids=list(SHAPE_CASES))
def test_output_shape_and_dtype(case):
    overrides, hw, frames, ctx_len = SHAPE_CASES[case]
    cfg = get_variant("test", **overrides)
    params = live_params(cfg)
    x, t, c, pl = make_inputs(cfg, 1, batch=2, hw=hw, frames=frames, ctx_len=ctx_len)
    if frames:  # the second temporal patch repeats the first
        pt = cfg.patch_size_t
        x = np.array(x)
        x[:, pt : 2 * pt] = x[:, :pt]
        x = jnp.asarray(x)
    v = forward(cfg)(params, x, t, c, pl)
    assert v.shape == x.shape
    assert v.dtype == jnp.float32
    v = np.asarray(v)
    assert np.isfinite(v).all()
    assert max_abs(v) > 1e-2  # a live model, not an all-zero output
    if frames:  # identical content at another time step gets another velocity
        pt = cfg.patch_size_t
        assert max_abs_diff(v[:, :pt], v[:, pt : 2 * pt]) > 1e-3


# --------------------------------------------------------------------------- 2. layouts


@pytest.fixture(scope="module")
def dual_outputs():
    """DUAL_CFG (velocity, hidden states), unrolled and scanned, same weights."""
    params = live_params(DUAL_CFG, seed=3)
    scan_cfg = DUAL_CFG.replace(scan_layers=True)
    inputs = make_inputs(DUAL_CFG, 7, batch=2)
    unrolled = forward(DUAL_CFG, return_hidden_states=True)(params, *inputs)
    scanned = forward(scan_cfg, return_hidden_states=True)(stack_layers(params, scan_cfg), *inputs)
    return unrolled, scanned


def test_scan_matches_unrolled_dual_runs(dual_outputs):
    (v_unrolled, _), (v_scan, _) = dual_outputs
    assert max_abs(v_unrolled) > 1e-2
    assert max_abs_diff(v_scan, v_unrolled) < 1e-5


@pytest.mark.parametrize("cfg", [DEEP_CFG, DUAL_CFG], ids=["4-layers", "5-layers-dual-013-rms"])
def test_scan_layout_structure(cfg):
    scan_cfg = cfg.replace(scan_layers=True)
    unrolled = shapes_of(cfg)
    scanned = shapes_of(scan_cfg)
    stacked = stack_layers(unrolled, scan_cfg)
    assert jax.tree.structure(scanned) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(stacked), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert param_count(scanned) == param_count(unrolled)
    back = unstack_layers(scanned, scan_cfg)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    blocks = {k for k in scanned if k.startswith("transformer_blocks")}
    if cfg is DUAL_CFG:
        assert blocks == {
            "transformer_blocks_0_2",
            "transformer_blocks_2_3",
            "transformer_blocks_3_4",
            "transformer_blocks_4",
        }
        assert "attn2" in scanned["transformer_blocks_0_2"]
        assert "attn2" in scanned["transformer_blocks_3_4"]
        assert "attn2" not in scanned["transformer_blocks_2_3"]
        assert "norm_q" in scanned["transformer_blocks_0_2"]["attn2"]
        assert scanned["transformer_blocks_0_2"]["norm1"]["linear"]["kernel"].shape == (2, 32, 288)
    else:
        assert blocks == {"transformer_blocks_0_3", "transformer_blocks_3"}
        assert scanned["transformer_blocks_0_3"]["ff"]["fc_in"]["kernel"].shape == (3, 32, 128)


def test_stack_unstack_roundtrip():
    cfg, scan_cfg = DEEP_CFG, DEEP_CFG.replace(scan_layers=True)
    params = live_params(cfg, seed=11)
    stacked = jit(lambda p: stack_layers(p, scan_cfg))(params)
    back = jit(lambda p: unstack_layers(p, scan_cfg))(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Stacked layer k is block k.
    stacked_q = np.asarray(stacked["transformer_blocks_0_3"]["attn"]["to_q"]["kernel"])
    for k in range(3):
        q = params[f"transformer_blocks_{k}"]["attn"]["to_q"]["kernel"]
        np.testing.assert_array_equal(stacked_q[k], np.asarray(q))
    with pytest.raises(ValueError, match="already scanned"):
        stack_layers(stacked, scan_cfg)
    with pytest.raises(ValueError, match="already unrolled"):
        unstack_layers(params, scan_cfg)


# Two blocks: a scanned run [0, 1) and the (unrolled) final block, both remat'd.
REMAT_CFG = get_variant("test", num_layers=2)


@functools.cache
def _value_and_param_grad(cfg):
    model = MMDiT(cfg)

    def loss(p, inputs, w):
        v = model.apply({"params": p}, *inputs)
        return jnp.sum(v * w), v

    return jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def remat_reference():
    """Scanned, no remat: velocity, loss and parameter gradient."""
    cfg = REMAT_CFG.replace(scan_layers=True)
    params = stack_layers(live_params(REMAT_CFG, seed=5), cfg)
    inputs = make_inputs(REMAT_CFG, 5, batch=2, hw=(4, 6))
    w = jnp.asarray(np.random.default_rng(6).standard_normal(inputs[0].shape), jnp.float32)
    (loss, v), grad = _value_and_param_grad(cfg)(params, inputs, w)
    return params, inputs, w, (loss, v, grad)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_matches_no_remat(remat_reference, policy):
    params, inputs, w, (ref_loss, ref_v, ref_grad) = remat_reference
    cfg = REMAT_CFG.replace(scan_layers=True, remat_policy=policy)
    (loss, v), grad = _value_and_param_grad(cfg)(params, inputs, w)
    assert max_abs(ref_v) > 1e-2
    assert max_abs_diff(v, ref_v) < 1e-5
    assert abs(float(loss) - float(ref_loss)) < 1e-4 * max(1.0, abs(float(ref_loss)))
    scale = tree_max_abs(ref_grad)
    assert scale > 1e-2
    assert tree_max_abs_diff(grad, ref_grad) < 1e-5 * max(1.0, scale)


def test_bf16_compute_close_to_fp32(tiny_cfg, tiny_params, std_inputs, std_output):
    v16 = forward(tiny_cfg.replace(dtype="bfloat16"))(tiny_params, *std_inputs)
    assert v16.dtype == jnp.float32  # the velocity comes back in fp32
    assert np.isfinite(np.asarray(v16)).all()
    err, scale = max_abs_diff(v16, std_output), max_abs(std_output)
    print(f"bf16 compute: max |v_bf16 - v_fp32| = {err:.3g}, max |v_fp32| = {scale:.3g}")
    assert err < 0.05 * scale
    assert err > 0.0  # it really computed in bf16


def test_bf16_param_storage(tiny_cfg, std_inputs):
    cfg = tiny_cfg.replace(param_dtype="bfloat16")
    assert {str(a.dtype) for a in jax.tree.leaves(shapes_of(cfg))} == {"bfloat16"}
    # The velocity still comes back in fp32 (shapes only: no compile needed).
    args = [_shape(a.shape) for a in std_inputs]
    v = jax.eval_shape(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a), shapes_of(cfg), *args)
    assert v.shape == std_inputs[0].shape and v.dtype == jnp.float32


# --------------------------------------------------------------------------- 3. zero init

ZERO_INIT_SUFFIXES = (
    ("norm1", "linear"),
    ("norm1_context", "linear"),
    ("norm_out", "linear"),
    ("proj_out",),
)


def _is_zero_init(path):
    return any(path[-1 - len(s) : -1] == s for s in ZERO_INIT_SUFFIXES)


@pytest.fixture(scope="module")
def fresh_params(tiny_cfg):
    # An "rbg" key: threefry's XLA program is slow to compile on CPU.
    return jit(init_params, static_argnums=0)(tiny_cfg, jax.random.key(0, impl="rbg"))


def test_fresh_model_outputs_exactly_zero(tiny_cfg, fresh_params, std_inputs):
    v = forward(tiny_cfg)(fresh_params, *std_inputs)
    np.testing.assert_array_equal(np.asarray(v), 0.0)
    assert max_abs(forward(tiny_cfg)(perturb(fresh_params, 2), *std_inputs)) > 1e-2
    # The same weights as a one-frame video model: also exactly zero.
    video_cfg = tiny_cfg.replace(patch_size_t=1)
    x, t, c, pl = std_inputs
    clip = jnp.asarray(np.asarray(x)[:, None])
    v_clip = forward(video_cfg)(_video_params_from_image(fresh_params), clip, t, c, pl)
    np.testing.assert_array_equal(np.asarray(v_clip), 0.0)


def test_zero_initialised_leaves(tiny_cfg, fresh_params):
    flat = flatten_dict(fresh_params)
    zero_paths = [p for p in flat if _is_zero_init(p)]
    # norm1 + norm1_context per block (kernel, bias), norm_out, proj_out.
    assert len(zero_paths) == 2 * (2 * tiny_cfg.num_layers + 2)
    for path in zero_paths:
        np.testing.assert_array_equal(np.asarray(flat[path]), 0.0, err_msg=str(path))
    # Every other kernel is randomly initialised.
    for path, leaf in flat.items():
        if path[-1] == "kernel" and not _is_zero_init(path):
            assert float(np.std(np.asarray(leaf))) > 1e-3, path
    # Modulation widths: 6 chunks per block, (scale, shift) for the last
    # block's context and for the final norm; 9 chunks in a dual block.
    d = tiny_cfg.inner_dim
    assert flat[("transformer_blocks_0", "norm1", "linear", "kernel")].shape == (d, 6 * d)
    assert flat[("transformer_blocks_0", "norm1_context", "linear", "kernel")].shape == (d, 6 * d)
    assert flat[("transformer_blocks_1", "norm1_context", "linear", "kernel")].shape == (d, 2 * d)
    assert flat[("norm_out", "linear", "kernel")].shape == (d, 2 * d)
    assert ("transformer_blocks_1", "attn", "to_add_out", "kernel") not in flat
    assert ("transformer_blocks_1", "ff_context", "fc_in", "kernel") not in flat
    dual = flatten_dict(shapes_of(DUAL_CFG))
    assert dual[("transformer_blocks_0", "norm1", "linear", "kernel")].shape == (d, 9 * d)
    assert dual[("transformer_blocks_2", "norm1", "linear", "kernel")].shape == (d, 6 * d)


# --------------------------------------------------------------------------- 4. batch


@pytest.mark.parametrize("field", ["x", "t", "context", "pooled"])
def test_no_leakage_across_batch(tiny_cfg, tiny_params, std_inputs, std_output, field):
    idx = ["x", "t", "context", "pooled"].index(field)
    changed = [np.array(a) for a in std_inputs]
    if field == "t":
        changed[idx][0] = 1.0 - changed[idx][0]
    else:
        changed[idx][0] = np.random.default_rng(99).standard_normal(changed[idx].shape[1:])
    v2 = forward(tiny_cfg)(tiny_params, *[jnp.asarray(a) for a in changed])
    assert max_abs_diff(v2[1:], std_output[1:]) <= 1e-6
    assert max_abs_diff(v2[0], std_output[0]) > 1e-3


# --------------------------------------------------------------------------- 5. R1 grad-of-grad


def test_double_backward_matches_finite_differences():
    # "cudnn" in the config, "xla" per call: what exact R1 does on a GPU setup.
    # One (context-pre-only) block keeps the grad-of-grad program small.
    cfg = get_variant("test", num_layers=1, qk_norm="rms_norm", attention_implementation="cudnn")
    model = MMDiT(cfg)
    params = live_params(cfg, seed=21)
    x, t, c, pl = make_inputs(cfg, 22, batch=2, hw=(4, 4))
    rng = np.random.default_rng(23)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def r1(p):
        def scalar(xx):
            v = model.apply({"params": p}, xx, t, c, pl, attention_implementation="xla")
            return jnp.sum(v * w)

        return jnp.sum(jnp.square(jax.grad(scalar)(x)))

    value_and_grad = jit(jax.value_and_grad(r1))  # one compile serves both FD and AD
    _, grad = value_and_grad(params)
    u = jax.tree.map(lambda a: rng.standard_normal(a.shape), params)
    analytic = sum(
        float(np.vdot(as64(g), d))
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(u), strict=True)
    )

    def shifted(eps):
        return jax.tree.map(lambda p, d: jnp.asarray(as64(p) + eps * d, jnp.float32), params, u)

    eps = 1e-3
    plus, minus = value_and_grad(shifted(eps))[0], value_and_grad(shifted(-eps))[0]
    numeric = (float(plus) - float(minus)) / (2 * eps)
    print(f"R1 directional derivative: grad-of-grad {analytic:.6g}, central FD {numeric:.6g}")
    assert abs(analytic) > 1e-1
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic)
    # R1 reaches the attention's query kernels only through d attention / d x.
    assert max_abs(grad["transformer_blocks_0"]["attn"]["to_q"]["kernel"]) > 0.0


# --------------------------------------------------------------------------- 6. per-call override


def test_attention_override_per_call(tiny_cfg, tiny_params, std_inputs, std_output):
    cudnn_cfg = tiny_cfg.replace(attention_implementation="cudnn")
    v = forward(cudnn_cfg, attention_implementation="xla")(tiny_params, *std_inputs)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(std_output))


def test_attention_kernels_agree_in_values_and_parameter_gradients(
    tiny_cfg, tiny_params, std_inputs, std_output
):
    """apt_jax's kernel ("xla", hand-written backward) against jax.nn's autodiff."""
    v = forward(tiny_cfg, attention_implementation="xla_autodiff")(tiny_params, *std_inputs)
    np.testing.assert_allclose(np.asarray(v), np.asarray(std_output), atol=1e-5)
    model = MMDiT(tiny_cfg)

    def grads(impl):
        loss = lambda p: jnp.sum(  # noqa: E731
            jnp.square(model.apply({"params": p}, *std_inputs, attention_implementation=impl))
        )
        return jit(jax.grad(loss))(tiny_params)

    got, want = flatten_dict(grads("xla")), flatten_dict(grads("xla_autodiff"))
    assert got.keys() == want.keys()
    for key in want:
        scale = max(float(jnp.max(jnp.abs(want[key]))), 1e-3)
        np.testing.assert_allclose(got[key], want[key], atol=1e-5 * scale, err_msg=str(key))


# --------------------------------------------------------------------------- 7. validation

# name: (config overrides, the part of the message that names the problem)
CONFIG_ERRORS = {
    "dual-beyond-num-layers": (
        dict(num_layers=2, dual_attention_layers=(0, 2)),
        r"dual_attention_layers has indices \[2\] outside \[0, num_layers=2\)",
    ),
    "dual-negative": (
        dict(dual_attention_layers=(-1,)),
        r"dual_attention_layers has indices \[-1\] outside",
    ),
    "qk-norm": (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is unknown"),
    "attention-impl": (
        dict(attention_implementation="flash"),
        "attention_implementation='flash' is unknown",
    ),
    "caption-dim": (
        dict(caption_projection_dim=48),
        r"caption_projection_dim=48 must equal num_attention_heads \* attention_head_dim = 32",
    ),
    "remat-policy": (dict(remat_policy="everything"), "remat_policy='everything' is unknown"),
    "dtype": (dict(dtype="float64"), "dtype='float64' is unknown"),
    "patch-size-t": (dict(patch_size_t=0), "patch_size_t must be a positive int .*got 0"),
    "num-layers": (dict(num_layers=0), "num_layers must be a positive int, got 0"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS), ids=list(CONFIG_ERRORS))
def test_bad_config_raises(case):
    overrides, message = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        get_variant("test", **overrides)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="Unknown MMDiT variant 'sd4-ultra'; choose one of"):
        get_variant("sd4-ultra")


def _shape(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# name: (config overrides, x shape, context width, pooled width, t shape, call kwargs,
#        the part of the message that names the problem)
INPUT_ERRORS = {
    "not-divisible-by-patch": (
        dict(),
        (1, 7, 8, 4),
        24,
        20,
        (1,),
        {},
        "Latent size 7x8 is not divisible by patch_size=2",
    ),
    "larger-than-table": (
        dict(),
        (1, 18, 8, 4),
        24,
        20,
        (1,),
        {},
        r"larger than the position table \(pos_embed_max_size=8\)",
    ),
    "video-to-image-config": (
        dict(),
        (1, 2, 8, 8, 4),
        24,
        20,
        (1,),
        {},
        "this MMDiTConfig is image-only: set patch_size_t",
    ),
    "frames-not-divisible": (
        dict(patch_size_t=2),
        (1, 3, 8, 8, 4),
        24,
        20,
        (1,),
        {},
        "Video has 3 frames, not divisible by patch_size_t=2",
    ),
    "image-to-pt2-config": (
        dict(patch_size_t=2),
        (1, 8, 8, 4),
        24,
        20,
        (1,),
        {},
        r"Got image latents \(1, 8, 8, 4\) for a video config with patch_size_t=2",
    ),
    "channels": (
        dict(),
        (1, 8, 8, 3),
        24,
        20,
        (1,),
        {},
        "Latents have 3 channels .* but in_channels=4",
    ),
    "context-width": (
        dict(),
        (1, 8, 8, 4),
        23,
        20,
        (1,),
        {},
        "context width 23 != joint_attention_dim=24",
    ),
    "pooled-width": (
        dict(),
        (1, 8, 8, 4),
        24,
        21,
        (1,),
        {},
        r"pooled must be \(B=1, pooled_projection_dim=20\), got \(1, 21\)",
    ),
    "t-shape": (
        dict(),
        (1, 8, 8, 4),
        24,
        20,
        (1, 1),
        {},
        r"t must have shape \(B,\)=\(1,\), got \(1, 1\)",
    ),
    "per-call-attention": (
        dict(),
        (1, 8, 8, 4),
        24,
        20,
        (1,),
        dict(attention_implementation="flash"),
        "attention_implementation='flash' is unknown",
    ),
}


@pytest.mark.parametrize("case", list(INPUT_ERRORS), ids=list(INPUT_ERRORS))
def test_bad_input_raises_before_tracing(case):
    overrides, x_shape, ctx_w, pooled_w, t_shape, kwargs, message = INPUT_ERRORS[case]
    cfg = get_variant("test", **overrides)
    b = x_shape[0]
    args = (_shape(x_shape), _shape(t_shape), _shape((b, 3, ctx_w)), _shape((b, pooled_w)))
    # Abstract parameters and inputs: the check must fire in Python, before any
    # parameter is created or any computation is traced.
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda *a: MMDiT(cfg).init(jax.random.key(0), *a, **kwargs), *args)
    params = shapes_of(cfg)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a, **kwargs), params, *args)
    if not kwargs:
        with pytest.raises(ValueError, match=message):
            cfg.check_inputs(x_shape, t_shape, (b, 3, ctx_w), (b, pooled_w))


# --------------------------------------------------------------------------- 8. embeddings
# Independent re-implementation of diffusers' SD3 position table
# (`get_2d_sincos_pos_embed` with np output, then `PatchEmbed.cropped_pos_embed`).


def _ref_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _ref_2d(embed_dim, grid_size, base_size, interpolation_scale=1.0):
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    grid_h = np.arange(grid_size[0], dtype=np.float32) / (grid_size[0] / base_size)
    grid_h = grid_h / interpolation_scale
    grid_w = np.arange(grid_size[1], dtype=np.float32) / (grid_size[1] / base_size)
    grid_w = grid_w / interpolation_scale
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size[1], grid_size[0]])
    emb_h = _ref_1d(embed_dim // 2, grid[0])
    emb_w = _ref_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)  # (gh * gw, D)


def _ref_cropped(embed_dim, sample_size, patch_size, max_size, height, width):
    """diffusers `PatchEmbed(height=width=sample_size, pos_embed_max_size=max)`,
    `cropped_pos_embed(height, width)` for latents of `height x width`."""
    base_size = sample_size // patch_size
    table = _ref_2d(embed_dim, max_size, base_size)[None]  # (1, max^2, D)
    h, w = height // patch_size, width // patch_size
    top, left = (max_size - h) // 2, (max_size - w) // 2
    spatial = table.reshape(1, max_size, max_size, -1)[:, top : top + h, left : left + w, :]
    return spatial.reshape(1, -1, spatial.shape[-1])[0]


POS_CASES = [
    # (embed_dim, sample_size, patch_size, max_size, latent height, latent width)
    (32, 8, 2, 8, 8, 8),
    (32, 8, 2, 8, 8, 6),
    (32, 8, 1, 8, 5, 8),
    (64, 32, 2, 24, 14, 30),
    (1536, 128, 2, 40, 64, 48),  # SD3's width, a smaller table
]


@pytest.mark.parametrize("case", POS_CASES, ids=[str(c) for c in POS_CASES])
def test_spatial_positions_match_diffusers_formula(case):
    d, sample, p, m, hh, ww = case
    got = spatial_positions(d, hh // p, ww // p, sample_size=sample, patch_size=p, max_size=m)
    assert got.shape == (hh // p, ww // p, d) and got.dtype == np.float32
    ref = _ref_cropped(d, sample, p, m, hh, ww)
    np.testing.assert_allclose(got.reshape(-1, d), ref, rtol=0, atol=2e-7)
    full = sd3_pos_table(d, m, m, sample // p)
    np.testing.assert_allclose(full.reshape(-1, d), _ref_2d(d, m, sample // p), rtol=0, atol=2e-7)


def test_spatial_positions_without_table_non_square():
    d, sample, p = 32, 8, 2
    got = spatial_positions(d, 3, 5, sample_size=sample, patch_size=p, max_size=None)
    ref = _ref_2d(d, (3, 5), sample // p)
    np.testing.assert_allclose(got.reshape(-1, d), ref, rtol=0, atol=2e-7)


def test_positions_match_diffusers_itself():
    torch = pytest.importorskip("torch")
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    d, sample, p, m = 64, 32, 2, 24
    patch = diffusers_embeddings.PatchEmbed(
        height=sample,
        width=sample,
        patch_size=p,
        in_channels=4,
        embed_dim=d,
        pos_embed_max_size=m,
    )
    for hh, ww in [(32, 32), (14, 30), (48, 20)]:
        ref = patch.cropped_pos_embed(hh, ww).detach().cpu().numpy()[0]
        got = spatial_positions(d, hh // p, ww // p, sample_size=sample, patch_size=p, max_size=m)
        np.testing.assert_allclose(got.reshape(-1, d), ref, rtol=0, atol=2e-7)
    buffer = patch.pos_embed.detach().cpu().numpy()[0]
    np.testing.assert_allclose(
        sd3_pos_table(d, m, m, sample // p).reshape(-1, d), buffer, atol=2e-7
    )

    t = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    timesteps = diffusers_embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    ref_t = timesteps(torch.from_numpy(1000.0 * t)).numpy()
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t))), ref_t, atol=2e-4)


def test_timestep_embedding_formula():
    t = np.array([0.0, 0.001, 0.3, 0.75, 1.0], np.float32)
    got = np.asarray(timestep_embedding(jnp.asarray(t)))
    half = 128
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    args = 1000.0 * t.astype(np.float64)[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=-1)  # cos first
    assert got.shape == (5, 256) and got.dtype == np.float32
    # fp32 arguments up to 1000: absolute error ~ 1000 * 2^-24 in the phase.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got[0, :128], 1.0)
    np.testing.assert_array_equal(got[0, 128:], 0.0)


def test_temporal_positions():
    d = 32
    pos = temporal_positions(d, 5)
    assert pos.shape == (5, d) and pos.dtype == np.float32
    np.testing.assert_array_equal(pos[0], 0.0)
    frames = np.arange(5, dtype=np.float64)
    ref = _ref_1d(d, frames) - _ref_1d(d, np.zeros(1))
    np.testing.assert_allclose(pos, ref, atol=1e-6)
    for i in range(1, 5):
        assert np.abs(pos[i]).max() > 1e-3
        assert np.abs(pos[i] - pos[i - 1]).max() > 1e-3


def _video_params_from_image(params):
    """Image weights as a patch_size_t=1 video model: kernel (p, p, C, D) -> (1, p, p, C, D)."""
    kernel = jnp.asarray(np.asarray(params["pos_embed"]["kernel"])[None])
    return dict(params, pos_embed=dict(params["pos_embed"], kernel=kernel))


def test_one_frame_video_equals_image_path(tiny_cfg, tiny_params, std_inputs, std_output):
    video_cfg = tiny_cfg.replace(patch_size_t=1)
    assert shapes_of(video_cfg)["pos_embed"]["kernel"].shape == (1, 2, 2, 4, 32)
    video_params = _video_params_from_image(tiny_params)
    x, t, c, pl = std_inputs
    clip = jnp.asarray(np.asarray(x)[:, None])
    v_clip = forward(video_cfg)(video_params, clip, t, c, pl)
    assert v_clip.shape == (4, 1, 8, 6, 4)
    assert max_abs_diff(np.asarray(v_clip)[:, 0], std_output) <= 1e-6
    # Images through the video config take the same path.
    assert max_abs_diff(forward(video_cfg)(video_params, x, t, c, pl), std_output) <= 1e-6
    # And back: a video model's kernel reshaped to (p, p, C, D) serves images.
    vp = live_params(video_cfg, seed=4)
    kernel = jnp.asarray(np.asarray(vp["pos_embed"]["kernel"])[0])
    ip = dict(vp, pos_embed=dict(vp["pos_embed"], kernel=kernel))
    v1 = np.asarray(forward(video_cfg)(vp, clip, t, c, pl))[:, 0]
    assert max_abs(v1) > 1e-2
    assert max_abs_diff(v1, forward(tiny_cfg)(ip, x, t, c, pl)) <= 1e-6


# --------------------------------------------------------------------------- 9. variants


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMETER_COUNTS))
def test_released_parameter_counts(name):
    # Scanned and unrolled layouts hold the same parameters (checked above on
    # small configs); the scanned one traces each run once, so it is faster.
    count = param_count(abstract_params(get_variant(name, scan_layers=True)))
    released = RELEASED_PARAMETER_COUNTS[name]
    print(f"{name}: apt_jax {count:,} parameters, diffusers {released:,}")
    assert abs(count - released) <= 0.01 * released
    assert count == released  # exact today; a change here needs a reason


def test_diffusers_style_config_dict():
    # The fields of a diffusers config.json, shrunk to test size: JSON gives a
    # list for dual_attention_layers, and out_channels may be null.
    diffusers_config = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 12,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 10,
        "out_channels": None,
        "pos_embed_max_size": 8,
        "qk_norm": "rms_norm",
        "dual_attention_layers": [0, 1],
    }
    cfg = MMDiTConfig(**diffusers_config)
    assert cfg.out_channels == 4
    assert cfg.dual_attention_layers == (0, 1)
    assert hash(cfg) == hash(MMDiTConfig(**diffusers_config))  # usable as a static argument
    assert MMDiTConfig(**cfg.to_dict()) == cfg
    params = shapes_of(cfg)
    assert params["transformer_blocks_0"]["attn2"]["norm_k"]["scale"].shape == (8,)
    x = jax.ShapeDtypeStruct((2, 4, 6, 4), jnp.float32)
    args = (x, _shape((2,)), _shape((2, 5, 12)), _shape((2, 10)))
    v = jax.eval_shape(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a), params, *args)
    assert v.shape == x.shape and v.dtype == jnp.float32


# --------------------------------------------------------------------------- 10. logical axes


def _boxed(cfg):
    """Parameters as `init` returns them (LogicallyPartitioned boxes), shapes only."""
    inputs = [_shape(a.shape) for a in dummy_inputs(cfg, frames=cfg.patch_size_t or 0)]
    return jax.eval_shape(lambda *a: MMDiT(cfg).init(jax.random.key(0), *a), *inputs)["params"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_every_parameter_has_logical_axes(scan, video):
    # Scanned runs [0, 1) dual and [1, 2) plain, then the final block; QK norms.
    cfg = get_variant(
        "test",
        num_layers=3,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
        scan_layers=scan,
        patch_size_t=2 if video else None,
    )
    boxed = _boxed(cfg)
    flat = flatten_dict(boxed)
    assert len(flat) == len(jax.tree.leaves(nn.meta.unbox(boxed))) > 40
    known = {v for k, v in vars(axes).items() if k.isupper() and isinstance(v, str)}
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        names = leaf.names
        assert len(names) == leaf.value.ndim, (path, names, leaf.value.shape)
        assert all(isinstance(n, str) for n in names), (path, names)
        assert len(set(names)) == len(names), (path, names)  # flax rejects repeats
        assert set(names) <= known, (path, names)
        scanned = scan and re.fullmatch(r"transformer_blocks_\d+_\d+", path[0]) is not None
        assert (names[0] == axes.LAYERS) == scanned, (path, names)
    # Every parameter resolves to a mesh PartitionSpec under the default rules.
    nn.logical_to_mesh(nn.get_partition_spec(boxed), axes.DEFAULT_RULES)


@pytest.fixture(scope="module")
def mesh_case(tiny_cfg, tiny_params, std_inputs, std_output):
    return tiny_cfg, tiny_params, std_inputs, std_output, _boxed(tiny_cfg)


def _sharded_forward(mesh_case, shape, activation_rules, shard_batch=True):
    cfg, params, inputs, _, boxed = mesh_case
    n = int(np.prod(shape))
    devices = np.array(jax.devices()[:n]).reshape(shape)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, axes.DEFAULT_RULES)
    # From host copies: re-placing device arrays compiles a program per leaf.
    placed = jax.device_put(jax.tree.map(np.asarray, params), shardings)
    batch_spec = ("data", "fsdp") if shard_batch else None
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_spec))
    inputs = [jax.device_put(np.asarray(a), batch) for a in inputs]
    model = MMDiT(cfg)
    fn = jit(lambda p, *a: model.apply({"params": p}, *a))
    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules):
        lowered = fn.lower(placed, *inputs)
        out = lowered.compile()(placed, *inputs)
    program = lowered.as_text()
    # Parameters really are split over fsdp x tensor.
    q = placed["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.size == q.size // (shape[1] * shape[2])
    return program, out


# On 8 simulated CPU devices, jax/jaxlib 0.10.2 computes wrong values for this
# model on a (2, 2, 2) mesh as soon as the batch is split over (data, fsdp) and
# the kernels over (fsdp, tensor), with or without the activation constraints
# (plain `jax.jit` on sharded arguments; no flax involved). Pure-JAX repro:
#   h (4,16,32) sharded P(("data","fsdp")); wv (32,32); wo (32,32) P("tensor","fsdp");
#   cond (4,32); wm (32,192) P(None,"tensor");
#   f = lambda h, wv, wo, cond, wm: (cond @ wm[:, 64:96])[:, None] * ((h @ wv) @ wo)
#   jax.jit(f)(sharded args) differs from jax.jit(f)(unsharded args) by O(1).
# Any two of the three axes > 1 compute correctly (1x4x2 below). Strict xfail, so
# that a fixed jaxlib turns this red and the marker gets removed.
MESH_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="XLA miscompile on a 2x2x2 CPU mesh with batch and kernels sharded (jaxlib 0.10.2)",
)


@pytest.mark.parametrize(
    "shape",
    [pytest.param((1, 4, 2), id="1x4x2"), pytest.param((2, 2, 2), id="2x2x2", marks=MESH_XFAIL)],
)
def test_sharded_forward_with_logical_rules_matches_unsharded(mesh_case, shape):
    """Parameters placed by their logical axes, the batch over (data, fsdp), the
    models' activation constraints resolved by the default rules."""
    program, out = _sharded_forward(mesh_case, shape, axes.DEFAULT_RULES)
    assert "sharding_constraint" in program  # activation constraints are placed
    assert max_abs_diff(out, mesh_case[3]) <= 1e-5


def test_sharded_params_on_2x2x2_mesh_match_unsharded(mesh_case):
    """The (2, 2, 2) mesh with the parameters sharded by their logical axes, a
    replicated batch and no activation rules (what the XLA bug above leaves correct)."""
    _, out = _sharded_forward(mesh_case, (2, 2, 2), (), shard_batch=False)
    assert max_abs_diff(out, mesh_case[3]) <= 1e-5


# --------------------------------------------------------------------------- 11. labels


def test_label_embedder(tiny_cfg, tiny_params, std_inputs):
    emb = LabelEmbedder(
        num_classes=10, context_tokens=3, joint_attention_dim=24, pooled_projection_dim=20
    )
    assert emb.null_label == 10
    labels = jnp.arange(11)
    # An "rbg" key: threefry's XLA program is slow to compile on CPU.
    variables = jit(emb.init)(jax.random.key(0, impl="rbg"), labels)
    context, pooled = emb.apply(variables, labels)
    assert context.shape == (11, 3, 24) and pooled.shape == (11, 20)
    assert context.dtype == jnp.float32 and pooled.dtype == jnp.float32
    context, pooled = np.asarray(context), np.asarray(pooled)
    assert variables["params"]["context"].value.shape == (11, 3, 24)  # + the null row
    assert variables["params"]["pooled"].value.shape == (11, 20)
    # Each label, the null one included, has its own embedding.
    for a in range(11):
        for b in range(a + 1, 11):
            assert max_abs_diff(context[a], context[b]) > 1e-3
            assert max_abs_diff(pooled[a], pooled[b]) > 1e-3
    # Same label, same embedding: rows of the tables.
    np.testing.assert_array_equal(context, np.asarray(variables["params"]["context"].value))
    np.testing.assert_array_equal(pooled, np.asarray(variables["params"]["pooled"].value))
    c2, p2 = emb.apply(variables, jnp.array([emb.null_label, 3, 3, 0]))
    c2n, p2n = np.asarray(c2), np.asarray(p2)
    np.testing.assert_array_equal(c2n[1], c2n[2])
    np.testing.assert_array_equal(c2n[0], context[10])
    np.testing.assert_array_equal(p2n[3], pooled[0])
    # Its outputs feed the MMDiT of matching widths.
    x, t, _, _ = std_inputs
    v = forward(tiny_cfg)(tiny_params, x, t, c2, p2)
    assert v.shape == x.shape and np.isfinite(np.asarray(v)).all()


# --------------------------------------------------------------------------- 12. hidden states


def test_hidden_states_scan_and_unrolled(dual_outputs):
    (v_u, hidden_u), (v_s, hidden_s) = dual_outputs
    n_tokens = (8 // 2) * (6 // 2)
    assert isinstance(hidden_u, tuple) and isinstance(hidden_s, tuple)
    assert len(hidden_u) == len(hidden_s) == DUAL_CFG.num_layers
    for h_u, h_s in zip(hidden_u, hidden_s, strict=True):
        assert h_u.shape == h_s.shape == (2, n_tokens, DUAL_CFG.inner_dim)
        assert max_abs_diff(h_u, h_s) < 1e-5
    for a, b in zip(hidden_u[:-1], hidden_u[1:], strict=True):
        assert max_abs_diff(a, b) > 1e-3  # one entry per block, in block order
    assert max_abs_diff(v_s, v_u) < 1e-5


def test_hidden_states_leave_velocity_unchanged(tiny_cfg, tiny_params, std_inputs, std_output):
    v, hidden = forward(tiny_cfg, return_hidden_states=True)(tiny_params, *std_inputs)
    assert max_abs_diff(v, std_output) < 1e-5
    assert len(hidden) == tiny_cfg.num_layers
    assert all(h.shape == (4, 12, tiny_cfg.inner_dim) for h in hidden)
