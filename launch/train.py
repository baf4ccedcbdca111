"""Train any recipe: `python launch/train.py --config configs/X.py --workdir DIR`.

Overrides: `--config.key=value` (e.g. `--config.total_steps=100`). Running
again on the same workdir resumes from the newest checkpoint.

Multi-host: run the same command on every host, with `--multihost=auto` on
TPU pods / Slurm / MPI (JAX detects the cluster), or with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` anywhere
(see apt_jax/train/distributed.py and docs/scale_out.md). SIGTERM on any host makes
every host save at the same step and exit 0.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])
_MULTIHOST = flags.DEFINE_enum(
    "multihost",
    "off",
    ["off", "auto"],
    "'auto': jax.distributed.initialize() detects the cluster (TPU pods, Slurm, MPI).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0; with --num_processes, --process_id."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
    del argv
    import jax

    from apt_jax.train import distributed

    # Before anything touches a backend; under app.run, so grain's worker
    # processes (which re-import __main__) do not initialise it again.
    distributed.initialize(
        _MULTIHOST.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.tasks import build_task
    from apt_jax.train.loop import train

    results = train(build_task(_CONFIG.value), _WORKDIR.value)
    if jax.process_index() == 0:
        print({k: round(float(v), 4) for k, v in results.items()})


if __name__ == "__main__":
    cli.run(main, workdir=_WORKDIR, create_workdir=True)
