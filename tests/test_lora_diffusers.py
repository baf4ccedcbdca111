"""LoRA adapters exported to diffusers: `StableDiffusion3Pipeline.load_lora_weights` (PEFT)
applies them to a tiny SD3 transformer exactly as apt_jax's merged weights do.

Skipped where torch, diffusers or peft are not installed (requirements-test.txt).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_convert_diffusers import (  # noqa: E402
    apt_forward,
    diffusers_forward,
    make_model,
    relative_error,
)

from apt_jax.convert import diffusers_lora, diffusers_sd3  # noqa: E402
from apt_jax.lora import LoRA, LoRASettings  # noqa: E402

# SD3.5-style: QK norms and dual-attention blocks (attn2 is adapted too); with
# scan_layers blocks 0-1 are one stacked run of two layers.
OVERRIDES = dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1))
RANK, ALPHA = 4, 6.0
RTOL = 1e-4


def sample_inputs(batch=2, h=8, w=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 4, h, w)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, size=(batch,)).astype(np.float32)
    ctx = rng.normal(size=(batch, 5, 12)).astype(np.float32)
    pooled = rng.normal(size=(batch, 10)).astype(np.float32)
    return x, t, ctx, pooled


def pipeline(transformer):
    """A StableDiffusion3Pipeline holding only the transformer (no text encoders, no VAE)."""
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_base")
    make_model(seed=3, **OVERRIDES).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow  # heavy: builds a diffusers pipeline with PEFT per case
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_exported_adapters_load_into_diffusers_pipeline(base_folder, tmp_path, scan_layers):
    config, params = diffusers_sd3.load(base_folder, scan_layers=scan_layers)
    # Every dense layer (attention, attn2, feed-forwards, adaLN, embedders, output).
    lora = LoRA.for_params(LoRASettings(RANK, ALPHA, ("*",)), params)
    assert any("attn2" in n for n in lora.module_names)
    adapters = lora.init(params, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 2 * len(lora.targets)))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_B" else x,
        adapters,
    )
    args = sample_inputs()
    base = apt_forward(config, params, *args)
    adapted = apt_forward(config, lora.merge(params, adapters), *args)
    assert relative_error(adapted, base) > 0.05  # the adapters matter

    file = diffusers_lora.save_adapters(config, lora, adapters, tmp_path / "lora", root="")
    pipe = pipeline(
        diffusers.SD3Transformer2DModel.from_pretrained(base_folder, low_cpu_mem_usage=False)
    )
    pipe.load_lora_weights(str(tmp_path / "lora"))
    peft_config = pipe.transformer.peft_config["default_0"]
    assert (peft_config.r, peft_config.lora_alpha) == (RANK, ALPHA)
    # PEFT put an adapter on every targeted module, one per layer of a scanned run.
    per_layer = sum(shape[0] if len(shape) == 3 else 1 for _, shape in lora.targets)
    adapted_modules = [
        m for m in pipe.transformer.modules() if "default_0" in getattr(m, "lora_A", {})
    ]
    assert len(adapted_modules) == per_layer
    assert any(len(shape) == 3 for _, shape in lora.targets) == scan_layers
    err = relative_error(diffusers_forward(pipe.transformer, *args), adapted)
    print(f"scan_layers={scan_layers}: diffusers+PEFT vs apt_jax merged, relative {err:.2e}")
    assert err <= RTOL

    # The file reads back into the same adapters.
    lora2, adapters2 = diffusers_lora.load_adapters(config, file, root="")
    assert lora2.targets == lora.targets and lora2.settings.scale == lora.settings.scale
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(adapters2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Merged into the base and exported through the weight converter: a plain SD3
    # folder with the adapted model's outputs.
    diffusers_lora.save_merged(config, lora, params, adapters, tmp_path / "merged", root="")
    merged = diffusers.SD3Transformer2DModel.from_pretrained(
        tmp_path / "merged", low_cpu_mem_usage=False
    )
    assert relative_error(diffusers_forward(merged, *args), adapted) <= RTOL


def test_adapters_outside_the_mmdit_do_not_export(base_folder, tmp_path):
    config, params = diffusers_sd3.load(base_folder)
    tree = {"mmdit": params, "heads": {"proj": {"kernel": np.zeros((8, 1), np.float32)}}}
    lora = LoRA.for_params(LoRASettings(2, 2.0, ("to_q", "heads/proj")), tree)
    with pytest.raises(ValueError, match="heads/proj has no diffusers name"):
        diffusers_lora.save_adapters(config, lora, lora.init(tree), tmp_path)


@pytest.mark.slow
def test_launch_convert_exports_a_lora_run(tmp_path):
    """`launch/convert.py --lora` writes a LoRA run's EMA adapters; diffusers applies them to
    the exported base exactly as the run's merged export (and apt_jax) computes."""
    from test_convert_launch import random_params, run_convert

    from apt_jax.models import MMDiT
    from apt_jax.tasks import build_task
    from apt_jax.train import sharding
    from apt_jax.train.checkpoint import Checkpointer
    from apt_jax.train.config import mmdit_config
    from configs import digits_sft

    one = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    config = digits_sft.get_config("tiny")
    task = build_task(config, one)
    state = task.init_state(jax.random.key(0))
    base_mmdit = random_params(mmdit_config(config))
    state = state.replace(ema_params=dict(state.ema_params, mmdit=base_mmdit))
    with Checkpointer(tmp_path / "base_run", async_save=False) as ckpt:
        ckpt.save(1, state, config=config)

    lora_config = digits_sft.get_config("tiny")
    lora_config.init_workdir = str(tmp_path / "base_run")
    lora_config.update_from_flattened_dict({"lora.rank": 3, "lora.alpha": 6.0})
    lora_task = build_task(lora_config, one)
    lora_state = lora_task.init_state(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(4), 100))
    ema = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_B" else x,
        lora_state.ema_params,
    )
    lora_state = lora_state.replace(ema_params=ema)
    with Checkpointer(tmp_path / "lora_run", async_save=False) as ckpt:
        ckpt.save(1, lora_state, config=lora_config)

    run_convert("--to-diffusers", "--workdir", tmp_path / "base_run", "--out", tmp_path / "base")
    run_convert(
        "--to-diffusers", "--lora", "--workdir", tmp_path / "lora_run", "--out", tmp_path / "lora"
    )
    run_convert("--to-diffusers", "--workdir", tmp_path / "lora_run", "--out", tmp_path / "merged")

    pipe = pipeline(
        diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "base", low_cpu_mem_usage=False)
    )
    x, t, _, _ = sample_inputs(h=8, w=8, seed=1)
    ctx = np.random.default_rng(2).normal(size=(2, 5, 64)).astype(np.float32)
    pooled = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    x = x[:, :1]  # digits: one channel
    base = diffusers_forward(pipe.transformer, x, t, ctx, pooled)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = diffusers_forward(pipe.transformer, x, t, ctx, pooled)
    merged = diffusers.SD3Transformer2DModel.from_pretrained(
        tmp_path / "merged", low_cpu_mem_usage=False
    )
    ours = MMDiT(mmdit_config(lora_config)).apply(
        {"params": lora_task.served_params(lora_state)["mmdit"]},
        x.transpose(0, 2, 3, 1),
        t,
        ctx,
        pooled,
    )
    assert relative_error(with_lora, base) > 0.05
    assert relative_error(with_lora, np.asarray(ours)) <= RTOL
    assert relative_error(diffusers_forward(merged, x, t, ctx, pooled), with_lora) <= RTOL
