"""Open a finished (or running) training run from its workdir alone."""

from __future__ import annotations

import jax
import ml_collections

from apt_jax.tasks import build_task
from apt_jax.tasks.common import Task
from apt_jax.train import sharding
from apt_jax.train.checkpoint import Checkpointer


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
