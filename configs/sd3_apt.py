"""Adversarial post-training (Seaweed-APT) of SD3 / SD3.5 on your precomputed latents.

  python launch/train.py --config configs/sd3_apt.py:sd3-medium --workdir RUN \
      --config.init_from=ckpt/sd3-medium \
      --config.generator_init_from=ckpt/sd3-medium-distilled \
      --config.data.data_dir=data --config.data.dataset=mydata

Variants: "sd3-medium" (the default), "sd3.5-medium", "sd3.5-large";
"custom": the architecture of the transformer `init_from` holds
(`config.model_from`); "test" is the tiny test model for smoke runs.

Where the networks start (`apt_jax.tasks.apt.sources`), all converted
checkpoints (`launch/convert.py --diffusers ... --scan_layers`):
  D's backbone  `init_from`: the diffusion model (the paper's teacher).
  G             `generator_init_from`: a one-step student of it, e.g. a
                deterministic-distillation model exported and converted; when
                unset, G starts from `init_from` too, i.e. the raw model used
                as `G(z, c) = z - v(z, 1, c)`: its one-step samples are the
                blurry mean prediction, and APT has to do the whole job (the
                paper starts from a distilled generator).
Runs (`teacher_workdir`, `generator_workdir`: text-conditioned runs of this
library on the same dataset) may replace either. Nothing downloads.

Paper settings (image stage, arXiv 2501.08316): RMSProp alpha 0.9, lr 5e-6 for
G and D, no clipping; non-saturating loss; approximate R1 with lambda 100,
sigma 0.01; D noising `t ~ shift(U(0, 1), 1)`; EMA 0.995. The paper's batch is
9062; set `batch_size` to what your mesh holds. The digits' notes (docs/results.md)
found AAPT's relativistic loss steadier at toy scale: `--config.loss=relativistic`.
"""

from apt_jax.data.registry import latents_data_config
from apt_jax.train.config import base_config, model_config, rmsprop_config

SD3_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


def get_config(variant: str = "sd3-medium"):
    variant = variant or "sd3-medium"
    if variant not in (*SD3_VARIANTS, "custom", "test"):
        raise ValueError(
            f"Unknown variant {variant!r} of sd3_apt; use one of {SD3_VARIANTS}, "
            "'custom' or 'test'."
        )
    c = base_config()
    c.task = "apt"
    c.data = latents_data_config()
    c.init_from = ""  # D's backbone (and G unless generator_init_from / generator_workdir)
    c.generator_init_from = ""
    c.teacher_workdir = ""
    c.generator_workdir = ""
    c.model = model_config(
        "sd3-medium" if variant == "custom" else variant,
        scan_layers=True,
        remat_policy="full",
        dtype="bfloat16",
        param_dtype="float32",
    )
    c.mesh.data = 1
    c.mesh.fsdp = -1
    del c["optimizer"]  # one per role instead
    c.generator_optimizer = rmsprop_config(5e-6)
    c.discriminator_optimizer = rmsprop_config(5e-6)
    c.ema_decay = 0.995
    c.ema_warmup = True

    c.loss = "nonsaturating"
    c.r1_mode = "approx"
    c.r2_mode = "none"
    c.r1_weight = 100.0
    c.r1_sigma = 0.01
    c.r1_exact_weight = -1.0  # < 0: lambda * sigma^2
    c.gp_weight = 10.0
    c.d_timestep_shift = 1.0
    c.d_head_layers = ()  # () -> default_head_layers(depth): 16/36, 26/36, 36/36

    c.discriminator_warmup_steps = 0  # the paper's D and G start together
    c.total_steps = 350
    c.batch_size = 256
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.log_every = 10
    c.eval_every = 50

    # One-step samples from the held-out rows' embeddings.
    c.eval.num_samples = 8
    c.eval.steps = 1
    c.eval.cfg_scale = 1.0
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
        c.eval.num_samples = 4
        c.eval.grid_rows = 2
        c.progress_bar = False
    return c
