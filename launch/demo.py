"""The embedded demo: the whole method on the 8x8 digits, on a laptop CPU.

  python launch/demo.py --workdir runs/demo

Trains the flow-matching SFT teacher (configs/digits_sft.py), precomputes
its 25-step solutions and distils them into a 1-step student (APT's
generator initialisation, configs/digits_distill.py:deterministic), then
evaluates teacher and student (Frechet distance in pixel space, accuracy of a
fixed classifier) and prints the results table, also written to
`<workdir>/results.{json,md}` with a PNG grid per row. Re-running resumes
finished or interrupted stages from their checkpoints.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its run.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Samples per evaluated row.")
_TINY = flags.DEFINE_bool("tiny", False, "Seconds-long smoke run with tiny configs.")


def main(argv):
    del argv
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.demo import run_demo

    print(run_demo(_WORKDIR.value, num_samples=_NUM.value, tiny=_TINY.value))


if __name__ == "__main__":
    app.run(main)
