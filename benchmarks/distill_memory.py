"""Peak memory of the direct-distillation step, with and without per-step remat.

  python benchmarks/distill_memory.py --teacher_workdir runs/demo/sft [--steps 4] [--batch 128]

Compiles the real `configs/digits_distill.py:direct` step (abstract inputs)
and prints `memory_analysis()` of the compiled step as a Markdown table.
Gradients flow through all K student steps: without remat the backward pass
keeps every step's activations, with remat only the K sampler states.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from apt_jax.tasks import build_task  # noqa: E402
from apt_jax.train import sharding  # noqa: E402
from configs import digits_distill  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher_workdir", default="runs/demo/sft")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()

    print("| student steps | remat per step | temp MiB | arguments MiB | outputs MiB |")
    print("|---|---|---|---|---|")
    for remat in (False, True):
        c = digits_distill.get_config("direct")
        c.teacher_workdir = args.teacher_workdir
        c.student_steps = args.steps
        c.batch_size = args.batch
        c.remat_steps = remat
        task = build_task(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
        batch = {
            "image": jax.ShapeDtypeStruct((args.batch, 8, 8, 1), "float32"),
            "label": jax.ShapeDtypeStruct((args.batch,), "int32"),
        }
        rng = jax.eval_shape(lambda: jax.random.key(0))
        mem = task.train_step.lower(task.abstract_state, batch, rng).compile().memory_analysis()
        mib = 1 / 2**20
        print(
            f"| {args.steps} | {'on' if remat else 'off'} | {mem.temp_size_in_bytes * mib:.1f} | "
            f"{mem.argument_size_in_bytes * mib:.1f} | {mem.output_size_in_bytes * mib:.1f} |"
        )


if __name__ == "__main__":
    main()
