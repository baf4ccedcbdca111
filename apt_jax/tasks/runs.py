"""Build a stage's task from a config, and open a run from its workdir alone.

Each stage module (`sft`, `distill`, `apt`) registers its `build` under its
`config.task` name with `@register`; `apt_jax.tasks` imports them all, so
`build_task` knows every stage. Stages that start from another run (a teacher,
a generator) open it with `load_run`, which builds that run's task in turn:
the registry is what lets that recursion go without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from apt_jax.convert.params_checkpoint import read_mmdit_config
from apt_jax.errors import UserError
from apt_jax.train import sharding
from apt_jax.train.checkpoint import Checkpointer
from apt_jax.train.task import Task

_BUILDERS: dict[str, Callable[..., Task]] = {}


def register(name: str) -> Callable:
    """Registers `build(config, mesh=None, *, check_sources=True) -> Task` as the
    builder of `config.task == name`."""

    def add(build: Callable[..., Task]) -> Callable[..., Task]:
        _BUILDERS[name] = build
        return build

    return add


def task_names() -> list[str]:
    return sorted(_BUILDERS)


def build_task(config: ml_collections.ConfigDict, mesh=None, *, check_sources: bool = True) -> Task:
    """The `Task` of `config.task`.

    Args:
      config: the run's ConfigDict.
      mesh: where the state lives (default `config.mesh` over all devices).
      check_sources: read what the run starts from now (the dataset's metadata,
        source runs' and converted checkpoints' configs) so a mismatch fails
        before anything compiles. False builds from the config alone (shapes and
        shardings), as an ahead-of-time compile needs; those files are then read
        only when `init_state` / `make_iterator` are called.
    """
    if config.task not in _BUILDERS:
        raise UserError(f"config.task={config.task!r} is unknown; use one of {task_names()}.")
    return _BUILDERS[config.task](resolve_model(config), mesh, check_sources=check_sources)


# MMDiTConfig fields that say how the network runs, not what it is.
RUNTIME_FIELDS = ("remat_policy", "attention_implementation", "dtype")
# What a run's own config keeps when the architecture comes from a checkpoint
# (`resolve_model`): how it runs, lays out (scan) and stores its weights.
RUN_OWN_FIELDS = (*RUNTIME_FIELDS, "scan_layers", "param_dtype")


def resolve_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `config.model`'s architecture read from the converted checkpoint
    that `config.model_from` names (a config key, e.g. "init_from"), the run's
    own fields kept (`RUN_OWN_FIELDS`); unchanged when `model_from` is
    empty. The copy's `model_from` is cleared, so the run's stored config
    describes its model without the checkpoint.

    Raises:
      ValueError: `model_from` names an empty key or a folder without a checkpoint.
    """
    key = config.get("model_from", "")
    if not key:
        return config
    path = config.get(key, "")
    if not path:
        raise UserError(
            f"config.model_from={key!r} takes the architecture from config.{key}, which is "
            f"empty: pass --config.{key}=CKPT (launch/convert.py --diffusers ... --scan_layers)."
        )
    try:
        theirs = read_mmdit_config(path).to_dict()
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"config.{key}={path!r} (config.model_from): {e}") from e
    model = {**theirs, **{k: config.model[k] for k in RUN_OWN_FIELDS}}
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model = ml_collections.ConfigDict(model)
    resolved.model_from = ""
    return resolved


def load_run(workdir: str, step: int | None = None, mesh=None) -> tuple[Task, object, int]:
    """Rebuilds a run's task from its stored config and restores its state.

    Args:
      workdir: the run's `--workdir`.
      step: checkpoint step (default: newest).
      mesh: where to place the state; default the run's own mesh if this
        machine has enough devices, else a single device.

    Returns:
      (task, state, step).

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
    """
    with Checkpointer(workdir, read_only=True, async_save=False) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint under {workdir}/checkpoints: train it first with "
                f"`python launch/train.py --config ... --workdir {workdir}`."
            )
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        if mesh is None:
            try:
                mesh = sharding.make_mesh(config.mesh)
                sharding.check_batch_size(config.batch_size, mesh)
            except ValueError:
                mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        task = build_task(config, mesh)
        state, restored = ckpt.restore(step, abstract_state=task.abstract_state)
    return task, state, restored
