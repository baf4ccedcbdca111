"""Distil the digits SFT teacher into a 1-step (deterministic) or K-step (direct) student.

  python launch/train.py --config configs/digits_distill.py:deterministic \
      --workdir runs/det --config.teacher_workdir=runs/sft
  python launch/train.py --config configs/digits_distill.py:direct \
      --workdir runs/direct --config.teacher_workdir=runs/sft

Append ",tiny" to the variant (`:deterministic,tiny`) for a seconds-long run.
Precomputed targets: `python launch/make_targets.py --teacher_workdir runs/sft
--out runs/targets.npz`, then `--config.targets=precomputed
--config.targets_path=runs/targets.npz`.
"""

from apt_jax.train.config import base_config, model_config


def get_config(arg: str = "deterministic"):
    variant, *flags = (arg or "deterministic").split(",")
    c = base_config()
    c.task = "distill"
    c.variant = variant
    c.teacher_workdir = ""
    c.model = model_config("digits")  # must equal the teacher's

    # Teacher ODE: N Euler steps, CFG g against the null class (or a fixed
    # negative label >= 0), on a shifted linear schedule.
    c.teacher_steps = 25
    c.teacher_cfg = 1.0
    c.teacher_shift = 1.0
    c.teacher_negative_label = -1
    c.targets = "on_the_fly"  # or "precomputed" (launch/make_targets.py)
    c.targets_path = ""

    # Student sampler: 1 step for deterministic, K steps for direct.
    c.student_steps = 1 if variant == "deterministic" else 4
    c.student_shift = 1.0
    c.remat_steps = True  # direct: recompute each step's activations in backward

    # Measured on digits (docs/results.md): the 1-step student converges in ~300 steps;
    # a direct step costs ~5x a deterministic one (K = 4 student passes through
    # backprop) and the 4-step student, starting from the teacher, needs ~60.
    c.total_steps = 300 if variant == "deterministic" else 60
    c.batch_size = 128
    c.checkpoint_every = c.total_steps
    c.log_every = 50
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "constant"
    c.ema_decay = 0.99

    c.eval.num_samples = 1000
    c.eval.steps = c.student_steps
    c.eval.shift = c.student_shift

    if "tiny" in flags:
        c.total_steps = 4
        c.batch_size = 16
        c.checkpoint_every = 2
        c.log_every = 2
        c.optimizer.warmup_steps = 1
        c.teacher_steps = 3
        c.model = model_config("digits-tiny")
        c.eval.num_samples = 20
        c.eval.grid_rows = 2
        c.progress_bar = False
    unknown = set(flags) - {"tiny"}
    if variant not in ("deterministic", "direct") or unknown:
        raise ValueError(
            f"Unknown variant {arg!r} of digits_distill; use 'deterministic' or 'direct', "
            "optionally followed by ',tiny'."
        )
    return c
