"""Linen modules: the MMDiT generator, its label embedder, its text-conditioned form,
the APT discriminator.

Only this package imports `flax.linen`; everything else moves plain pytrees.
"""

from apt_jax.models.apt_discriminator import APTDiscriminator
from apt_jax.models.class_conditional import ClassConditionalMMDiT
from apt_jax.models.config import (
    RELEASED_PARAMETER_COUNTS,
    VARIANTS,
    MMDiTConfig,
    get_variant,
)
from apt_jax.models.discriminator import APTHeads, CrossAttentionHead, default_head_layers
from apt_jax.models.label_embedder import LabelEmbedder
from apt_jax.models.layout import stack_layers, unstack_layers
from apt_jax.models.mmdit import (
    MMDiT,
    abstract_params,
    dummy_inputs,
    init_params,
    layer_runs,
    param_count,
)
from apt_jax.models.text_conditional import TextConditionalMMDiT

__all__ = [
    "APTDiscriminator",
    "APTHeads",
    "CrossAttentionHead",
    "default_head_layers",
    "ClassConditionalMMDiT",
    "TextConditionalMMDiT",
    "MMDiT",
    "MMDiTConfig",
    "LabelEmbedder",
    "VARIANTS",
    "RELEASED_PARAMETER_COUNTS",
    "get_variant",
    "init_params",
    "abstract_params",
    "dummy_inputs",
    "param_count",
    "layer_runs",
    "stack_layers",
    "unstack_layers",
]
