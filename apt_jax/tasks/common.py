"""Pieces every recipe shares: the sharded state init, the jitted step, data,
and sampling/evaluation of a class-conditional generator.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apt_jax import sampling
from apt_jax.data import digits
from apt_jax.data.pipeline import make_train_iterator
from apt_jax.models import ClassConditionalMMDiT
from apt_jax.models.partitioning import logical_shardings, unbox
from apt_jax.train import sharding
from apt_jax.train.config import mmdit_config


@dataclasses.dataclass
class Task:
    """What the training loop needs from a recipe.

    Attributes:
      config: the run's ConfigDict.
      mesh: the device mesh.
      init_state: `rng -> state`, jitted, creating the state already sharded.
      abstract_state: `jax.ShapeDtypeStruct` tree with the state's shardings
        (checkpoint restore target).
      train_step: `(state, batch, rng) -> (state, metrics)`, jitted once with
        explicit shardings and the state donated.
      make_iterator: `() -> grain iterator` of this process's batches.
      evaluate: `(state, step, out_dir) -> metrics dict`; samples, writes a
        grid and returns scalar metrics.
      sample: `(state, num, steps, cfg_scale, seed) -> (images, labels)` with
        the generator the run serves (EMA weights where kept).
      served_params: `state -> params` of that generator (what later stages
        start from: distillation's teacher, APT's generator and discriminator).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    init_state: Callable
    abstract_state: Any
    train_step: Callable
    make_iterator: Callable
    evaluate: Callable
    sample: Callable
    served_params: Callable


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


def abstract_state(init_boxed: Callable, mesh: Mesh, rules) -> tuple[Any, Any]:
    """`(ShapeDtypeStructs with shardings, NamedShardings)` of `unbox(init_boxed(rng))`,
    from shapes alone (nothing is computed)."""
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )
    return abstract, shardings


# ---------------------------------------------------------- source runs
def run_config(workdir: str, key: str = "teacher_workdir") -> ml_collections.ConfigDict:
    """The stored config of the run in `workdir`, named by `config.<key>`; errors say how to fix."""
    from apt_jax.train.checkpoint import read_config

    if not workdir:
        raise ValueError(f"config.{key} is empty: pass --config.{key}=DIR.")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(
            f"config.{key}={workdir!r} holds no checkpoints; train that run first "
            "(see the README's recipes) or fix the path."
        )
    return ml_collections.ConfigDict(read_config(workdir))


def check_same_model(config, source_config, what: str = "teacher") -> None:
    """`config`'s model must have the architecture of the run it starts from (`what`:
    "teacher", "generator"), whose stored config is `source_config`."""
    fields = ("model", "num_classes", "context_tokens")
    diffs = []
    for f in fields:
        a, b = config.get(f), source_config.get(f)
        a = a.to_dict() if hasattr(a, "to_dict") else a
        b = b.to_dict() if hasattr(b, "to_dict") else b
        if isinstance(a, dict):
            shape_keys = [
                k
                for k in a
                if k not in ("scan_layers", "remat_policy", "attention_implementation", "dtype")
            ]
            diffs += [
                f"{f}.{k}: {b.get(k)!r} ({what}) vs {a[k]!r}"
                for k in shape_keys
                if _norm(a[k]) != _norm(b.get(k))
            ]
        elif a != b:
            diffs.append(f"{f}: {b!r} ({what}) vs {a!r}")
    if diffs:
        raise ValueError(
            f"The {what} run holds a model of another shape than config.model: "
            + "; ".join(diffs[:10])
            + f". Set the student's config to the {what}'s (e.g. --config.model.num_layers=...)."
        )


def init_from_run(
    workdir: str, make_state: Callable, gen: ClassConditionalMMDiT, mesh: Mesh, rules, shardings
) -> Callable:
    """`init_state` whose state is `make_state(params)` of the served params of `workdir`'s run.

    `shardings` are the state's; the params arrive in the generator's shardings.
    """
    boxed = jax.eval_shape(gen.init_boxed, jax.random.key(0))
    assemble = jax.jit(
        make_state, in_shardings=(logical_shardings(boxed, mesh, rules),), out_shardings=shardings
    )

    def init_state(rng):
        del rng  # the weights come from the run
        from apt_jax.tasks.runs import load_run

        task, state, _ = load_run(workdir, mesh=mesh)
        return assemble(task.served_params(state))

    return init_state


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """`jax.jit` with explicit in/out shardings: batch over (data, fsdp), state donated."""
    repl = sharding.replicated(mesh)
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )


