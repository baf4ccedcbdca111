"""The contract between a recipe and the training loop, and the sharded-jit helpers.

A recipe (`apt_jax.tasks.<stage>.build`) returns a `Task`; the loop
(`apt_jax.train.loop.train`), the launch scripts and the TPU planner only ever
see that. Nothing here depends on a recipe (only on the mesh, the dataset
registry and the evaluators), so `apt_jax.train` imports without
`apt_jax.tasks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from apt_jax.data import registry
from apt_jax.eval.evaluators import evaluate_and_sample
from apt_jax.models.partitioning import logical_shardings, unbox
from apt_jax.train import sharding


@dataclasses.dataclass
class Task:
    """What the training loop needs from a recipe.

    Attributes:
      config: the run's ConfigDict.
      mesh: the device mesh.
      generator: the network the run serves (`ClassConditionalMMDiT` or
        `TextConditionalMMDiT`), whose weights `generator_weights` gives.
      init_state: `rng -> state`, jitted, creating the state already sharded
        (reads the starting weights, if any, only when called).
      abstract_state: `jax.ShapeDtypeStruct` tree with the state's shardings
        (checkpoint restore target, and the input of an ahead-of-time compile).
      train_step: `(state, batch, rng) -> (state, metrics)`, jitted once with
        explicit shardings and the state donated.
      generator_weights: `(state, ema) -> GeneratorWeights` of the generator
        (`apt_jax.tasks.weights`): what is exported and what later stages
        start from.
      abstract_batch: `jax.ShapeDtypeStruct` tree of one global batch with its
        shardings, as `make_iterator`'s batches reach `train_step` (default: the
        dataset's, `registry.example_spec`).
      make_iterator: `() -> grain iterator` of this process's batches (default:
        the dataset's, `registry.iterator_factory`).

    Derived: `evaluate(state, step, out_dir) -> metrics` (samples, writes a
    grid, returns scalar metrics) and `sample(state, num, steps, cfg_scale,
    seed) -> (images, labels)`, both with the served weights
    (`apt_jax.eval.evaluators`).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    generator: Any
    init_state: Callable
    abstract_state: Any
    train_step: Callable
    generator_weights: Callable
    abstract_batch: Any = None
    make_iterator: Callable | None = None
    evaluate: Callable = dataclasses.field(init=False)
    sample: Callable = dataclasses.field(init=False)

    def __post_init__(self):
        if self.abstract_batch is None:
            example = registry.example_spec(self.config)
            self.abstract_batch = abstract_batch(example, self.config.batch_size, self.mesh)
        if self.make_iterator is None:
            self.make_iterator = registry.iterator_factory(self.config)
        self.evaluate, self.sample = evaluate_and_sample(
            self.generator, self.config, self.served_params
        )

    def served_params(self, state: Any) -> Any:
        """The full weights the run samples with: the EMA, adapters merged."""
        return self.generator_weights(state, ema=True).full()

    def abstract_rng(self) -> jax.ShapeDtypeStruct:
        """The step's rng argument as a replicated `ShapeDtypeStruct`."""
        key = jax.eval_shape(lambda: jax.random.key(0))
        return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))


def abstract_state(init_boxed: Callable, mesh: Mesh, rules) -> tuple[Any, Any]:
    """`(ShapeDtypeStructs with shardings, NamedShardings)` of `unbox(init_boxed(rng))`,
    from shapes alone (nothing is computed)."""
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )
    return abstract, shardings


def sharded_init(init_boxed: Callable, mesh: Mesh, rules) -> tuple[Callable, Any, Any]:
    """Jits `init_boxed` so the state is created directly in its shardings.

    Args:
      init_boxed: `rng -> state` whose parameter leaves are logically boxed.

    Returns:
      (init_fn, abstract_state, shardings): `init_fn(rng)` returns the unboxed,
      sharded state; `abstract_state` holds ShapeDtypeStructs with shardings.
    """
    abstract, shardings = abstract_state(init_boxed, mesh, rules)
    init_fn = jax.jit(lambda r: unbox(init_boxed(r)), out_shardings=shardings)
    return init_fn, abstract, shardings


def abstract_batch(
    example: Mapping[str, tuple[tuple[int, ...], Any]], batch_size: int, mesh: Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `batch_size` examples, each field `(shape, dtype)` of
    `example`, split over the batch axes (data, fsdp) like `make_global_batch`'s."""
    return {
        k: jax.ShapeDtypeStruct(
            (batch_size, *shape), dtype, sharding=sharding.batch_sharding(mesh, 1 + len(shape))
        )
        for k, (shape, dtype) in example.items()
    }


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """`jax.jit` with explicit in/out shardings: batch over (data, fsdp), state donated."""
    repl = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)  # a prefix: every field's axis 0
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
