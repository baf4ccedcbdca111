"""LoRA SFT of SD3 / SD3.5 on your precomputed latents: rank-16 adapters on the
attention projections (DiffSynth-Studio's default `lora_target_modules`) over
the frozen converted weights.

  python launch/train.py --config configs/sd3_sft_lora.py:sd3-medium --workdir RUN \
      --config.init_from=ckpt/sd3-medium \
      --config.data.data_dir=data --config.data.dataset=mydata
  python launch/convert.py --to-diffusers --lora --workdir RUN --out RUN/lora

Arguments as `configs/sd3_sft.py`; the recipe is that file's except
`config.lora` and the learning rate (1e-4: adapters start at zero and take
larger steps than full fine-tuning's 1e-5, as in diffusers' SD3 LoRA script).
The exported file loads with diffusers' `StableDiffusion3Pipeline.load_lora_weights`.
"""

from configs import sd3_sft

# DiffSynth-Studio's `lora_target_modules` for MMDiT, plus the output projections.
SD3_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out,to_add_out"


def get_config(variant: str = "sd3-medium"):
    c = sd3_sft.get_config(variant)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.target_modules = SD3_TARGETS
    c.optimizer.learning_rate = 1e-4
    return c