def make_source(config: ml_collections.ConfigDict):
    """The data source named by `config.data.name` and its example shape."""
    if config.data.name == "digits":
        return digits.DigitsSource(), digits.IMAGE_SHAPE
    raise ValueError(f"config.data.name={config.data.name!r} is unknown; use 'digits'.")


def iterator_factory(config: ml_collections.ConfigDict) -> Callable:
    source, _ = make_source(config)
    return functools.partial(
        make_train_iterator,
        source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        shuffle=config.data.shuffle,
        worker_count=config.data.worker_count,
    )


def class_conditional_generator(config: ml_collections.ConfigDict) -> ClassConditionalMMDiT:
    return ClassConditionalMMDiT(mmdit_config(config), config.num_classes, config.context_tokens)


def sample_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels `i mod num_classes` (the sample.py contract)."""
    return (np.arange(num) % num_classes).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _sampler(gen: ClassConditionalMMDiT, steps: int, cfg_scale: float, shift: float):
    sigmas = sampling.shifted_linear_sigmas(steps, shift)

    @jax.jit
    def run(params, noise, labels):
        uncond = jnp.full_like(labels, gen.null_label) if cfg_scale != 1.0 else None
        return sampling.euler_sample(
            gen.velocity_fn(params), noise, sigmas, labels, uncond=uncond, cfg_scale=cfg_scale
        )

    return run


def generate(
    gen: ClassConditionalMMDiT,
    params: Any,
    *,
    num: int,
    steps: int,
    cfg_scale: float,
    shift: float,
    seed: int,
    image_shape: tuple[int, ...],
    labels: np.ndarray | None = None,
    chunk: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Euler-samples `num` images with `steps` steps; 1 step is `z - v(z, 1)`.

    Returns float32 images clipped to [-1, 1], `(num, *image_shape)`, and labels.
    The noise depends only on `seed` and `num` (not on `chunk`).
    """
    if labels is None:
        labels = sample_labels(num, gen.num_classes)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (num, *image_shape)))
    run = _sampler(gen, int(steps), float(cfg_scale), float(shift))
    out = []
    for i in range(0, num, chunk):
        out.append(np.asarray(run(params, noise[i : i + chunk], labels[i : i + chunk])))
    images = np.clip(np.concatenate(out).astype(np.float32), -1.0, 1.0)
    return images, labels


def evaluate_digits_generator(
    gen: ClassConditionalMMDiT,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int,
    out_dir: str | None,
    *,
    steps: int | None = None,
    tag: str = "",
) -> dict:
    """Samples `config.eval.num_samples`, writes a PNG grid, returns FD and accuracy."""
    from apt_jax.eval.grid import save_png_grid
    from apt_jax.eval.metrics import evaluate_digits

    _, image_shape = make_source(config)
    steps = steps or config.eval.steps
    images, labels = generate(
        gen,
        params,
        num=config.eval.num_samples,
        steps=steps,
        cfg_scale=config.eval.cfg_scale,
        shift=config.eval.shift,
        seed=config.eval.seed,
        image_shape=image_shape,
    )
    metrics = evaluate_digits(images, labels)
    if out_dir is not None and jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        rows = config.eval.grid_rows
        order = np.argsort(labels[: rows * gen.num_classes], kind="stable")
        grid = images[: rows * gen.num_classes][order]
        save_png_grid(grid, os.path.join(out_dir, f"samples{tag}_step{step}.png"), nrow=rows)
    return {f"eval{tag}/{k}": v for k, v in metrics.items() if v is not None}


def generator_functions(
    gen: ClassConditionalMMDiT, config: ml_collections.ConfigDict, served_params: Callable
) -> tuple[Callable, Callable]:
    """The `evaluate` and `sample` of a Task whose generator is `served_params(state)`."""
    _, image_shape = make_source(config)

    def evaluate(state, step, out_dir):
        return evaluate_digits_generator(gen, served_params(state), config, step, out_dir)

    def sample(state, num, steps, cfg_scale, seed):
        return generate(
            gen,
            served_params(state),
            num=num,
            steps=steps,
            cfg_scale=cfg_scale,
            shift=config.eval.shift,
            seed=seed,
            image_shape=image_shape,
        )

    return evaluate, sample
