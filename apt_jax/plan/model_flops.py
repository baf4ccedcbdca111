"""Model FLOPs of a train step: the matmuls the method needs, remat excluded.

The usual "6 N T" of a transformer step (2 N T forward, 4 N T backward, N
weights applied to T tokens) plus the attention scores and their weighted
sum, per network pass, counted from the architecture alone. An MMDiT has two
token streams with their own weights: the image stream's N_x applies to the
T_x image tokens, the context stream's N_c to the T_c text tokens, and the
joint attention spans T = T_x + T_c; adaLN modulation and the timestep /
pooled embedders act once per sample, not per token, and are left out (under
0.1% at 1024 px). One forward pass per sample costs

    F = 2 (N_x T_x + N_c T_c) + 4 L T^2 D  (+ 4 T_x^2 D per dual-attention block)

with width D and L blocks. A step is a sum of passes, in units of F
(`step_model_flops` says which, per recipe): a pass that trains the network
costs 3 F (forward, input gradient, weight gradient), one that is only
differentiated with respect to its input 2 F (D under G's loss, a frozen LoRA
base), a forward alone 1 F (the teacher), and an exact R1 penalty 6 F
(forward and input gradient, 2 F, differentiated again with respect to D's
weights, twice that). The compiled step's FLOPs (`apt_jax.plan.analysis`)
exceed this by what remat recomputes and by the elementwise work.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from apt_jax.data import registry
from apt_jax.models import MMDiTConfig
from apt_jax.train.config import mmdit_config

MLP_RATIO = 4  # FeedForward's hidden width over D (SD3)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Tokens of one sample: `image` (after patching) and `context` (text or label)."""

    image: int
    context: int


def sample_tokens(config: ml_collections.ConfigDict) -> Tokens:
    """The tokens one example of `config`'s dataset becomes in its MMDiT."""
    model = mmdit_config(config)
    example = registry.example_spec(config)
    x_shape = example[registry.dataset(config).x_key][0]
    if len(x_shape) == 4:  # (F, H, W, C) video
        frames, height, width = x_shape[0], x_shape[1], x_shape[2]
        image = (
            (frames // model.patch_size_t)
            * (height // model.patch_size)
            * (width // model.patch_size)
        )
    else:
        image = (x_shape[0] // model.patch_size) * (x_shape[1] // model.patch_size)
    if "context" in example:
        context = example["context"][0][0]
    else:  # class-conditional: the label embedder's tokens
        context = config.context_tokens
    return Tokens(image=int(image), context=int(context))


def stream_weights(model: MMDiTConfig) -> tuple[int, int]:
    """(N_x, N_c): matmul weights applied to each image token and each context token."""
    d, layers = model.inner_dim, model.num_layers
    patch_in = model.patch_size**2 * (model.patch_size_t or 1) * model.in_channels
    patch_out = model.patch_size**2 * (model.patch_size_t or 1) * model.out_channels
    block = 4 * d * d + 2 * MLP_RATIO * d * d  # q, k, v, out + the MLP
    n_x = patch_in * d + layers * block + len(model.dual_attention_layers) * 4 * d * d
    n_x += d * patch_out
    # The last block is context-pre-only: its context stream feeds q, k, v and stops.
    n_c = model.joint_attention_dim * d + (layers - 1) * block + 3 * d * d
    return n_x, n_c


def forward_flops(model: MMDiTConfig, tokens: Tokens) -> float:
    """F: the matmul FLOPs of one forward pass of one sample."""
    n_x, n_c = stream_weights(model)
    t = tokens.image + tokens.context
    attention = 4 * model.num_layers * t * t * model.inner_dim
    attention += 4 * len(model.dual_attention_layers) * tokens.image**2 * model.inner_dim
    return 2.0 * (n_x * tokens.image + n_c * tokens.context) + attention


def _lora(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("lora", {}).get("rank", 0))


def step_passes(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Units of F per sample of one step, by network (see the module docstring).

    Raises:
      ValueError: a task this table does not know.
    """
    trained = 2.0 if _lora(config) else 3.0  # a LoRA base gets no weight gradient
    if config.task == "sft":
        return {"generator": trained}
    if config.task == "distill":
        teacher = 0.0
        if config.get("targets", "on_the_fly") == "on_the_fly":
            guided = 2.0 if config.teacher_cfg != 1.0 else 1.0
            teacher = config.teacher_steps * guided
        student_steps = 1 if config.variant == "deterministic" else config.student_steps
        return {"teacher": teacher, "student": trained * student_steps}
    if config.task == "apt":
        # D trains in full unless LoRA puts adapters on its backbone too.
        d_lora = _lora(config) and config.lora.get("train_discriminator", False)
        d_trained = 2.0 if d_lora else 3.0
        real = {"exact": 6.0, "approx": 2 * d_trained, "none": d_trained}[config.r1_mode]
        fake = {"exact": 6.0, "approx": 2 * d_trained, "none": d_trained}[config.r2_mode]
        g_through_d = 2.0 + (1.0 if config.loss == "relativistic" else 0.0)
        return {"generator": trained, "discriminator": real + fake + g_through_d}
    raise ValueError(f"No model-FLOP table for config.task={config.task!r}.")


def step_model_flops(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one step of `config` over its global batch (all chips)."""
    f = forward_flops(mmdit_config(config), sample_tokens(config))
    return config.batch_size * f * sum(step_passes(config).values())
