"""One module per training stage; `build_task(config)` picks it by `config.task`."""

from __future__ import annotations

import ml_collections

from apt_jax.tasks import apt, distill, sft
from apt_jax.tasks.common import Task

BUILDERS = {"sft": sft.build, "distill": distill.build, "apt": apt.build}


def build_task(config: ml_collections.ConfigDict, mesh=None) -> Task:
    if config.task not in BUILDERS:
        raise ValueError(f"config.task={config.task!r} is unknown; use one of {sorted(BUILDERS)}.")
    return BUILDERS[config.task](config, mesh)
