"""Logical axis names used by every module in `apt_jax.models`.

Parameters and activations are annotated with these names only; the mapping
from logical names to mesh axes (`data`, `fsdp`, `tensor`) lives in the
config (`config.sharding.logical_axis_rules`), so one model definition runs
unsharded, FSDP-sharded or tensor-parallel without edits. A name missing
from the rules is replicated.
"""

# Parameter axes.
EMBED = "embed"  # model width D (inner_dim = heads * head_dim).
MLP = "mlp"  # feed-forward hidden width (4 D).
HEADS = "heads"  # fused heads * head_dim output of q/k/v projections.
HEAD_DIM = "head_dim"  # per-head width (QK RMSNorm scales).
MODULATION = "modulation"  # adaLN outputs (k * D chunks of shift/scale/gate).
PATCH = "patch"  # flattened patch features (p * p * C); latent channels of the patch kernel.
PATCH_T = "patch_t"  # temporal taps of the patch kernel (pt).
PATCH_H = "patch_h"  # row taps of the patch kernel (p).
PATCH_W = "patch_w"  # column taps of the patch kernel (p).
CONTEXT_IN = "context_in"  # joint_attention_dim of the text encoder states.
POOLED_IN = "pooled_in"  # pooled_projection_dim of the pooled text vector.
FREQ = "freq"  # sinusoidal timestep features (256).
CLASSES = "classes"  # rows of the label embedding table.
LAYERS = "layers"  # stacked layers under nn.scan.

# Activation axes (distinct from parameter axes so that FSDP, which shards
# parameters' EMBED axis, does not also shard activations along width).
BATCH = "batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_HEAD_DIM = "act_head_dim"
ACT_MLP = "act_mlp"

# Sensible default rules for a (data, fsdp, tensor) mesh: batch over data and
# fsdp, parameters' width over fsdp, heads / MLP width over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_HEAD_DIM, None),
    (ACT_MLP, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (MODULATION, "tensor"),
    (PATCH, None),
    (PATCH_T, None),
    (PATCH_H, None),
    (PATCH_W, None),
    (CONTEXT_IN, None),
    (POOLED_IN, None),
    (FREQ, None),
    (CLASSES, None),
    (LAYERS, None),
)
