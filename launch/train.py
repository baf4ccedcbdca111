"""Train any recipe: `python launch/train.py --config configs/X.py --workdir DIR`.

Overrides: `--config.key=value` (e.g. `--config.total_steps=100`). Running
again on the same workdir resumes from the newest checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.tasks import build_task
    from apt_jax.train.loop import train

    logging.set_verbosity(logging.INFO)
    results = train(build_task(_CONFIG.value), _WORKDIR.value)
    if jax.process_index() == 0:
        print({k: round(float(v), 4) for k, v in results.items()})


if __name__ == "__main__":
    app.run(main)
