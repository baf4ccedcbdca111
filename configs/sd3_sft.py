"""Flow-matching SFT of SD3 / SD3.5 on your precomputed latents, from converted weights.

  python launch/convert.py --diffusers sd3-medium/transformer --out ckpt/sd3-medium --scan_layers
  python launch/prepare_latents.py --src latents/ --data_dir data --name mydata --eval_rows 16
  python launch/train.py --config configs/sd3_sft.py:sd3-medium --workdir RUN \
      --config.init_from=ckpt/sd3-medium \
      --config.data.data_dir=data --config.data.dataset=mydata

Variants: "sd3-medium" (the default), "sd3.5-medium", "sd3.5-large": the
released architectures (`apt_jax.models.get_variant`); "custom": the
architecture of whatever SD3-family transformer `init_from` holds (a fine-tune
of other widths, say; `config.model_from`); "test": the tiny test model for
smoke runs on a tiny latents dataset (no init_from needed).

The model trains on `(latent, context, pooled)` rows: text-conditioned, CFG
dropout zeroes a row's context and pooled vector (SD3). `init_from` must hold
the variant's architecture, scanned (`convert.py --scan_layers`; the config
scans layers so compile time stays flat in depth); nothing is downloaded.
Without `init_from` the MMDiT starts from a fresh init.

Settings (SD3 paper, arXiv 2403.03206, and diffusers' SD3 fine-tuning script):
logit-normal(0, 1) timesteps shifted by 3 (the paper's 1024px shift), AdamW
1e-5 with warmup, EMA, bf16 compute over fp32 parameters, full remat and FSDP
over all devices (SD3-medium at 1024px needs ~11 GiB per device at batch 1 per
device with fsdp = 8: docs/benchmarks.md#sd3-medium-memory).
"""

from apt_jax.data.registry import latents_data_config
from apt_jax.train.config import base_config, model_config

SD3_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


def get_config(variant: str = "sd3-medium"):
    variant = variant or "sd3-medium"
    if variant not in (*SD3_VARIANTS, "custom", "test"):
        raise ValueError(
            f"Unknown variant {variant!r} of sd3_sft; use one of {SD3_VARIANTS}, "
            "'custom' or 'test'."
        )
    c = base_config()
    c.task = "sft"
    c.data = latents_data_config()
    c.init_from = ""  # --config.init_from=CKPT (launch/convert.py --diffusers ... --scan_layers)
    c.total_steps = 10_000
    c.batch_size = 64
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.log_every = 50
    c.eval_every = 2000
    c.model = model_config(
        "sd3-medium" if variant == "custom" else variant,
        scan_layers=True,
        remat_policy="full",
        dtype="bfloat16",
        param_dtype="float32",
    )
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.ema_decay = 0.999

    c.flow = dict(
        density="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        shift=3.0,
        stratified=True,
        weighting="none",
        weighting_shift=3.0,
        # Condition dropout for CFG: zero context and pooled (text), not a label.
        label_dropout=0.1,
    )
    # Samples (latents + PNG of their first channels) from the held-out rows.
    c.eval.num_samples = 8
    c.eval.steps = 28
    c.eval.cfg_scale = 7.0
    c.eval.shift = 3.0
    c.eval.grid_rows = 4

    if variant == "custom":  # the architecture of whatever transformer init_from holds
        c.model_from = "init_from"
    if variant == "test":
        c.model = model_config("test")
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.total_steps = 2
        c.batch_size = 8
        c.checkpoint_every = 2
        c.log_every = 1
        c.eval_every = 0
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 1
        c.eval.num_samples = 4
        c.eval.steps = 2
        c.eval.cfg_scale = 2.0
        c.eval.grid_rows = 2
        c.progress_bar = False
    return c
