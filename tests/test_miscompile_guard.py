"""The known XLA miscompile (docs/miscompile.md) and the guard that refuses it.

jaxlib 0.10.2's SPMD partitioner computes `h @ w` wrong on a mesh with data > 1
and fsdp == tensor > 1 when `h` is split (data, fsdp) x tensor, `w` (tensor,
fsdp) and the result (data, fsdp) x tensor: it permutes the rows of `h` as if
data and fsdp were swapped and never permutes them back. The tests pin the
defect (they fail once a jaxlib fixes it: then drop the guard), check that the
guard's window is where the MMDiT really goes wrong, that it refuses those
combinations with the fix in the message, and that it passes the rest: other
batches, other meshes, the configs' meshes and TPU.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apt_jax.models import MMDiT, axes, get_variant
from apt_jax.tasks.networks import check_batch_and_mesh
from apt_jax.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = ("data", "fsdp")
# The tiny "test" MMDiT (width 32) on the standard 8x6 latents (12 patches) and
# 3 context tokens: on a 2x2x2 mesh its window is [32, 64] rows per stream.
TEST_TOKENS = {"image": 12, "context": 3}
TEST_WIDTH = 32


def cpu_mesh(shape: tuple[int, int, int]) -> Mesh:
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), sharding.MESH_AXES)


def _dot_program(mesh: Mesh):
    """The smallest known repro: one (4, 2) @ (2, 2) dot."""
    h = NamedSharding(mesh, PartitionSpec(BATCH, "tensor"))
    w = NamedSharding(mesh, PartitionSpec("tensor", "fsdp"))
    out = NamedSharding(mesh, PartitionSpec(BATCH, "tensor"))
    return jax.jit(lambda h, w: h @ w, out_shardings=out), h, w


def _permute_pairs(hlo: str) -> set[tuple[int, int]]:
    pairs = set()
    for block in re.findall(
        r"collective-permute(?:-start)?\(.*?source_target_pairs=\{(.*?)\}\}", hlo
    ):
        pairs |= {(int(a), int(b)) for a, b in re.findall(r"(\d+),(\d+)", block)}
    return pairs


# Devices (data, fsdp, tensor) = (0, 1, t) and (1, 0, t) trade rows: partitions
# 2 <-> 4 and 3 <-> 5 of the 2x2x2 mesh.
SWAP_DATA_FSDP = {(2, 4), (4, 2), (3, 5), (5, 3)}


# --------------------------------------------------------------- the defect itself


def test_xla_still_swaps_rows_of_the_minimal_dot():
    """Pins the wrong values. When this fails, XLA computes the dot right: check the
    MMDiT (test_models' strict xfail turns red too) and drop `known_miscompile`."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 2), dtype=np.float32)
    w = rng.standard_normal((2, 2), dtype=np.float32)
    fn, h_sharding, w_sharding = _dot_program(cpu_mesh((2, 2, 2)))
    got = np.asarray(fn(jax.device_put(h, h_sharding), jax.device_put(w, w_sharding)))
    expected = h @ w
    assert np.abs(got - expected).max() > 0.1, "XLA now computes the dot right: see docstring"
    # Rows 1 and 2 are batch shards (data, fsdp) = (0, 1) and (1, 0): exchanged.
    np.testing.assert_allclose(got, expected[[0, 2, 1, 3]], rtol=1e-5, atol=1e-6)
    hlo = fn.lower(jax.device_put(h, h_sharding), jax.device_put(w, w_sharding)).compile()
    assert SWAP_DATA_FSDP <= _permute_pairs(hlo.as_text())


def _live_params(cfg, seed=0):
    """Random parameters with every path live (adaLN gates are zero at init, which
    would hide the wrong rows)."""
    x, t, c, pl = _inputs(cfg, 1)
    abstract = jax.eval_shape(lambda: MMDiT(cfg).init(jax.random.key(0), x, t, c, pl))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        value = leaf.value if hasattr(leaf, "value") else leaf
        scale = 1 / np.sqrt(np.prod(value.shape[:-1])) if value.ndim > 1 else 0.1
        return jnp.asarray(scale * rng.standard_normal(value.shape), value.dtype)

    boxed = abstract["params"]
    params = jax.tree.map(fill, boxed, is_leaf=lambda a: hasattr(a, "names"))
    return boxed, params


def _inputs(cfg, batch, seed=100):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 6, cfg.in_channels))
    t = rng.uniform(size=(batch,))
    c = rng.standard_normal((batch, 3, cfg.joint_attention_dim))
    pl = rng.standard_normal((batch, cfg.pooled_projection_dim))
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, t, c, pl))


