"""One-step video on moving digits: the whole image-then-video method on a laptop CPU.

  python launch/video_demo.py --workdir runs/video_demo [--tiny]

Trains the video teacher (image stage on one-frame clips, then clips;
configs/moving_digits_sft.py), distils its 25-step solutions into a 1-step
student (configs/moving_digits_distill.py), runs APT's image stage then its
video stage (configs/moving_digits_apt.py), and evaluates the 25-step teacher
against the 1-step generators (per-frame Frechet distance and digit accuracy,
motion error; means over the noise seeds `--seeds`, default 0,1,2, each seed's
distance and motion error beside). Prints a line per stage and the results table, also written to
`<workdir>/results.{json,md}`, with a PNG strip and a GIF per row,
`comparison.gif` and `comparison.png`. Re-running resumes interrupted stages
and keeps finished ones. Logs: `<workdir>/logs/video_demo.log`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)

from absl import flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/video_demo", "Where every stage writes its run.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Clips per evaluated row.")
_SEEDS = flags.DEFINE_list(
    "seeds", ["0", "1", "2"], "Noise seeds; the table gives each row's means over them."
)
_TINY = flags.DEFINE_bool(
    "tiny", False, "A smoke run of a minute or two: the recipes' tiny variants."
)


def main(argv):
    del argv
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax import stages

    tiny = _TINY.value
    recipe = cli.recipes(os.path.join(REPO, "configs"), "tiny" if tiny else "")

    pipeline = stages.moving_digits_demo(
        sft_image=recipe("moving_digits_sft", "image"),
        sft_video=recipe("moving_digits_sft", "video"),
        deterministic=recipe("moving_digits_distill", "deterministic"),
        apt_image=recipe("moving_digits_apt", "image"),
        apt_video=recipe("moving_digits_apt", "video"),
        num_targets=32 if tiny else 1024,
        num_samples=_NUM.value,
        seeds=tuple(int(seed) for seed in _SEEDS.value),
    )
    print(stages.run(pipeline, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main, workdir=_WORKDIR, create_workdir=True)
