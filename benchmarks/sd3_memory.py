"""Per-device memory of the SD3-medium flow-matching SFT train step, FSDP over 8 devices.

Ahead-of-time compiles the real train step of `configs/sd3_sft.py`
(`apt_jax.tasks.sft`, built with `build_task(config, check_sources=False)`:
forward, backward, AdamW update, EMA update; state donated) for the real
SD3-medium shapes at 1024 px
(latents 128x128x16, 333 context tokens of width 4096, pooled 2048) on 8
simulated CPU devices with mesh (data=1, fsdp=8, tensor=1), from abstract
inputs only (no weight is ever materialised), and prints
`compiled.memory_analysis()` per device as a Markdown table.

    python benchmarks/sd3_memory.py                      # 24 layers, remat none/full, fp32
    python benchmarks/sd3_memory.py --compute_dtypes float32,bfloat16
    python benchmarks/sd3_memory.py --num_layers 2 --latent_size 32   # quick smoke run
    python benchmarks/sd3_memory.py --lora_ranks 0,16 --remat_policies full   # full vs LoRA

`--lora_ranks`: 0 trains every weight; r > 0 trains rank-r adapters on the
joint attention's projections (`--lora_targets`), base frozen (`apt_jax.lora`).

The numbers are XLA:CPU's buffer assignment; GPU/TPU compilers schedule and
fuse differently (and may use fused attention), so read them as estimates of
the accelerator footprint, not as exact figures.
"""

from __future__ import annotations

import os
import sys

# 8 simulated devices: must be set before JAX starts its backend.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from apt_jax.models import param_count  # noqa: E402
from apt_jax.tasks import build_task  # noqa: E402
from configs import sd3_sft  # noqa: E402

GiB = 2**30


def sft_config(args, remat_policy: str, compute_dtype: str, lora_rank: int):
    """`configs/sd3_sft.py:sd3-medium` at the benchmark's sizes, on (data=1, fsdp=8)."""
    config = sd3_sft.get_config("sd3-medium")
    config.model.num_layers = args.num_layers
    config.model.remat_policy = remat_policy
    config.model.dtype = compute_dtype
    config.model.param_dtype = args.param_dtype
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1
    config.batch_size = args.batch_per_device * 8
    # Batch shapes from the config alone: no dataset is opened.
    config.data.latent_size = args.latent_size
    config.data.context_length = args.context_len
    config.data.data_dir, config.data.dataset = "unused", "unused"
    if lora_rank:
        config.lora.rank = config.lora.alpha = lora_rank
        config.lora.target_modules = args.lora_targets
        config.init_from = "abstract"  # LoRA needs a base; nothing is read when compiling
    return config


def measure(args, remat_policy: str, compute_dtype: str, lora_rank: int = 0) -> dict:
    """Compiles the real `apt_jax.tasks.sft` step from abstract inputs; its memory."""
    config = sft_config(args, remat_policy, compute_dtype, lora_rank)
    task = build_task(config, check_sources=False)
    state = task.abstract_state
    t0 = time.perf_counter()
    lowered = task.train_step.lower(state, task.abstract_batch, task.abstract_rng())
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return dict(
        remat=remat_policy,
        param_dtype=args.param_dtype,
        compute_dtype=compute_dtype,
        num_layers=args.num_layers,
        params=param_count(state.base if lora_rank else state.params),
        lora_rank=lora_rank,
        trained=param_count(state.params),
        argument=arg,
        output=out,
        alias=alias,
        temp=temp,
        # Donated outputs reuse their argument buffers.
        total=arg + out - alias + temp,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
    )


def markdown(rows: list[dict], args) -> str:
    tokens = (args.latent_size // 2) ** 2
    lines = [
        f"SD3-medium SFT step, {rows[0]['num_layers']} layers "
        f"({rows[0]['params'] / 1e9:.3f} B params), mesh data=1 fsdp=8 tensor=1, "
        f"batch {args.batch_per_device}/device, latents {args.latent_size}x{args.latent_size}x16 "
        f"({tokens} image + {args.context_len} text tokens), AdamW + EMA, XLA:CPU "
        "memory_analysis per device (GiB):",
        "",
        "| trained | remat | params | compute | arguments | outputs | aliased | temp | total "
        "| compile s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trained = (
            f"LoRA r={r['lora_rank']} ({r['trained'] / 1e6:.1f} M)" if r["lora_rank"] else "all"
        )
        lines.append(
            f"| {trained} | {r['remat']} | {r['param_dtype']} | {r['compute_dtype']} "
            f"| {r['argument'] / GiB:.2f} | {r['output'] / GiB:.2f} | {r['alias'] / GiB:.2f} "
            f"| {r['temp'] / GiB:.2f} | {r['total'] / GiB:.2f} "
            f"| {r['lower_s'] + r['compile_s']:.0f} |"
        )
    lines.append("")
    lines.append("total = arguments + outputs - aliased (donated state) + temp.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_layers", type=int, default=24)
    parser.add_argument("--remat_policies", default="none,full")
    parser.add_argument("--compute_dtypes", default="float32")
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--batch_per_device", type=int, default=1)
    parser.add_argument("--latent_size", type=int, default=128)
    parser.add_argument("--context_len", type=int, default=333)
    parser.add_argument("--lora_ranks", default="0", help="0: all weights; r: LoRA rank r.")
    parser.add_argument("--lora_targets", default="to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj")
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    if jax.device_count() < 8:
        raise SystemExit(f"Need 8 devices, have {jax.device_count()}; check XLA_FLAGS.")

    rows = []
    for dtype in args.compute_dtypes.split(","):
        for policy, rank in [
            (p, int(r)) for p in args.remat_policies.split(",") for r in args.lora_ranks.split(",")
        ]:
            row = measure(args, policy, dtype, rank)
            print(
                f"remat={policy} compute={dtype} lora={rank}: temp {row['temp'] / GiB:.2f} GiB, "
                f"total {row['total'] / GiB:.2f} GiB (compiled in {row['compile_s']:.0f} s)",
                flush=True,
            )
            rows.append(row)
    print()
    print(markdown(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
