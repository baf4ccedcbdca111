"""Per-device memory of the SD3-medium flow-matching SFT train step, FSDP over 8 devices.

Ahead-of-time compiles one full train step (forward, backward, AdamW update,
EMA update; state donated) for the real SD3-medium shapes at 1024 px
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
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from apt_jax.lora import LoRA, LoRASettings  # noqa: E402
from apt_jax.models import MMDiT, dummy_inputs, get_variant, param_count  # noqa: E402
from apt_jax.models.axes import DEFAULT_RULES  # noqa: E402
from apt_jax.models.partitioning import axis_rules, logical_shardings, unbox  # noqa: E402
from apt_jax.objectives.sft import flow_matching_loss  # noqa: E402
from apt_jax.train import sharding  # noqa: E402
from apt_jax.train.lora_state import create_state, model_params  # noqa: E402
from apt_jax.train.optim import make_optimizer  # noqa: E402
from apt_jax.train.state import apply_gradients, compute_grads  # noqa: E402

GiB = 2**30
FLOW = dict(
    density="logit_normal",
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
    shift=3.0,
    stratified=True,
    weighting="none",
)
ADAMW = ml_collections.ConfigDict(
    dict(
        name="adamw",
        learning_rate=1e-5,
        schedule="constant",
        warmup_steps=0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        grad_clip_norm=1.0,
        accumulation_steps=1,
    )
)
EMA_DECAY = 0.999


def build_step(
    config, mesh, batch_size: int, latent_size: int, context_len: int, lora_settings=None
):
    """(jitted step, abstract state, abstract batch, abstract rng) for one config."""
    rules = DEFAULT_RULES
    tx = make_optimizer(ADAMW, total_steps=1000)
    model = MMDiT(config)
    lora = None
    if lora_settings is not None:
        boxed_params = jax.eval_shape(
            lambda r: model.init(r, *dummy_inputs(config))["params"], jax.random.key(0)
        )
        lora = LoRA.for_params(lora_settings, boxed_params)

    def init_boxed(rng):
        params = model.init(rng, *dummy_inputs(config))["params"]
        return create_state(params, tx, lora)

    # Shapes and logical names only: nothing is allocated.
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        unbox(boxed),
        state_shardings,
    )
    shapes = {
        "latents": (batch_size, latent_size, latent_size, config.in_channels),
        "context": (batch_size, context_len, config.joint_attention_dim),
        "pooled": (batch_size, config.pooled_projection_dim),
    }
    batch_shardings = {k: sharding.batch_sharding(mesh, len(s)) for k, s in shapes.items()}
    abstract_batch = {
        k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=batch_shardings[k])
        for k, s in shapes.items()
    }
    repl = sharding.replicated(mesh)
    abstract_rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)

    def loss_fn(params, batch, rng):
        def velocity(x, t, cond):
            return model.apply({"params": params}, x, t, cond["context"], cond["pooled"])

        cond = {"context": batch["context"], "pooled": batch["pooled"]}
        return flow_matching_loss(velocity, batch["latents"], cond, rng, FLOW)

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            rng = jax.random.fold_in(rng, state.step)
            grads, metrics = compute_grads(
                lambda p, b, r: loss_fn(model_params(state, p), b, r), state.params, batch, rng
            )
            return apply_gradients(state, grads, tx, EMA_DECAY), metrics

    step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, repl),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return step, abstract_state, abstract_batch, abstract_rng


def measure(args, remat_policy: str, compute_dtype: str, lora_rank: int = 0) -> dict:
    config = get_variant(
        "sd3-medium",
        scan_layers=True,
        remat_policy=remat_policy,
        num_layers=args.num_layers,
        dtype=compute_dtype,
        param_dtype=args.param_dtype,
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    batch = args.batch_per_device * sharding.batch_divisor(mesh)
    settings = LoRASettings(lora_rank, lora_rank, args.lora_targets) if lora_rank else None
    step, state, data, rng = build_step(
        config, mesh, batch, args.latent_size, args.context_len, settings
    )
    t0 = time.perf_counter()
    lowered = step.lower(state, data, rng)
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
