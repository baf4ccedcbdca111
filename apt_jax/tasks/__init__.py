"""One module per training stage; `build_task(config)` picks it by `config.task`.

Importing the stage modules registers their builders (`runs.register`).
"""

from apt_jax.tasks import apt, distill, sft  # noqa: F401  (registers the builders)
from apt_jax.tasks.runs import build_task, load_run, task_names

__all__ = ["build_task", "load_run", "task_names"]
