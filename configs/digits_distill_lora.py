"""LoRA distillation of the digits SFT teacher: the student trains rank-16 adapters
on the teacher's frozen weights (`apt_jax.lora`), which are its base.

  python launch/train.py --config configs/digits_distill_lora.py:deterministic \
      --workdir runs/det_lora --config.teacher_workdir=runs/sft

Arguments as `configs/digits_distill.py` (`deterministic` | `direct`, `,tiny`).
The rest of the recipe is that file's; what differs is `config.lora` and the
learning rate (adapters start at zero and move the weights by a low-rank
update, so they take a larger step than full fine-tuning; LoRA practice is
~10x).
"""

from configs import digits_distill

# Every dense layer inside the blocks: the joint attention and both feed-forwards.
BLOCK_LAYERS = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out,fc_in,fc_out"


def get_config(arg: str = "deterministic"):
    c = digits_distill.get_config(arg)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.target_modules = BLOCK_LAYERS
    c.optimizer.learning_rate = 3e-3
    return c
