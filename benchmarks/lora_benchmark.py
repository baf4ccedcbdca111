"""Full-parameter vs LoRA SFT step: optimizer-state bytes, state bytes, step time.

  python benchmarks/lora_benchmark.py [--batch 8] [--width 512] [--rank 16] [--repeats 10]

The SFT benchmark's model (`benchmarks/sft_benchmark.py`: 256 image + 16
context tokens, depth 4, one device, fp32). The LoRA rows adapt the listed
modules at rank r over a frozen base: the freshly initialised full model,
saved once as a run so the LoRA task starts from it exactly as it would from
a trained one. Step time is the median of `--repeats` steps after a warm-up
step. Prints a Markdown table.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from apt_jax.train.checkpoint import Checkpointer  # noqa: E402
from benchmarks.sft_benchmark import bench_config, compile_step  # noqa: E402
from configs.digits_distill_lora import BLOCK_LAYERS  # noqa: E402

ATTENTION = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out"


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(config, repeats: int):
    task, compiled, state, batch, rng, compile_s = compile_step(config)
    row = dict(
        trained=sum(x.size for x in jax.tree.leaves(state.params)),
        opt=nbytes(state.opt_state),
        state=nbytes(state),
        compile=compile_s,
    )
    state, m = compiled(state, batch, rng)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    row["step"] = statistics.median(times)
    return task, state, row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    full = bench_config(args.width, args.depth, False, args.batch)
    task, state, full_row = measure(full, args.repeats)
    rows = [("full", "every weight", full_row)]
    with tempfile.TemporaryDirectory() as base_run:
        with Checkpointer(base_run, async_save=False) as ckpt:
            ckpt.save(0, task.init_state(jax.random.key(0)), config=full)
        del task, state
        for name, targets in (("attention", ATTENTION), ("blocks", BLOCK_LAYERS)):
            c = bench_config(args.width, args.depth, False, args.batch)
            c.init_workdir = base_run
            c.lora.rank, c.lora.alpha, c.lora.target_modules = args.rank, args.rank, targets
            _, _, row = measure(c, args.repeats)
            rows.append((f"LoRA r={args.rank}", name, row))

    print(
        f"D={args.width} L={args.depth}, 256+16 tokens, batch {args.batch}, fp32, AdamW, "
        f"{jax.devices()[0].device_kind}\n"
    )
    print(
        "| training | adapted | trained params | optimizer state MiB | train state MiB "
        "| step ms | step / full | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref = full_row["step"]
    for training, adapted, r in rows:
        print(
            f"| {training} | {adapted} | {r['trained'] / 1e6:.2f} M | {r['opt'] / 2**20:.1f} | "
            f"{r['state'] / 2**20:.1f} | {r['step'] * 1e3:.0f} | {r['step'] / ref:.2f} | "
            f"{r['compile']:.1f} |"
        )


if __name__ == "__main__":
    main()
