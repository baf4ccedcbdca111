"""The networks a config asks for.

The generator's conditioning follows the data (`apt_jax.data.registry`):
class labels through a label embedder, or the dataset's text embeddings.
APT's discriminator shares the generator's backbone architecture.
"""

from __future__ import annotations

import ml_collections

from apt_jax.data import registry
from apt_jax.models import APTDiscriminator, ClassConditionalMMDiT, TextConditionalMMDiT
from apt_jax.train.config import mmdit_config

Generator = ClassConditionalMMDiT | TextConditionalMMDiT


def make_generator(config: ml_collections.ConfigDict) -> Generator:
    """The generator `config.model` and `config.data` describe."""
    if registry.conditioning(config) == "text":
        return TextConditionalMMDiT(mmdit_config(config))
    return ClassConditionalMMDiT(mmdit_config(config), config.num_classes, config.context_tokens)


def make_discriminator(config: ml_collections.ConfigDict) -> APTDiscriminator:
    """APT's discriminator: the generator's MMDiT backbone and `config.d_head_layers` heads."""
    layers = tuple(config.d_head_layers) or None
    return APTDiscriminator(
        mmdit_config(config),
        config.num_classes,
        config.context_tokens,
        head_layers=layers,
        conditioning=registry.conditioning(config),
    )
