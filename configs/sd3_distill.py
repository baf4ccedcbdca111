"""Distil SD3 / SD3.5 into a one-step (deterministic) or K-step (direct) student,
on your latents dataset, text-conditioned.

  python launch/train.py --config configs/sd3_distill.py:sd3-medium,deterministic \
      --workdir RUN --config.init_from=ckpt/sd3-medium \
      --config.data.data_dir=data --config.data.dataset=mydata

The argument is `MODEL[,VARIANT]`: MODEL one of "sd3-medium" (the default),
"sd3.5-medium", "sd3.5-large", "custom" (the architecture of whatever
transformer `init_from` holds: `config.model_from`), "test" (the tiny test
model); VARIANT "deterministic" (the default: APT's generator initialisation,
one step) or "direct" (DiffSynth's direct distillation, `student_steps`
steps). The keys are `configs/digits_distill.py`'s.

The teacher is a converted checkpoint (`config.init_from`) or a text SFT run of
this library (`config.teacher_workdir`); the student starts as its copy. The
teacher's targets are its `teacher_steps`-step Euler ODE solutions with CFG
`teacher_cfg` against the dataset's negative prompt embedding (the encoded
empty prompt from `launch/encode.py` by default), on SD3's shifted schedule
(`teacher_shift` 3). The APT paper's teacher samples with CFG 7.5 and 25
steps: its deterministic distillation regresses the one-step student onto
those. Precomputed targets (`launch/make_targets.py --teacher_workdir RUN`,
rows keyed by dataset row and seed) need a teacher run.
"""

from apt_jax.data.registry import latents_data_config
from apt_jax.train.config import base_config, model_config

SD3_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
MODELS = (*SD3_VARIANTS, "custom", "test")
VARIANTS = ("deterministic", "direct")


def get_config(arg: str = "sd3-medium,deterministic"):
    model, *rest = (arg or "sd3-medium").split(",")
    variant = rest[0] if rest else "deterministic"
    if model not in MODELS or variant not in VARIANTS or len(rest) > 1:
        raise ValueError(
            f"Unknown variant {arg!r} of sd3_distill; use MODEL[,VARIANT] with MODEL one of "
            f"{MODELS} and VARIANT one of {VARIANTS}."
        )
    c = base_config()
    c.task = "distill"
    c.variant = variant
    c.data = latents_data_config()
    c.init_from = ""  # the teacher: a converted checkpoint (launch/convert.py --scan_layers) ...
    c.teacher_workdir = ""  # ... or a text SFT run
    c.model = model_config(
        "sd3-medium" if model == "custom" else model,
        scan_layers=True,
        remat_policy="full",
        dtype="bfloat16",
        param_dtype="float32",
    )
    if model == "custom":
        c.model_from = "init_from"
    c.mesh.data = 1
    c.mesh.fsdp = -1

    # Teacher ODE: N Euler steps, CFG against the negative prompt, SD3's shift.
    c.teacher_steps = 25
    c.teacher_cfg = 7.5
    c.teacher_shift = 3.0
    # The pipeline's own sigmas: the targets are what diffusers' SD3 pipeline gives
    # for the same noise, steps and CFG ("linear": shift(linspace(1, 0))).
    c.teacher_schedule = "diffusers"
    c.teacher_negative_label = -1  # class-conditional runs only
    c.targets = "on_the_fly"  # or "precomputed" (launch/make_targets.py)
    c.targets_path = ""

    # Student sampler: 1 step for deterministic, K steps for direct.
    c.student_steps = 1 if variant == "deterministic" else 4
    c.student_shift = 3.0
    c.remat_steps = True  # direct: recompute each step's activations in backward

    c.total_steps = 2000
    c.batch_size = 64
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 10
    c.eval_every = 500
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 1e-4
    c.ema_decay = 0.999

    # The student's samples from the held-out rows' embeddings (latents .npz).
    c.eval.num_samples = 8
    c.eval.steps = c.student_steps
    c.eval.shift = c.student_shift
    c.eval.cfg_scale = 1.0
    c.eval.grid_rows = 4

    if model == "test":
        c.model = model_config("test")
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.total_steps = 2
        c.batch_size = 8
        c.checkpoint_every = 2
        c.log_every = 1
        c.eval_every = 0
        c.teacher_steps = 3
        c.teacher_cfg = 2.0
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 1
        c.eval.num_samples = 4
        c.eval.grid_rows = 2
        c.progress_bar = False
    return c
