"""apt_jax.convert.diffusers_sd3 against diffusers' own SD3Transformer2DModel.

Tiny random SD3 / SD3.5 transformers are written by diffusers, read by
apt_jax, and both forward passes compared in fp32; apt_jax writes folders that
diffusers reads back tensor for tensor. Skipped where torch or diffusers are
not installed (see requirements-test.txt).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import flax.linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from apt_jax.convert import diffusers_sd3  # noqa: E402
from apt_jax.models import MMDiT, dummy_inputs  # noqa: E402
from apt_jax.models.axes import DEFAULT_RULES  # noqa: E402

SD3Transformer2DModel = diffusers.SD3Transformer2DModel

BASE = dict(
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
)
# name -> (diffusers config overrides, latent (H, W)); the latents are not square.
CASES = {
    "sd3": (dict(), (8, 12)),
    "sd3-patch1": (dict(patch_size=1), (6, 10)),
    "sd3.5": (dict(sample_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1)), (16, 8)),
    "sd3.5-patch1-dual-last": (
        dict(patch_size=1, qk_norm="rms_norm", dual_attention_layers=(0, 2)),
        (10, 6),
    ),
}
CONTEXT_LEN = 7
# Output agreement in fp32, relative to the output scale max |v|.
RTOL = 1e-4


def make_model(seed: int = 0, dtype=torch.float32, **overrides) -> SD3Transformer2DModel:
    """A tiny SD3 transformer with every weight random (diffusers zero-inits many)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name:  # per-head RMSNorm scales: around 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    return model if dtype == torch.float32 else model.to(dtype)


