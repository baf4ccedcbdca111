"""Forward + backward time of the attention implementations, and how far they agree.

Times `jax.vjp` of `apt_jax.models.layers.dot_product_attention` (output and
the three input gradients) for each `attention_implementation` on random
`(B, T, H, 64)` inputs, medians of `--repeats` runs after one warm-up, and
prints the largest differences to "xla" (apt_jax's kernel). "cudnn" runs
only on a GPU and needs a 16-bit dtype and, for the flash kernel, T % 64 == 0.

    python benchmarks/attention_kernels.py                 # the torch_vs_jax_step shapes, fp32
    python benchmarks/attention_kernels.py --batch 4 --tokens 4352 --heads 24 \\
        --dtype bfloat16                                    # SD3-medium widths, on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apt_jax.models.layers import dot_product_attention  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=288)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args()


def main(args):
    on_gpu = jax.default_backend() == "gpu"
    impls = ["xla", "xla_autodiff"] + (["cudnn"] if on_gpu and args.dtype != "float32" else [])
    rng = np.random.default_rng(0)
    shape = (args.batch, args.tokens, args.heads, 64)
    q, k, v, g = (jnp.asarray(rng.normal(size=shape), args.dtype) for _ in range(4))
    results = {}
    for impl in impls:

        def fwd_bwd(q, k, v, g, impl=impl):
            out, vjp = jax.vjp(lambda *a: dot_product_attention(*a, impl), q, k, v)
            return out, vjp(g)

        step = jax.jit(fwd_bwd)
        out, grads = jax.block_until_ready(step(q, k, v, g))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(q, k, v, g))
            times.append(time.perf_counter() - t0)
        as32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        results[impl] = (float(np.median(times)), as32(out), [as32(d) for d in grads])

    print(
        f"Attention forward + backward, (B, T, H, K) = {shape}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, median of {args.repeats}:"
    )
    print()
    print("| implementation | ms | time / xla | max abs out diff | max grad diff / max grad |")
    print("|---|---:|---:|---:|---:|")
    t_ref, out_ref, grads_ref = results["xla"]
    for impl, (t, out, grads) in results.items():
        pairs = zip(grads, grads_ref, strict=True)
        rel = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in pairs)
        print(
            f"| {impl} | {1e3 * t:.2f} | {t / t_ref:.2f} | "
            f"{float(np.max(np.abs(out - out_ref))):.1e} | {rel:.1e} |"
        )


if __name__ == "__main__":
    main(parse_args())
