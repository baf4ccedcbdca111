"""The config keys every recipe shares, their defaults and their validation.

Each stage (`apt_jax.tasks.<stage>`) validates its own keys on top of these;
the dataset keys are the registry's (`apt_jax.data.registry`).

Recipe configs (`configs/*.py`) start from `base_config()` and override. Code
never reads a global config: the ConfigDict is passed down explicitly.
"""

from __future__ import annotations

import ml_collections

from apt_jax.data import registry
from apt_jax.errors import UserError
from apt_jax.models import MMDiTConfig, axes, get_variant


def model_config(variant: str, **overrides) -> ml_collections.ConfigDict:
    """`config.model`: every `MMDiTConfig` field, so any can be overridden by flag."""
    return ml_collections.ConfigDict(get_variant(variant, **overrides).to_dict())


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128  # global, over all devices and processes
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.log_every = 50
    c.eval_every = 0  # 0: evaluate only at the end
    c.progress_bar = True

    c.model = model_config("digits")
    # A params checkpoint written by launch/convert.py to start the MMDiT from
    # ("": a fresh init); see apt_jax.tasks.sft and apt_jax.tasks.apt.
    c.init_from = ""
    # A config key naming a converted checkpoint whose architecture replaces
    # config.model's ("": config.model as written); the `custom` variants of the
    # SD3 recipes set "init_from" (apt_jax.tasks.runs.resolve_model).
    c.model_from = ""
    # Class-conditional recipes: labels -> (context, pooled) via LabelEmbedder.
    c.num_classes = 10
    c.context_tokens = 1

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multislice: slices per axis (DCN); the sizes above are then per slice.
    c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.logical_axis_rules = [list(r) for r in axes.DEFAULT_RULES]

    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            schedule="constant",
            warmup_steps=100,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            rmsprop_decay=0.9,
            momentum=0.0,
            grad_clip_norm=1.0,
            accumulation_steps=1,
        )
    )
    c.ema_decay = 0.999
    c.ema_warmup = True  # decay min(d, (1 + n) / (10 + n)) over the first updates

    # LoRA (apt_jax.lora): rank 0 trains every weight; rank > 0 trains adapters
    # `W + (alpha / rank) A B` on the dense layers `target_modules` selects
    # (comma-separated globs on parameter paths, or "re:<regex>"), base frozen.
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            target_modules="to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out",
            modules_to_save="",
            init_seed=0,
            train_discriminator=False,  # APT: adapters on D's backbone too (heads in full)
        )
    )

    c.data = ml_collections.ConfigDict(dict(name="digits", worker_count=0, shuffle=True))

    # Evaluation during training and defaults of launch/sample.py.
    c.eval = ml_collections.ConfigDict(
        dict(num_samples=500, steps=25, cfg_scale=1.0, shift=1.0, grid_rows=10, seed=1234)
    )
    return c


def rmsprop_config(learning_rate: float) -> ml_collections.ConfigDict:
    """An optimizer block (`config.*_optimizer`) for APT's RMSProp: alpha 0.9, constant
    rate, no warm-up, no clipping, no accumulation (the paper's settings)."""
    return ml_collections.ConfigDict(
        dict(
            name="rmsprop",
            learning_rate=learning_rate,
            schedule="constant",
            warmup_steps=0,
            rmsprop_decay=0.9,
            eps=1e-8,
            grad_clip_norm=0.0,
            accumulation_steps=1,
        )
    )


def mmdit_config(config: ml_collections.ConfigDict) -> MMDiTConfig:
    """The `MMDiTConfig` described by `config.model` (validated on construction)."""
    return MMDiTConfig(**config.model.to_dict())


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks the shared keys; raises ValueError naming the key and the fix."""
    for key in ("total_steps", "batch_size", "checkpoint_every"):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"config.{key} must be a positive int, got {value!r}.")
    if config.get("log_every", 1) <= 0:
        raise UserError("config.log_every must be a positive int.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"config.ema_decay={config.ema_decay} must be in [0, 1).")
    # Contradictory model fields raise here; the dataset must fit the model.
    registry.validate_keys(config, mmdit_config(config))