@pytest.mark.parametrize("batch", [8, 12], ids=["batch8-passes", "batch12-refused"])
def test_guard_window_is_where_the_mmdit_goes_wrong(batch):
    """On 2x2x2, batch 4 (image stream, test_models' xfail) and 12 (context stream:
    36 rows) are wrong, and batch 8 between them is right: the guard agrees."""
    import flax.linen as nn

    cfg = get_variant("test")
    boxed, params = _live_params(cfg)
    mesh = cpu_mesh((2, 2, 2))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, axes.DEFAULT_RULES)
    placed = jax.device_put(jax.tree.map(np.asarray, params), shardings)
    inputs = _inputs(cfg, batch)
    batch_sharding = sharding.batch_sharding(mesh)
    fn = jax.jit(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a))
    expected = np.asarray(fn(params, *inputs))
    with jax.set_mesh(mesh):
        got = np.asarray(
            fn(placed, *[jax.device_put(np.asarray(a), batch_sharding) for a in inputs])
        )
    wrong = np.abs(got - expected).max() > 1e-3 * np.abs(expected).max()
    refused = sharding.known_miscompile(
        batch, mesh, width=cfg.inner_dim, tokens_per_example=TEST_TOKENS
    )
    assert wrong == (refused is not None), (batch, refused, np.abs(got - expected).max())


# --------------------------------------------------------------------- the guard


@pytest.mark.parametrize(
    "shape, batch, stream",
    [
        ((2, 2, 2), 4, "image stream's 48 rows"),
        ((2, 2, 2), 12, "context stream's 36 rows"),
        ((2, 2, 2), 20, "context stream's 60 rows"),
    ],
)
def test_guard_refuses_with_mesh_batch_and_fix(shape, batch, stream):
    mesh = cpu_mesh(shape)
    with pytest.raises(ValueError) as err:
        sharding.check_batch_size(batch, mesh, width=TEST_WIDTH, tokens_per_example=TEST_TOKENS)
    message = str(err.value)
    assert f"batch_size={batch} on mesh {{'data': 2, 'fsdp': 2, 'tensor': 2}} (cpu)" in message
    assert stream in message and "docs/miscompile.md" in message
    # The fixes: the nearest good batches, a mesh with fsdp != tensor, or no tensor axis.
    assert "--config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2" in message
    assert "--config.mesh.tensor=1" in message
    for suggested in re.search(r"use batch_size ([\d or]+),", message).group(1).split(" or "):
        sharding.check_batch_size(
            int(suggested), mesh, width=TEST_WIDTH, tokens_per_example=TEST_TOKENS
        )


def test_guard_names_the_nearest_good_batches():
    message = ""
    try:
        sharding.check_batch_size(
            12, cpu_mesh((2, 2, 2)), width=TEST_WIDTH, tokens_per_example=TEST_TOKENS
        )
    except ValueError as err:
        message = str(err)
    assert "use batch_size 8 or 24," in message


def test_guard_counts_micro_batches():
    """With 2 accumulation steps, batch 8 runs forwards of 4: refused; batch 16
    (forwards of 8) passes, and suggestions split into whole micro-batches."""
    mesh = cpu_mesh((2, 2, 2))
    facts = dict(width=TEST_WIDTH, tokens_per_example=TEST_TOKENS, microbatches=2)
    with pytest.raises(ValueError, match=r"48 rows per forward \(4 examples x 12 tokens\)") as err:
        sharding.check_batch_size(8, mesh, **facts)
    assert "use batch_size 16," in str(err.value)
    sharding.check_batch_size(16, mesh, **facts)


@pytest.mark.parametrize("batch", [8, 24, 28, 32, 64])
def test_guard_passes_other_batches_on_the_same_mesh(batch):
    sharding.check_batch_size(
        batch, cpu_mesh((2, 2, 2)), width=TEST_WIDTH, tokens_per_example=TEST_TOKENS
    )


@pytest.mark.parametrize(
    "shape", [(1, 4, 2), (2, 4, 1), (4, 2, 1), (1, 2, 4), (2, 1, 4), (1, 2, 2), (2, 1, 2)]
)
def test_guard_passes_meshes_without_the_defect(shape):
    """Seen right: data = 1, or fsdp != tensor, or an axis of size 1 (any batch)."""
    mesh = cpu_mesh(shape)
    for batch in range(sharding.batch_divisor(mesh), 129, sharding.batch_divisor(mesh)):
        assert (
            sharding.known_miscompile(batch, mesh, width=TEST_WIDTH, tokens_per_example=TEST_TOKENS)
            is None
        )


