"""LoRA APT of SD3 / SD3.5: the one-step generator trains rank-16 adapters on
the attention projections over its frozen converted weights; the
discriminator trains in full (`--config.lora.train_discriminator=True`:
adapters on its backbone too, its fresh heads in full).

  python launch/train.py --config configs/sd3_apt_lora.py:sd3-medium --workdir RUN \
      --config.init_from=ckpt/sd3-medium --config.generator_init_from=ckpt/one-step \
      --config.data.data_dir=data --config.data.dataset=mydata

Arguments as `configs/sd3_apt.py`; the recipe is that file's except
`config.lora` and G's learning rate (10x, as LoRA practice).
"""

from configs import sd3_apt
from configs.sd3_sft_lora import SD3_TARGETS


def get_config(variant: str = "sd3-medium"):
    c = sd3_apt.get_config(variant)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.target_modules = SD3_TARGETS
    c.generator_optimizer.learning_rate *= 10
    return c
