"""Flow-matching SFT of a class-conditional MMDiT teacher on the embedded digits.

  python launch/train.py --config configs/digits_sft.py --workdir runs/sft

Variants (`--config configs/digits_sft.py:tiny`): "tiny" is a seconds-long run
for tests and smoke checks.
"""

from apt_jax.train.config import base_config, model_config


def get_config(variant: str = ""):
    c = base_config()
    c.task = "sft"
    c.total_steps = 800
    c.batch_size = 128
    c.checkpoint_every = 500
    c.log_every = 50
    c.model = model_config("digits")
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.ema_decay = 0.995
    c.init_workdir = ""  # start from this run's served weights (LoRA: the frozen base)

    c.flow = dict(
        density="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        shift=1.0,
        stratified=True,
        weighting="none",
        weighting_shift=3.0,
        label_dropout=0.1,
    )
    c.eval.num_samples = 1000
    c.eval.steps = 25
    c.eval.cfg_scale = 1.0

    if variant == "tiny":
        c.total_steps = 6
        c.batch_size = 16
        c.checkpoint_every = 3
        c.log_every = 2
        c.optimizer.warmup_steps = 2
        c.model = model_config("digits-tiny")
        c.eval.num_samples = 40
        c.eval.steps = 2
        c.eval.grid_rows = 4
        c.progress_bar = False
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of digits_sft; use '' or 'tiny'.")
    return c