def test_guard_passes_rules_that_split_no_kernel_tensor_by_fsdp():
    mesh = cpu_mesh((2, 2, 2))
    no_fsdp = [(k, None if k == axes.EMBED else v) for k, v in axes.DEFAULT_RULES]
    no_tensor = [(k, None if k in (axes.HEADS, axes.MLP) else v) for k, v in axes.DEFAULT_RULES]
    for rules in (no_fsdp, no_tensor):
        assert (
            sharding.known_miscompile(
                4, mesh, width=TEST_WIDTH, tokens_per_example=TEST_TOKENS, rules=rules
            )
            is None
        )
    # The config spells its rules as lists (ConfigDict): same verdict as the tuples.
    as_lists = [list(r) for r in axes.DEFAULT_RULES]
    assert sharding.known_miscompile(
        4, mesh, width=TEST_WIDTH, tokens_per_example=TEST_TOKENS, rules=as_lists
    )


def test_guard_is_scoped_to_the_platforms_that_miscompile():
    mesh = cpu_mesh((2, 2, 2))
    facts = dict(width=TEST_WIDTH, tokens_per_example=TEST_TOKENS)
    assert sharding.known_miscompile(4, mesh, **facts)  # the mesh's own platform: cpu
    assert sharding.known_miscompile(4, mesh, platform="gpu", **facts)
    assert sharding.known_miscompile(4, mesh, platform="tpu", **facts) is None


def test_check_batch_size_without_model_facts_is_unchanged():
    sharding.check_batch_size(4, cpu_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 4"):
        sharding.check_batch_size(6, cpu_mesh((2, 2, 2)), width=32, tokens_per_example={"a": 1})


def _config_modules():
    return sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", _config_modules())
def test_guard_passes_the_configs_default_meshes(name):
    """Every recipe's default mesh (data-parallel, or FSDP over all devices) is
    outside the defect for any batch and model."""
    config = importlib.import_module(f"configs.{name}").get_config()
    mesh = sharding.make_mesh(config.mesh)
    div = sharding.batch_divisor(mesh)
    for batch in range(div, 8 * div + 1, div):
        # The worst case: a model whose width equals the rows of a one-token stream.
        assert (
            sharding.known_miscompile(
                batch,
                mesh,
                width=batch,
                tokens_per_example={"one": 1},
                rules=config.logical_axis_rules,
            )
            is None
        ), dict(mesh.shape)


def test_mmdit_token_streams():
    image = get_variant("test")
    assert sharding.mmdit_token_streams(image, (8, 6, 4), 3) == {"image": 12, "context": 3}
    video = get_variant("test", patch_size_t=2)
    assert sharding.mmdit_token_streams(video, (4, 8, 6, 4), 7) == {"image": 24, "context": 7}


# ------------------------------------------------------------ the TPU compiler

_TPU_SCRIPT = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from apt_jax.train import sharding
devices = topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu").devices
mesh = Mesh(np.array(devices).reshape(2, 2, 2), sharding.MESH_AXES)
s = lambda *spec: NamedSharding(mesh, P(*spec))
h = jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=s(("data", "fsdp"), "tensor"))
w = jax.ShapeDtypeStruct((2, 2), jnp.float32, sharding=s("tensor", "fsdp"))
compiled = jax.jit(lambda h, w: h @ w, out_shardings=s(("data", "fsdp"), "tensor")).lower(h, w)
print(json.dumps(dict(
    platform=devices[0].platform,
    guard=sharding.known_miscompile(4, mesh, width=2, tokens_per_example={"rows": 1}),
    hlo=compiled.compile().as_text(),
)))
"""


def test_tpu_compiler_program_has_no_row_swap():
    """The same dot compiled by the TPU compiler for v5p:2x2x2 (libtpu, no TPU):
    its partitioned program does not trade rows between data and fsdp, and the
    guard passes a mesh of TPU devices. (With windowed einsum disabled,
    LIBTPU_INIT_ARGS=--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000,
    the TPU compiler emits the CPU's wrong program: docs/miscompile.md.)"""
    pytest.importorskip("libtpu")
    # libtpu takes a machine-wide lock unless told other processes may load it too.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, "-c", _TPU_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["platform"] == "tpu"
    assert result["guard"] is None
    assert not SWAP_DATA_FSDP <= _permute_pairs(result["hlo"])


# ------------------------------------------------- wired into every task's build
@pytest.mark.parametrize("recipe", ["digits_sft", "digits_apt"])
def test_task_builds_refuse_the_miscompiled_batch(recipe):
    """The stages check their batch and mesh through `networks.check_batch_and_mesh`:
    the tiny digits model on 2x2x2 is refused at batch 4 (image stream in the
    window), before anything compiles; batch 16 is outside it."""
    config = importlib.import_module(f"configs.{recipe}").get_config("tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config.batch_size = 4
    with pytest.raises(ValueError, match=r"batch_size=4 on mesh .* hits a known XLA miscompile"):
        check_batch_and_mesh(config, mesh)
    config.batch_size = 16
    check_batch_and_mesh(config, mesh)
