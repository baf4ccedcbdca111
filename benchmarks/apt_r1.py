"""Exact R1 (`jax.grad`, double backward) vs the paper's approximate R1: time and memory.

  python benchmarks/apt_r1.py [--batch 4] [--width 256] [--depth 4] [--repeats 5]

For each R1 mode (approx, exact, none) and remat policy (none, full) it
compiles, with the library's own `APTStep`:
  D step    one discriminator update (`APTStep.discriminator_update`);
  APT step  the whole step: G forward, D update, G update through the new D;
and prints the median step time and the compiled program's temporary memory
(`compiled.memory_analysis().temp_size_in_bytes`: activations and other
scratch, the part R1 changes; parameters and optimizer state are identical
across modes). Latents are 32x32x4 with 2x2 patches: 256 image tokens per
sample, plus one context token (class-conditional). fp32, one device.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from apt_jax.models import APTDiscriminator, ClassConditionalMMDiT, get_variant  # noqa: E402
from apt_jax.models.partitioning import unbox  # noqa: E402
from apt_jax.objectives.apt import APTLossSettings  # noqa: E402
from apt_jax.tasks.apt import APTStep  # noqa: E402
from apt_jax.train.optim import make_optimizer  # noqa: E402
from apt_jax.train.state import create_train_state  # noqa: E402

RMSPROP = dict(name="rmsprop", learning_rate=1e-5, rmsprop_decay=0.9)


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(width: int, depth: int, remat: str, r1_mode: str):
    config = get_variant(
        "digits",
        sample_size=32,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        num_layers=depth,
        num_attention_heads=width // 64,
        attention_head_dim=64,
        joint_attention_dim=width,
        caption_projection_dim=width,
        pooled_projection_dim=width,
        pos_embed_max_size=16,
        remat_policy=remat,
    )
    gen = ClassConditionalMMDiT(config, num_classes=10)
    disc = APTDiscriminator(config, num_classes=10)
    settings = APTLossSettings(r1_mode=r1_mode)  # lambda 100, sigma 0.01 / weight 0.01
    tx = make_optimizer(RMSPROP, 1000)
    step = APTStep(gen, disc, settings, tx, tx, ema_decay=0.995)
    g_params = unbox(jax.jit(gen.init_boxed)(jax.random.key(0)))
    d_params = unbox(jax.jit(disc.init_boxed)(jax.random.key(1), g_params))
    state = {
        "generator": create_train_state(g_params, tx),
        "discriminator": create_train_state(d_params, tx, ema=False),
    }
    return step, state


def measure(width, depth, batch, remat, r1_mode, repeats):
    step, state = build(width, depth, remat, r1_mode)
    real = jax.random.normal(jax.random.key(2), (batch, 32, 32, 4))
    labels = jnp.arange(batch) % 10
    fake = jax.random.normal(jax.random.key(3), real.shape)
    rng = jax.random.key(4)
    d_fn = jax.jit(lambda d: step.discriminator_update(d, real, fake, labels, rng)[0])
    full_fn = jax.jit(lambda s: step(s, {"image": real, "label": labels}, rng)[0])
    rows = {}
    for name, fn, arg in (
        ("D step", d_fn, state["discriminator"]),
        ("APT step", full_fn, state),
    ):
        compiled = fn.lower(arg).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        rows[name] = (median_time(compiled, arg, repeats=repeats), temp)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(
        f"# APT R1 modes: width {a.width}, depth {a.depth}, batch {a.batch}, "
        f"256 image tokens/sample, fp32, {jax.devices()[0].device_kind}\n"
    )
    results = {}
    for remat in ("none", "full"):
        for mode in ("approx", "exact", "none"):
            results[remat, mode] = measure(a.width, a.depth, a.batch, remat, mode, a.repeats)
    for part in ("D step", "APT step"):
        print(f"## {part}\n")
        print("| remat | R1 | time (s) | temp MiB | time / approx | temp / approx |")
        print("| --- | --- | --- | --- | --- | --- |")
        for remat in ("none", "full"):
            t0, m0 = results[remat, "approx"][part]
            for mode in ("approx", "exact", "none"):
                t, m = results[remat, mode][part]
                mib = m / 2**20
                cells = [remat, mode, f"{t:.3f}", f"{mib:.1f}", f"{t / t0:.2f}", f"{m / m0:.2f}"]
                print("| " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
