"""LoRA SFT on digits: rank-16 adapters trained by flow matching on the frozen
weights of an earlier SFT run (`init_workdir`).

  python launch/train.py --config configs/digits_sft_lora.py --workdir runs/sft_lora \
      --config.init_workdir=runs/sft

Arguments as `configs/digits_sft.py` ("" or "tiny"); the recipe is that
file's except `config.lora`, the learning rate and a shorter run.
"""

from configs import digits_sft
from configs.digits_distill_lora import BLOCK_LAYERS


def get_config(variant: str = ""):
    c = digits_sft.get_config(variant)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.target_modules = BLOCK_LAYERS
    if not variant:
        c.total_steps = 300
        c.checkpoint_every = 300
    return c
