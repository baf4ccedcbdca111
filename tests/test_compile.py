"""The TPU planner (apt_jax.plan, launch/compile.py): every recipe compiles for a
TPU slice with libtpu, here on the CPU; the loop FLOP correction; the batch
search; the errors a person sees.

Compiles use the tiny `test` / digits-tiny models on `v5e:2x2`. They skip, with
the reason, where libtpu is not installed (`pip install -r
requirements-tpu.txt`; CI installs it).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.cli import load_config
from apt_jax.errors import UserError
from apt_jax.plan import topology
from apt_jax.plan.find_batch import find_batch
from apt_jax.plan.loops import loop_corrected_cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(), reason="libtpu not installed: " + topology.INSTALL_HINT
)


def recipe(name: str, variant: str, **overrides):
    """`configs/<name>.py:<variant>` with overrides; latents recipes get 8 context tokens
    (small programs; the latent size follows the model)."""
    config = load_config(os.path.join(CONFIGS, f"{name}.py"), variant)
    if config.data.name == "latents":
        config.data.context_length = 8
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture(autouse=True, scope="module")
def no_cached_tpu_programs():
    """The suite's persistent compilation cache (conftest) would store these TPU
    programs, and a later identical compile fails to read one back (no TPU client
    to load it) with a warning: keep them out of it."""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, 1e9)
    yield
    jax.config.update(key, before)


@pytest.fixture(scope="module")
def v5e_2x2():
    topology.prepare_environment()
    return topology.topology("v5e:2x2")


def plan(config, slice_):
    from apt_jax.plan.analysis import plan as compile_plan

    return compile_plan(config, slice_)


def check_plan(p, chips=4):
    """Numbers a compiled step must have."""
    assert p.chips == chips and p.hbm_bytes == 16 * 2**30
    assert p.argument_bytes > 0 and p.output_bytes > 0
    assert p.total_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
    assert p.fits and p.headroom_bytes > 0
    assert p.flops_per_chip >= p.raw_flops_per_chip > 0
    # Model FLOPs leave out remat and elementwise work: never above the step's.
    assert 0 < p.model_flops <= p.flops_per_chip * p.chips
    assert p.step_time_bound_s > 0


# ------------------------------------------------------------- names, errors
def test_topology_names_and_cloud_types():
    assert topology.canonical_name("v5e:4x4") == "v5e:4x4"
    assert topology.canonical_name("v5e-16") == "v5e:4x4"
    assert topology.canonical_name("v5litepod-64") == "v5e:8x8"
    # Cloud's v5p and v4 types count TensorCores, two per chip.
    assert topology.canonical_name("v5p-8") == "v5p:2x2x1"
    assert topology.canonical_name("v5p-64") == "v5p:2x4x4"
    assert topology.canonical_name("v4-16") == "v4:2x2x2"
    assert topology.canonical_name("V6E-8") == "v6e:2x4"


@pytest.mark.parametrize("name", ["v7:2x2", "v5e:3x3", "v5e-12", "tpu"])
def test_unknown_topology_lists_the_known_ones(name):
    with pytest.raises(UserError, match="Unknown TPU topology") as e:
        topology.canonical_name(name)
    assert "v5e:4x4 (v5e-16)" in str(e.value) and "v5p:2x2x1 (v5p-8)" in str(e.value)


def test_without_libtpu_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(UserError, match="pip install -r requirements-tpu.txt"):
        topology.topology("v5e:2x2")


def test_find_batch_finds_the_largest_that_fits_with_few_compiles():
    for limit, guess in [(0, 5), (1, 5), (2, 9), (13, 13), (40, 100), (100, 10), (4096, 9000)]:
        tried = []

        def compile_at(b, limit=limit, guess=guess, tried=tried):
            tried.append(b)
            return SimpleNamespace(
                fits=b <= limit, total_bytes=10 + b, hbm_bytes=10 + guess, per_replica_batch=b
            )

        search = find_batch(compile_at)
        best = search.best.per_replica_batch if search.best else 0
        assert best == limit, (limit, guess, tried)
        assert len(tried) == len(set(tried))  # no batch compiled twice
        if limit == guess and limit > 2:
            assert len(tried) == 4  # 1, 2, the guess, the guess + 1


# ------------------------------------------------------------ FLOPs in loops
def test_loop_correction_matches_the_unrolled_program_on_cpu():
    """XLA counts a loop body once; the correction counts it per iteration."""
    w = jnp.zeros((7, 64, 64), jnp.float32)
    x = jnp.zeros((16, 64), jnp.float32)

    def f(w, x, unroll):
        def body(h, wi):
            return jnp.tanh(h @ wi), None

        return jax.lax.scan(body, x, w, unroll=unroll)[0]

    looped = jax.jit(lambda w, x: f(w, x, 1)).lower(w, x).compile()
    unrolled = jax.jit(lambda w, x: f(w, x, True)).lower(w, x).compile()
    cost = loop_corrected_cost(looped.as_text())
    assert [lp.trip_count for lp in cost.loops] == [7]
    matmuls = 7 * 2 * 16 * 64 * 64
    assert cost.raw_flops < 0.3 * matmuls  # one body's worth
    assert cost.flops == pytest.approx(unrolled.cost_analysis()["flops"], rel=0.02)
    assert cost.flops >= matmuls


@needs_libtpu
@pytest.mark.slow
def test_scanned_flops_match_an_unrolled_compile_of_the_same_model(v5e_2x2):
    # Width 128, so that matmuls dominate: elementwise work, which XLA fuses a
    # little differently in a loop body than in a straight line, is not the point.
    overrides = {
        "model.num_layers": 5,
        "model.num_attention_heads": 4,
        "model.attention_head_dim": 32,
        "model.caption_projection_dim": 128,
        "batch_size": 4,
        "model.remat_policy": "none",
    }
    scanned = plan(recipe("sd3_sft", "test", **overrides, **{"model.scan_layers": True}), v5e_2x2)
    unrolled = plan(recipe("sd3_sft", "test", **overrides, **{"model.scan_layers": False}), v5e_2x2)
    # Four identical blocks are scanned: forward and backward loops, 4 trips each.
    assert scanned.raw_flops_per_chip < 0.6 * unrolled.flops_per_chip
    assert unrolled.raw_flops_per_chip == unrolled.flops_per_chip  # nothing to correct
    assert scanned.flops_per_chip == pytest.approx(unrolled.flops_per_chip, rel=0.02)


def test_model_flops_match_xla_count_of_a_forward_pass():
    """`forward_flops` (matmuls and attention) against XLA's count of an MMDiT forward
    (which adds elementwise work and the per-sample adaLN matmuls: a few percent)."""
    from apt_jax.models import MMDiT, abstract_params, get_variant
    from apt_jax.plan.model_flops import Tokens, forward_flops

    config = get_variant(
        "test",
        num_layers=3,
        num_attention_heads=8,
        attention_head_dim=64,
        caption_projection_dim=512,
        sample_size=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
    )
    batch, context = 2, 40
    x = jax.ShapeDtypeStruct((batch, 16, 16, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, context, config.joint_attention_dim), jnp.float32)
    pooled = jax.ShapeDtypeStruct((batch, config.pooled_projection_dim), jnp.float32)
    forward = jax.jit(lambda p, *a: MMDiT(config).apply({"params": p}, *a))
    xla = forward.lower(abstract_params(config), x, t, ctx, pooled).compile().cost_analysis()
    ours = batch * forward_flops(config, Tokens(image=64, context=context))
    assert ours <= xla["flops"] <= 1.06 * ours


# ------------------------------------------------------------------ recipes
@needs_libtpu
def test_sft_step_compiles_for_v5e_2x2(v5e_2x2):
    p = plan(recipe("sd3_sft", "test"), v5e_2x2)
    check_plan(p)
    assert p.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and p.per_replica_batch == 2
    assert p.topology == "v5e:2x2" and p.bound_by in ("compute", "memory")
    fields = {
        "topology", "chips", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
        "total_bytes", "hbm_bytes", "fits", "flops_per_chip", "model_flops", "step_time_bound_s",
    }  # fmt: skip
    assert fields <= set(p.to_json())
    json.dumps(p.to_json())


RECIPES = {
    "sft-lora": ("sd3_sft_lora", "test", {}),
    "sft-remat-full": ("sd3_sft", "test", {"model.remat_policy": "full"}),
    "sft-remat-dots": ("sd3_sft", "test", {"model.remat_policy": "dots"}),
    "sft-remat-dots_no_batch": ("sd3_sft", "test", {"model.remat_policy": "dots_no_batch"}),
    "distill-deterministic": ("digits_distill", "deterministic,tiny", {}),
    "distill-deterministic-text": ("sd3_distill", "test,deterministic", {}),
    "distill-direct": ("digits_distill", "direct,tiny", {}),
    "apt-r1-approx": ("sd3_apt", "test", {"r1_mode": "approx"}),
    "apt-r1-exact": ("sd3_apt", "test", {"r1_mode": "exact"}),
    "apt-r1-none": ("sd3_apt", "test", {"r1_mode": "none"}),
    "apt-lora": ("sd3_apt_lora", "test", {}),
}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_compiles_for_v5e_2x2(name, v5e_2x2):
    path, variant, overrides = RECIPES[name]
    check_plan(plan(recipe(path, variant, **overrides), v5e_2x2))


@needs_libtpu
@pytest.mark.slow
def test_exact_r1_costs_more_than_approximate(v5e_2x2):
    approx = plan(recipe("sd3_apt", "test", r1_mode="approx"), v5e_2x2)
    exact = plan(recipe("sd3_apt", "test", r1_mode="exact"), v5e_2x2)
    assert exact.flops_per_chip > approx.flops_per_chip


@needs_libtpu
@pytest.mark.slow
def test_multislice_compile():
    topology.prepare_environment()
    two = topology.topology("v5e:2x2", num_slices=2)
    assert two.chips == 8 and sorted({d.slice_index for d in two.devices}) == [0, 1]
    p = plan(recipe("sd3_sft", "test", batch_size=16), two)
    check_plan(p, chips=8)
    assert p.topology == "v5e:2x2 x 2 slices"
    assert p.mesh == {"data": 8, "fsdp": 1, "tensor": 1}  # 4 per slice x 2 slices
    assert any("mesh.dcn.data=2" in n for n in p.notes)


@needs_libtpu
def test_a_step_that_cannot_fit_is_reported_with_its_numbers(v5e_2x2):
    from apt_jax.plan.report import plan_table

    # ~0.5 B parameters replicated on every chip: weights, EMA and both Adam
    # moments in fp32 are ~8 GiB... x2 width: ~2 B parameters, ~32 GiB.
    big = recipe(
        "sd3_sft",
        "test",
        **{
            "model.num_layers": 2,
            "model.num_attention_heads": 64,
            "model.attention_head_dim": 128,
            "model.caption_projection_dim": 8192,
            "batch_size": 4,
        },
    )
    p = plan(big, v5e_2x2)
    assert not p.fits and p.total_bytes > p.hbm_bytes and p.headroom_bytes < 0
    assert p.argument_bytes > p.hbm_bytes  # the state alone is too big
    table = plan_table(p)
    assert "DOES NOT FIT" in table and f"{-p.headroom_bytes / 2**30:.2f} GiB over" in table


# ------------------------------------------------------- the command line
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
ENV.pop("JAX_PLATFORMS", None)  # the tool sets it itself


def compile_cli(*args, pre: str = ""):
    script = os.path.join(REPO, "launch", "compile.py")
    code = (
        f"{pre}import runpy, sys; sys.argv = {[script, *args]!r}; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_unknown_topology_and_missing_libtpu_are_one_line_errors():
    config = os.path.join(CONFIGS, "sd3_sft.py") + ":test"
    out = compile_cli("--config", config, "--topology", "v9:2x2")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: Unknown TPU topology 'v9:2x2'; use one of: v4:2x2x1")
    assert len(out.stderr.strip().splitlines()) == 1
    # libtpu hidden from the import system, as on a machine without it.
    out = compile_cli(
        "--config",
        config,
        "--topology",
        "v5e:2x2",
        pre="import sys; sys.modules['libtpu'] = None; ",
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: " + topology.INSTALL_HINT


@needs_libtpu
@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json_without_tpu_noise(tmp_path):
    config = os.path.join(CONFIGS, "sd3_sft.py") + ":test"
    out = compile_cli(
        "--config", config, "--topology", "v5e-4", "--json", str(tmp_path / "p.json"),
        "--config.data.context_length=8",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| total |" in out.stdout and "roofline bound" in out.stdout
    # libtpu is quiet: no TPU-init errors on a machine without a TPU.
    assert "TPU" not in out.stderr and "E0000" not in out.stderr, out.stderr[-2000:]
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["topology"] == "v5e:2x2" and saved["chips"] == 4 and saved["fits"] is True
    parts = saved["argument_bytes"] + saved["output_bytes"] - saved["alias_bytes"]
    assert np.isclose(saved["total_bytes"], parts + saved["temp_bytes"])


@needs_libtpu
@pytest.mark.slow
def test_plain_cpu_runs_are_untouched_by_libtpu():
    """With libtpu installed, a JAX program without JAX_PLATFORMS runs on the CPU, silently."""
    code = "import jax; print(jax.devices()[0].platform, jax.numpy.ones(3).sum())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.split() == ["cpu", "3.0"], out.stderr
    assert out.stderr == "", out.stderr[-2000:]
