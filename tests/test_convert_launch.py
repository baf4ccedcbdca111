"""apt_jax.convert.params_checkpoint and launch/convert.py.

Params checkpoints round-trip exactly, also onto an 8-device FSDP mesh; bad
folders and mismatched trees fail with readable errors; launch/convert.py turns
a tiny diffusers SD3 transformer into a params checkpoint and back (and a
trained run into a diffusers folder), and diffusers computes the same outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.convert.params_checkpoint import CONFIG_NAME, load_params, save_params
from apt_jax.models import MMDiT, dummy_inputs, get_variant, init_params
from apt_jax.models.axes import DEFAULT_RULES
from apt_jax.models.partitioning import logical_shardings, unbox
from apt_jax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(REPO, "launch", "convert.py")


def random_params(config, seed=0):
    """Every leaf random (the init zeroes many), so equality checks are not vacuous."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32), s.dtype), shapes
    )


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, config, params): a scanned bfloat16 test model saved once."""
    config = get_variant("test", num_layers=3, scan_layers=True, param_dtype="bfloat16")
    params = random_params(config)
    path = tmp_path_factory.mktemp("params") / "ckpt"
    save_params(path, config, params)
    return path, config, params


def test_round_trip_default_device(saved):
    path, config, params = saved
    assert sorted(os.listdir(path)) == [CONFIG_NAME, "params"]
    loaded_config, loaded = load_params(path)
    assert loaded_config == config
    assert_trees_equal(params, loaded)
    leaf = jax.tree.leaves(loaded)[0]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_round_trip_onto_fsdp_mesh(saved):
    path, config, params = saved
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    boxed = jax.eval_shape(
        lambda r: MMDiT(config).init(r, *dummy_inputs(config))["params"], jax.random.key(0)
    )
    shardings = logical_shardings(boxed, mesh, DEFAULT_RULES)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )
    _, loaded = load_params(path, abstract_params=abstract)
    assert_trees_equal(params, loaded)
    for leaf, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want
    kernel = loaded["transformer_blocks_0_2"]["attn"]["to_q"]["kernel"]  # (layers, D, D)
    assert kernel.addressable_shards[0].data.shape == (2, 32 // 8, 32)


def test_load_casts_to_abstract_dtype(saved):
    path, _, params = saved
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    _, loaded = load_params(path, abstract_params=abstract)
    assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.float32), params), loaded)


def test_missing_folder_and_config(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=r"Params checkpoint \S*nope does not exist"):
        load_params(tmp_path / "nope")
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"No {CONFIG_NAME}.*diffusers folder"):
        load_params(tmp_path / "diffusers")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG_NAME).write_text(json.dumps(saved[1].to_dict()))
    with pytest.raises(FileNotFoundError, match="no params/"):
        load_params(tmp_path / "half")


def test_tree_mismatch_lists_key_paths(saved, tmp_path):
    path, config, params = saved
    unrolled = jax.eval_shape(
        lambda: init_params(config.replace(scan_layers=False), jax.random.key(0))
    )
    with pytest.raises(ValueError, match=r"missing key path.*transformer_blocks_0/attn") as e:
        load_params(path, abstract_params=unrolled)
    assert "unexpected key path(s): transformer_blocks_0_2/attn" in str(e.value)
    bad = dict(params, extra={"kernel": jnp.zeros((2,))})
    with pytest.raises(ValueError, match=r"unexpected key path\(s\): extra/kernel"):
        save_params(tmp_path / "bad", config, bad)
    with pytest.raises(FileExistsError, match="already holds a params checkpoint; pass overwrite"):
        save_params(path, config, params)


def run_convert(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, CONVERT, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def diffusers_forward(model, x, t, ctx, pooled):
    import torch

    with torch.no_grad():
        return model(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(1000.0 * t),
        ).sample.numpy()


def sd3_inputs(config, seed=0, batch=2, size=8, context_len=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, config["in_channels"], size, size)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, size=(batch,)).astype(np.float32)
    ctx = rng.normal(size=(batch, context_len, config["joint_attention_dim"]))
    pooled = rng.normal(size=(batch, config["pooled_projection_dim"]))
    return x, t, ctx.astype(np.float32), pooled.astype(np.float32)


@pytest.mark.slow
def test_launch_convert_diffusers_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sd3 = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**sd3).eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits the adaLN and output layers
            p.normal_(0.0, 0.25)
    model.save_pretrained(tmp_path / "src")

    run_convert("--diffusers", tmp_path / "src", "--out", tmp_path / "ckpt", "--scan_layers")
    config, params = load_params(tmp_path / "ckpt")
    assert config.scan_layers and config.qk_norm == "rms_norm"
    assert "transformer_blocks_0_2" in params

    run_convert("--to-diffusers", "--params", tmp_path / "ckpt", "--out", tmp_path / "back")
    back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "back").eval()
    inputs = sd3_inputs(sd3)
    np.testing.assert_array_equal(
        diffusers_forward(back, *inputs), diffusers_forward(model, *inputs)
    )


@pytest.mark.slow
def test_launch_convert_run_to_diffusers(tmp_path):
    """A checkpointed SFT run exports its EMA MMDiT (random weights, not trained)."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from apt_jax.tasks import build_task
    from apt_jax.train.checkpoint import Checkpointer
    from apt_jax.train.config import mmdit_config
    from configs import digits_sft

    config = digits_sft.get_config("tiny")
    task = build_task(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    state = task.init_state(jax.random.key(0))
    mmdit = random_params(mmdit_config(config))
    state = state.replace(ema_params=dict(state.ema_params, mmdit=mmdit))
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, state, config=config)

    run_convert("--to-diffusers", "--workdir", tmp_path / "run", "--out", tmp_path / "out")
    model = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    x, t, ctx, pooled = sd3_inputs(model.config, size=8)
    apply = MMDiT(mmdit_config(config)).apply
    ours = np.asarray(apply({"params": mmdit}, x.transpose(0, 2, 3, 1), t, ctx, pooled))
    theirs = diffusers_forward(model, x, t, ctx, pooled).transpose(0, 2, 3, 1)
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4
