"""The networks a config asks for, and whether their step fits the mesh.

The generator's conditioning follows the data (`apt_jax.data.registry`):
class labels through a label embedder, or the dataset's text embeddings.
APT's discriminator shares the generator's backbone architecture.
"""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from apt_jax.data import registry
from apt_jax.models import APTDiscriminator, ClassConditionalMMDiT, TextConditionalMMDiT
from apt_jax.train import sharding
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


def check_batch_and_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch splits over `mesh`'s batch axes and processes, and the
    mesh and batch are not ones XLA is known to miscompile for this model
    (`sharding.known_miscompile`, docs/miscompile.md); raises before compiling."""
    model = mmdit_config(config)
    example = registry.example_spec(config)  # once: a latents dataset's metadata is read
    sample_shape, _ = example[registry.dataset(config).x_key]
    text = registry.conditioning(config) == "text"
    context = example["context"][0][0] if text else config.context_tokens
    accumulation = config.get("optimizer", {}).get("accumulation_steps", 1)
    sharding.check_batch_size(
        config.batch_size,
        mesh,
        width=model.inner_dim,
        tokens_per_example=sharding.mmdit_token_streams(model, sample_shape, context),
        rules=config.logical_axis_rules,
        microbatches=accumulation,
    )
