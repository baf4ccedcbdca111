"""Flow-matching SFT of the moving-digits video teacher, image stage then video stage.

  python launch/train.py --config configs/moving_digits_sft.py:image --workdir runs/v_sft_image
  python launch/train.py --config configs/moving_digits_sft.py:video --workdir runs/v_sft \
      --config.init_workdir=runs/v_sft_image

The paper's image-then-video schedule: the image stage trains the video model
(`digits-video`: 2x2 patches, `patch_size_t=1`) on images as one-frame
videos (a digit at a random place in a 12x12 frame, 36 tokens), where
appearance is cheap to learn; the video stage starts from its weights and
trains on 4-frame clips (144 tokens) to learn motion. A one-frame clip goes
through exactly the image path (frame 0's temporal code is zero), so nothing
changes between the stages but the data. Append ",tiny" for a seconds-long run.
"""

from apt_jax.data.registry import moving_digits_data_config
from apt_jax.train.config import model_config
from configs import digits_sft

STAGES = ("image", "video")


def parse_stage(arg: str, config_name: str) -> tuple[str, bool]:
    """`(stage, tiny)` of a moving-digits config argument "image|video[,tiny]"."""
    stage, *flags = (arg or "video").split(",")
    if stage not in STAGES or set(flags) - {"tiny"}:
        raise ValueError(
            f"Unknown variant {arg!r} of {config_name}; use 'image' or 'video', "
            "optionally followed by ',tiny'."
        )
    return stage, bool(flags)


def get_config(arg: str = "video"):
    stage, tiny = parse_stage(arg, "moving_digits_sft")
    c = digits_sft.get_config("tiny" if tiny else "")
    c.model = model_config("digits-tiny-video" if tiny else "digits-video")
    if stage == "image":
        c.data = moving_digits_data_config(num_frames=1)
        if not tiny:
            c.total_steps = 1000  # a digit anywhere in the frame: slower to learn than 8x8
    else:
        c.data = moving_digits_data_config(num_frames=4)
        # From the image stage (--config.init_workdir), on clips: 144 tokens a
        # sample, so a smaller batch, and a lower rate than from scratch.
        if not tiny:
            c.total_steps = 300
            c.batch_size = 32
            c.optimizer.learning_rate = 5e-4
            c.optimizer.warmup_steps = 20
            c.checkpoint_every = 100
        c.eval.grid_rows = 10
    c.eval.num_samples = min(c.eval.num_samples, 500)
    return c
