"""The embedded demo: the whole method on the 8x8 digits, on a laptop CPU.

  python launch/demo.py --workdir runs/demo [--tiny]

Trains the flow-matching SFT teacher (configs/digits_sft.py), precomputes its
25-step solutions and distils them into a 1-step student (APT's generator
initialisation, configs/digits_distill.py:deterministic), post-trains that
student adversarially (configs/digits_apt.py, cut to 100 updates), then
evaluates the 25- and 1-step teacher, the student and the APT generator
(Frechet distance in pixel space, accuracy of a fixed classifier; means over
the noise seeds `--seeds`, default 0,1,2, each seed's distance beside). Prints a
line per stage and the results table, also written to
`<workdir>/results.{json,md}`, with a PNG grid per row and `comparison.png`
(a row per model, digits 0-9 from the same noise). Re-running resumes
interrupted stages and keeps finished ones. `--tiny`: a smoke run of a minute
or two with the recipes' tiny variants. Logs: `<workdir>/logs/demo.log`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)

from absl import flags  # noqa: E402

from apt_jax import cli  # noqa: E402

# The recipe's 400 APT updates would take the demo past 10 minutes on a 2-core
# CPU; docs/results.md has the full run.
DEMO_APT_UPDATES = 100

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its run.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Samples per evaluated row.")
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

    apt = recipe("digits_apt")
    if not tiny:
        apt.total_steps = DEMO_APT_UPDATES
    pipeline = stages.digits_demo(
        sft=recipe("digits_sft"),
        deterministic=recipe("digits_distill", "deterministic"),
        apt=apt,
        num_targets=64 if tiny else 4000,
        num_samples=_NUM.value,
        seeds=tuple(int(seed) for seed in _SEEDS.value),
    )
    print(stages.run(pipeline, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main, workdir=_WORKDIR, create_workdir=True)
