"""Distil the moving-digits video teacher into a 1-step (deterministic) or K-step
(direct) student, on 4-frame clips.

  python launch/make_targets.py --teacher_workdir runs/v_sft --out runs/v_targets.npz --num 1024
  python launch/train.py --config configs/moving_digits_distill.py:deterministic \
      --workdir runs/v_det --config.teacher_workdir=runs/v_sft \
      --config.targets=precomputed --config.targets_path=runs/v_targets.npz

Arguments and settings as `configs/digits_distill.py`; the model and data are
the video teacher's (`configs/moving_digits_sft.py:video`). A clip costs 4x an
image's tokens, so the batch is 32.
"""

from apt_jax.data.registry import moving_digits_data_config
from apt_jax.train.config import model_config
from configs import digits_distill


def get_config(arg: str = "deterministic"):
    c = digits_distill.get_config(arg)
    tiny = "tiny" in (arg or "").split(",")
    c.model = model_config("digits-tiny-video" if tiny else "digits-video")
    c.data = moving_digits_data_config(num_frames=4)
    if not tiny:
        c.batch_size = 32
        c.total_steps = 300 if c.variant == "deterministic" else 60
        c.checkpoint_every = 100
    c.eval.num_samples = min(c.eval.num_samples, 500)
    return c
