"""One-step video on moving digits: the whole image-then-video method on a laptop CPU.

  python launch/video_demo.py --workdir runs/video_demo

Trains the video teacher (image stage, then clips), distils its 25-step
solutions into a 1-step student, runs APT's image stage then its video stage,
and evaluates the 25-step teacher against the 1-step generators (per-frame
Frechet distance and digit accuracy, motion error). Prints the results table,
also written to `<workdir>/results.{json,md}`, with a PNG strip and a GIF per
row and `comparison.gif`. Re-running resumes finished or interrupted stages.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/video_demo", "Where every stage writes its run.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Clips per evaluated row.")
_TINY = flags.DEFINE_bool("tiny", False, "Seconds-long smoke run with tiny configs.")


def main(argv):
    del argv
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.video_demo import run_video_demo

    print(run_video_demo(_WORKDIR.value, num_samples=_NUM.value, tiny=_TINY.value))


if __name__ == "__main__":
    app.run(main)
