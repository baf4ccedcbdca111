"""LoRA APT on digits: the one-step generator trains rank-16 adapters on the
(frozen) weights of the generator run; the discriminator trains in full
unless `--config.lora.train_discriminator=True` (then adapters on its
backbone, its fresh heads in full).

  python launch/train.py --config configs/digits_apt_lora.py --workdir runs/apt_lora \
      --config.teacher_workdir=runs/sft --config.generator_workdir=runs/det_lora

Arguments as `configs/digits_apt.py` ("" or "tiny"); the recipe is that
file's except `config.lora` and G's learning rate (10x, as LoRA practice).
`generator_workdir` may be a LoRA run: its served weights (base + EMA
adapters, merged) are the new base.
"""

from configs import digits_apt
from configs.digits_distill_lora import BLOCK_LAYERS


def get_config(variant: str = ""):
    c = digits_apt.get_config(variant)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.target_modules = BLOCK_LAYERS
    c.generator_optimizer.learning_rate *= 10
    return c
