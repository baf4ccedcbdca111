"""Precompute a teacher's ODE solutions as distillation targets (DiffSynth-style rows).

  python launch/make_targets.py --teacher_workdir runs/sft --num 4000 --steps 25 \
      --cfg 1.0 --out runs/targets.npz

Rows: `seed, label, target` (+ the teacher's steps, CFG and shift). Train on
them with `--config.targets=precomputed --config.targets_path=runs/targets.npz`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_TEACHER = flags.DEFINE_string("teacher_workdir", None, "The teacher run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Output .npz.")
_NUM = flags.DEFINE_integer("num", 4000, "Rows.")
_STEPS = flags.DEFINE_integer("steps", 25, "Teacher Euler steps.")
_CFG = flags.DEFINE_float("cfg", 1.0, "Teacher guidance scale.")
_SHIFT = flags.DEFINE_float("shift", 1.0, "Time shift of the teacher's schedule.")
_SEED = flags.DEFINE_integer("first_seed", 0, "Seed of row 0 (row i uses first_seed + i).")
_NEG = flags.DEFINE_integer("negative_label", -1, "Negative class for CFG (-1: null class).")
_SCHEDULE = flags.DEFINE_enum(
    "schedule", "linear", ["linear", "diffusers"], "Teacher sigmas (config.teacher_schedule)."
)
flags.mark_flags_as_required(["teacher_workdir", "out"])


def main(argv):
    del argv
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.tasks.distill import make_targets

    rows = make_targets(
        _TEACHER.value,
        _OUT.value,
        num=_NUM.value,
        steps=_STEPS.value,
        cfg_scale=_CFG.value,
        shift=_SHIFT.value,
        first_seed=_SEED.value,
        negative_label=_NEG.value,
        schedule=_SCHEDULE.value,
    )
    print(f"Wrote {len(rows['seed'])} targets to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main, workdir=lambda: os.path.dirname(os.path.abspath(_OUT.value)))