def inputs(case: str, seed: int = 0, batch: int = 2):
    overrides, (h, w) = CASES[case]
    cfg = {**BASE, **overrides}
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, cfg["in_channels"], h, w)).astype(np.float32)  # NCHW
    t = rng.uniform(0.05, 0.95, size=(batch,)).astype(np.float32)
    ctx = rng.normal(size=(batch, CONTEXT_LEN, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(batch, cfg["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


def diffusers_forward(model, x, t, ctx, pooled) -> np.ndarray:
    """Velocity, channels-last; diffusers takes NCHW latents and timesteps 1000 t."""
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(1000.0 * t),
        ).sample
    return out.float().numpy().transpose(0, 2, 3, 1)


def apt_forward(config, params, x, t, ctx, pooled) -> np.ndarray:
    """Velocity, channels-last, from NCHW latents."""
    apply = jax.jit(lambda p, *a: MMDiT(config).apply({"params": p}, *a))
    return np.asarray(apply(params, x.transpose(0, 2, 3, 1), t, ctx, pooled))


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def safetensors_dict(folder) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (diffusers model, folder it was saved to), built once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = make_model(seed=len(cache), **CASES[case][0])
            folder = tmp_path_factory.mktemp(case.replace(".", "_"))
            model.save_pretrained(folder, safe_serialization=True)
            cache[case] = (model, folder)
        return cache[case]

    return get


def copy_with_config(src, dst, **config_changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(config_changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


# ----------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_diffusers(case, saved):
    model, folder = saved(case)
    args = inputs(case)
    ref = diffusers_forward(model, *args)
    assert np.max(np.abs(ref)) > 1.0  # random weights give a non-trivial output

    config, params = diffusers_sd3.load(folder)
    assert config.dual_attention_layers == tuple(CASES[case][0].get("dual_attention_layers", ()))
    err = relative_error(apt_forward(config, params, *args), ref)
    print(f"{case}: max|v| {np.max(np.abs(ref)):.3g}, relative max difference {err:.2e}")
    assert err <= RTOL

    scan_config, scan_params = diffusers_sd3.load(folder, scan_layers=True)
    assert scan_config.scan_layers
    assert any(name.count("_") == 3 for name in scan_params)  # transformer_blocks_a_b
    scan_err = relative_error(apt_forward(scan_config, scan_params, *args), ref)
    print(f"{case} (scan_layers): relative max difference {scan_err:.2e}")
    assert scan_err <= RTOL


def test_one_frame_video_config_reads_image_checkpoint(saved, tmp_path):
    model, folder = saved("sd3")
    x, t, ctx, pooled = inputs("sd3")
    config, params = diffusers_sd3.load(folder, patch_size_t=1)
    assert params["pos_embed"]["kernel"].ndim == 5
    video = MMDiT(config).apply(
        {"params": params}, x.transpose(0, 2, 3, 1)[:, None], t, ctx, pooled
    )
    ref = diffusers_forward(model, x, t, ctx, pooled)
    assert relative_error(np.asarray(video[:, 0]), ref) <= RTOL
    diffusers_sd3.save(config, params, tmp_path)
    back = SD3Transformer2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


# ----------------------------------------------------------------------------
# Round trips and file layouts
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sd3", "sd3.5"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_is_identical(case, scan_layers, saved, tmp_path):
    model, folder = saved(case)
    config, params = diffusers_sd3.load(folder, scan_layers=scan_layers)
    diffusers_sd3.save(config, params, tmp_path)

    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["_class_name"] == "SD3Transformer2DModel"
    assert isinstance(written["_diffusers_version"], str)
    back, info = SD3Transformer2DModel.from_pretrained(
        tmp_path, output_loading_info=True, low_cpu_mem_usage=False
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    for field in diffusers_sd3.SD3_FIELDS:
        theirs, ours = model.config[field], back.config[field]
        if field == "dual_attention_layers":
            theirs, ours = tuple(theirs), tuple(ours)
        assert ours == theirs, field

    original, written_tensors = safetensors_dict(folder), safetensors_dict(tmp_path)
    assert sorted(written_tensors) == sorted(original)
    for key, value in original.items():
        if key == "pos_embed.pos_embed":  # recomputed by apt_jax
            torch.testing.assert_close(written_tensors[key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(written_tensors[key], value), key
    for key, value in model.state_dict().items():
        if key != "pos_embed.pos_embed":
            assert torch.equal(back.state_dict()[key], value), key


def test_state_dict_core_round_trip(saved):
    model, _ = saved("sd3.5")
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = diffusers_sd3.config_from_diffusers(
        dict(model.config, _class_name="SD3Transformer2DModel")
    )
    for scan in (False, True):
        cfg = config.replace(scan_layers=scan)
        params = diffusers_sd3.from_diffusers_state_dict(cfg, tensors)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
        back = diffusers_sd3.to_diffusers_state_dict(cfg, params)
        assert sorted(back) == sorted(tensors)
        for key, value in tensors.items():
            if key != "pos_embed.pos_embed":
                np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_sharded_checkpoints(saved, tmp_path):
    model, folder = saved("sd3.5")
    _, reference = diffusers_sd3.load(folder)

    model.save_pretrained(tmp_path / "theirs", safe_serialization=True, max_shard_size="30KB")
    shards = [n for n in os.listdir(tmp_path / "theirs") if n.endswith(".safetensors")]
    assert len(shards) > 1
    assert os.path.exists(tmp_path / "theirs" / "diffusion_pytorch_model.safetensors.index.json")
    config, params = diffusers_sd3.load(tmp_path / "theirs")
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    diffusers_sd3.save(config, params, tmp_path / "ours", max_shard_size="30KB")
    ours = os.listdir(tmp_path / "ours")
    assert sum(n.endswith(".safetensors") for n in ours) > 1
    assert "diffusion_pytorch_model.safetensors.index.json" in ours
    back, info = SD3Transformer2DModel.from_pretrained(
        tmp_path / "ours", output_loading_info=True, low_cpu_mem_usage=False
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in model.state_dict().items():
        if key != "pos_embed.pos_embed":
            assert torch.equal(back.state_dict()[key], value), key
    _, again = diffusers_sd3.load(tmp_path / "ours")
    jax.tree.map(np.testing.assert_array_equal, again, reference)

    # Saving unsharded into the same folder replaces the shards.
    diffusers_sd3.save(config, params, tmp_path / "ours")
    assert sorted(n for n in os.listdir(tmp_path / "ours") if "diffusion" in n) == [
        "diffusion_pytorch_model.safetensors"
    ]


def test_bfloat16_checkpoint(tmp_path):
    model32 = make_model(seed=3, qk_norm="rms_norm")
    with torch.no_grad():  # fp32 weights that bf16 holds exactly
        for p in model32.parameters():
            p.copy_(p.bfloat16().float())
    model = copy.deepcopy(model32).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    with safe_open(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("proj_out.weight").dtype == torch.bfloat16

    config, params = diffusers_sd3.load(tmp_path / "bf16", dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    kernel = np.asarray(params["proj_out"]["kernel"], np.float32)
    np.testing.assert_array_equal(kernel, model.proj_out.weight.detach().float().numpy().T)

    config32, params32 = diffusers_sd3.load(tmp_path / "bf16")  # default: float32
    assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.float32(a), b), params, params32)
    _, scanned = diffusers_sd3.load(tmp_path / "bf16", dtype=jnp.bfloat16, scan_layers=True)
    stacked = scanned["transformer_blocks_0_2"]["attn"]["to_q"]["kernel"]
    assert stacked.dtype == jnp.bfloat16 and stacked.shape == (2, 16, 16)
    np.testing.assert_array_equal(
        stacked[1], params["transformer_blocks_1"]["attn"]["to_q"]["kernel"]
    )

    # Read as fp32 they give diffusers' fp32 output for the bf16-rounded weights
    # (the fp32 model, whose sin-cos table is not rounded to bf16 as the file's is).
    x, t, ctx, pooled = inputs("sd3")
    ref = diffusers_forward(model32, x, t, ctx, pooled)
    assert relative_error(apt_forward(config32, params32, x, t, ctx, pooled), ref) <= RTOL

    diffusers_sd3.save(config, params, tmp_path / "out", dtype="bfloat16")
    back = SD3Transformer2DModel.from_pretrained(
        tmp_path / "out", torch_dtype=torch.bfloat16, low_cpu_mem_usage=False
    )
    for key, value in model.to(torch.bfloat16).state_dict().items():
        if key != "pos_embed.pos_embed":
            assert torch.equal(back.state_dict()[key], value), key


def test_fp16_variant_and_pipeline_folder(tmp_path):
    model = make_model(seed=4)
    model.half().save_pretrained(tmp_path / "transformer", safe_serialization=True, variant="fp16")
    assert os.path.exists(tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    config, params = diffusers_sd3.load(tmp_path)  # a pipeline root: reads transformer/
    np.testing.assert_array_equal(
        np.asarray(params["context_embedder"]["kernel"]),
        model.context_embedder.weight.detach().float().numpy().T,
    )
    config2, params2 = diffusers_sd3.load(tmp_path / "transformer", variant="fp16")
    jax.tree.map(np.testing.assert_array_equal, params, params2)


# ----------------------------------------------------------------------------
# Sharded placement
# ----------------------------------------------------------------------------
def test_load_onto_mesh(saved):
    model, folder = saved("sd3.5")
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    config, reference = diffusers_sd3.load(folder)

    replicated = NamedSharding(mesh, PartitionSpec())
    _, params = diffusers_sd3.load(folder, shardings=replicated)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    for scan in (False, True):
        cfg = config.replace(scan_layers=scan)
        boxed = jax.eval_shape(lambda c=cfg: MMDiT(c).init(jax.random.key(0), *dummy_inputs(c)))
        specs = nn.get_partition_spec(boxed)["params"]
        shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
        _, params = diffusers_sd3.load(folder, shardings=shardings, scan_layers=scan)
        fsdp = params["context_embedder"]["kernel"]  # (context_in, embed): embed over fsdp
        assert fsdp.sharding.spec == PartitionSpec(None, "fsdp")
        assert len(fsdp.addressable_shards) == 8
        assert fsdp.addressable_shards[0].data.shape == (BASE["joint_attention_dim"], 16 // 4)
        jax.tree.map(
            lambda leaf, s: leaf.sharding.is_equivalent_to(s, leaf.ndim) or pytest.fail(str(s)),
            params,
            shardings,
        )
        expected = diffusers_sd3.from_diffusers_state_dict(
            cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()}
        )
        jax.tree.map(np.testing.assert_array_equal, params, expected)

    # A callable path -> sharding.
    by_embed = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    _, params = diffusers_sd3.load(
        folder,
        shardings=lambda path: (
            by_embed if path[-1] == "kernel" and path[0] == "proj_out" else replicated
        ),
    )
    assert params["proj_out"]["kernel"].sharding == by_embed
    assert params["context_embedder"]["kernel"].sharding == replicated
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    with pytest.raises(ValueError, match="shardings do not match"):
        diffusers_sd3.load(folder, shardings={"proj_out": replicated})


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------
def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
    model, _ = saved("sd3")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("proj_out.bias")
    state.pop("transformer_blocks.1.attn.to_k.weight")
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
    (tmp_path / "m").mkdir()
    save_file(state, tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    shutil.copy(saved("sd3")[1] / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match="does not match the MMDiTConfig it is loaded") as excinfo:
        diffusers_sd3.load(tmp_path / "m")
    message = str(excinfo.value)
    assert "2 missing keys" in message and "proj_out.bias" in message
    assert "transformer_blocks.1.attn.to_k.weight" in message
    assert "1 unexpected keys" in message and "attn.extra.weight" in message

    with pytest.raises(ValueError, match=r"2 missing keys \(first 10\): proj_out\.bias"):
        config = diffusers_sd3.config_from_diffusers(
            dict(model.config, _class_name="SD3Transformer2DModel")
        )
        diffusers_sd3.from_diffusers_state_dict(
            config, {k: v.detach().numpy() for k, v in state.items()}
        )


@pytest.mark.parametrize(
    "case, change, expected",
    [
        ("sd3.5", dict(dual_attention_layers=[0]), ["unexpected keys", "dual_attention_layers"]),
        ("sd3", dict(dual_attention_layers=[1]), ["missing keys", "dual_attention_layers"]),
        ("sd3.5", dict(qk_norm=None), ["unexpected keys", "norm_added_q", "qk_norm"]),
        ("sd3", dict(num_layers=2), ["unexpected keys", "num_layers (config 2"]),
        ("sd3", dict(joint_attention_dim=8), ["mis-shaped keys", "joint_attention_dim"]),
        ("sd3", dict(patch_size=1, sample_size=4), ["mis-shaped", "patch_size (config 1"]),
        ("sd3", dict(out_channels=2), ["proj_out.weight", "out_channels (config 2"]),
        ("sd3", dict(pooled_projection_dim=3), ["mis-shaped", "pooled_projection_dim"]),
        ("sd3", dict(pos_embed_max_size=12), ["pos_embed.pos_embed", "pos_embed_max_size"]),
        (
            "sd3",
            dict(num_attention_heads=4, caption_projection_dim=32),
            ["mis-shaped", "num_attention_heads * attention_head_dim (config 32, checkpoint 16)"],
        ),
        (
            "sd3.5",
            dict(num_attention_heads=4, attention_head_dim=4),
            ["mis-shaped", "attention_head_dim (config 4, checkpoint looks like 8)"],
        ),
    ],
)
def test_config_mismatch_names_the_field(case, change, expected, saved, tmp_path):
    folder = copy_with_config(saved(case)[1], tmp_path / "m", **change)
    with pytest.raises(ValueError, match="does not match the MMDiTConfig it is loaded") as excinfo:
        diffusers_sd3.load(folder)
    for fragment in expected:
        assert fragment in str(excinfo.value)


def test_position_table_is_verified(saved, tmp_path):
    # Same shapes, another base grid: only the fixed sin-cos buffer can tell.
    folder = copy_with_config(saved("sd3")[1], tmp_path / "m", sample_size=16)
    with pytest.raises(ValueError, match=r"pos_embed\.pos_embed differs .* sample_size=16"):
        diffusers_sd3.load(folder)


def test_not_an_sd3_transformer(saved, tmp_path):
    folder = copy_with_config(saved("sd3")[1], tmp_path / "m", _class_name="FluxTransformer2DModel")
    with pytest.raises(ValueError, match="not an SD3 transformer"):
        diffusers_sd3.load(folder)


def test_unknown_config_key_warns(saved, tmp_path):
    folder = copy_with_config(saved("sd3")[1], tmp_path / "m", use_rope=True)
    with pytest.warns(UserWarning, match=r"\['use_rope'\] are not SD3Transformer2DModel fields"):
        diffusers_sd3.load(folder)


def test_pickle_is_refused(saved, tmp_path):
    model, folder = saved("sd3")
    (tmp_path / "m").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "m" / "config.json")
    torch.save(model.state_dict(), tmp_path / "m" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refuses pickle") as excinfo:
        diffusers_sd3.load(tmp_path / "m")
    assert "safe_serialization=True" in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match=r"nothing-here' is not a folder"):
        diffusers_sd3.load(tmp_path / "nothing-here")


def test_save_rejects_params_in_the_wrong_layout(saved, tmp_path):
    config, params = diffusers_sd3.load(saved("sd3.5")[1], scan_layers=True)
    with pytest.raises(ValueError, match="layout does not match scan_layers=False"):
        diffusers_sd3.save(config.replace(scan_layers=False), params, tmp_path)
