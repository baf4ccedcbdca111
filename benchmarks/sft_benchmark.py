"""SFT step throughput, model FLOPs utilisation and compile time.

  python benchmarks/sft_benchmark.py [--batch 8] [--width 512] [--repeats 10]

MFU = XLA cost-analysis FLOPs of one compiled SFT step / step time / the
measured rate of a large fp32 matmul (2048^3) on the same machine. The model
sees 256 image tokens per sample (32x32x4 latents, 2x2 patches) plus 16
context tokens. Compile time is lower + compile of the same step at depth 4
and 24, with `nn.scan` over the layers on and off. Prints Markdown tables.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from apt_jax.tasks import build_task  # noqa: E402
from apt_jax.train import sharding  # noqa: E402
from apt_jax.train.config import model_config  # noqa: E402
from configs import digits_sft  # noqa: E402


def matmul_rate(n=2048, repeats=10) -> float:
    """Measured fp32 GEMM rate of this machine, FLOP/s (median)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def bench_config(width: int, depth: int, scan: bool, batch: int, remat: str = "none"):
    c = digits_sft.get_config()
    heads = width // 64
    c.model = model_config(
        "digits",
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        pos_embed_max_size=16,
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=64,
        caption_projection_dim=width,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        scan_layers=scan,
        remat_policy=remat,
    )
    c.context_tokens = 16
    c.batch_size = batch
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return c


def synthetic_batch(batch: int, mesh):
    rng = np.random.default_rng(0)
    local = {
        "image": rng.standard_normal((batch, 32, 32, 4)).astype(np.float32),
        "label": (np.arange(batch) % 10).astype(np.int32),
    }
    return sharding.make_global_batch(local, mesh)


def compile_step(config):
    task = build_task(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = task.init_state(jax.random.key(0))
    batch = synthetic_batch(config.batch_size, task.mesh)
    rng = jax.random.key(1)
    t = time.perf_counter()
    compiled = task.train_step.lower(state, batch, rng).compile()
    return task, compiled, state, batch, rng, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    peak = matmul_rate()
    print(f"fp32 matmul 2048^3: {peak / 1e9:.0f} GFLOP/s ({jax.devices()[0].device_kind})\n")

    print("| model | tokens/sample | batch | step ms | steps/s | GFLOP/step | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for remat in ("none", "full"):
        config = bench_config(args.width, args.depth, False, args.batch, remat)
        _, compiled, state, batch, rng, _ = compile_step(config)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost["flops"])
        state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            state, m = compiled(state, batch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        name = f"D={args.width} L={args.depth} remat={remat}"
        print(
            f"| {name} | 256+16 | {args.batch} | {dt * 1e3:.0f} | {1 / dt:.2f} | "
            f"{flops / 1e9:.1f} | {flops / dt / 1e9:.0f} | {flops / dt / peak:.0%} |"
        )

    print("\n| scan | compile s, depth 4 | compile s, depth 24 | ratio 24/4 |")
    print("|---|---|---|---|")
    for scan in (True, False):
        secs = []
        for depth in (4, 24):
            *_, seconds = compile_step(bench_config(args.width, depth, scan, args.batch))
            secs.append(seconds)
        label = "on" if scan else "off"
        print(f"| {label} | {secs[0]:.1f} | {secs[1]:.1f} | {secs[1] / secs[0]:.2f} |")


if __name__ == "__main__":
    main()
