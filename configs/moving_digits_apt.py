"""Adversarial post-training of the one-step moving-digits generator, image stage
then video stage (Seaweed-APT's schedule).

  # image stage: one-frame clips; G from the deterministic student, D from the image teacher
  python launch/train.py --config configs/moving_digits_apt.py:image --workdir runs/v_apt_image \
      --config.teacher_workdir=runs/v_sft_image --config.generator_workdir=runs/v_det
  # video stage: G from the image stage's EMA, D re-initialised from the video teacher
  python launch/train.py --config configs/moving_digits_apt.py:video --workdir runs/v_apt \
      --config.teacher_workdir=runs/v_sft --config.generator_workdir=runs/v_apt_image

The image stage is `configs/digits_apt.py`'s recipe on one-frame clips, kept
short (50 updates): D wins it within tens of updates, and a longer stage lets
G trade motion for sharper frames that the video stage then has to undo (200
updates ended 1.37x the teacher's per-frame distance). The video stage uses
the paper's video settings: D's timesteps `shift(U(0, 1), 12)` (mostly noisy
inputs, as the paper uses for its video latents), approximate-R1 sigma 0.1,
and a lower learning rate than the image stage (paper: 3e-6 after 5e-6).
Append ",tiny" for a seconds-long run.

Measured (docs/results.md#moving-digits, 1,000 clips, noise seeds 0-2): the 1-step generator after
both stages ends at 1.16x the 25-step teacher's per-frame distance with a
lower motion error than the teacher's.
"""

from apt_jax.data.registry import moving_digits_data_config
from apt_jax.train.config import model_config
from configs import digits_apt
from configs.moving_digits_sft import parse_stage


def get_config(arg: str = "video"):
    stage, tiny = parse_stage(arg, "moving_digits_apt")
    c = digits_apt.get_config("tiny" if tiny else "")
    c.model = model_config("digits-tiny-video" if tiny else "digits-video")
    if stage == "image":
        c.data = moving_digits_data_config(num_frames=1)
        if not tiny:
            c.batch_size = 64  # 36 tokens an image: half the digits recipe's batch
            c.total_steps = 50  # short: see the docstring
            c.checkpoint_every = 50
    else:
        c.data = moving_digits_data_config(num_frames=4)
        c.d_timestep_shift = 12.0
        c.r1_sigma = 0.1
        c.generator_optimizer.learning_rate *= 0.6  # 3e-6 / 5e-6, as the paper
        c.discriminator_optimizer.learning_rate *= 0.6
        if not tiny:
            c.batch_size = 32
            c.total_steps = 150
            c.checkpoint_every = 50
    c.eval.num_samples = min(c.eval.num_samples, 500)
    return c
