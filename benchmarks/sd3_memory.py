"""SD3 / SD3.5 recipes compiled for TPU slices: memory, FLOPs, time bound, one row each.

A thin loop over `apt_jax.plan` (the code behind `launch/compile.py`): for
every variant x recipe x topology it compiles the recipe's real train step
with the TPU compiler (libtpu, no TPU: `pip install -r requirements-tpu.txt`)
at 1024 px (128x128 latents, 333 context tokens) and prints one Markdown row
per compile. docs/tpu_planning.md holds its tables.

    python benchmarks/sd3_memory.py --variants sd3-medium --recipes sft,apt-approx,apt-exact \
        --topologies v5e-16,v5p-8 --find_batch --json rows.json
    python benchmarks/sd3_memory.py --from_json rows.json        # the table again, no compile
    python benchmarks/sd3_memory.py --recipes sft --topologies v5e-16 \
        --set model.remat_policy=dots --batch_per_replica 2

Recipes: sft, sft-lora (configs/sd3_sft*.py), distill-deterministic,
distill-direct (configs/sd3_distill.py), apt-approx, apt-exact, apt-none
(configs/sd3_apt.py with that `r1_mode`), apt-lora. `--set KEY=VALUE`
overrides a config key in every row (values are read as Python literals when
they parse, else as strings).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apt_jax.plan import topology  # noqa: E402  (imports no JAX)

topology.prepare_environment()  # before JAX starts: compile on the CPU, quietly

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402

# recipe -> (config file, variant suffix, overrides)
RECIPES = {
    "sft": ("sd3_sft", "", {}),
    "sft-lora": ("sd3_sft_lora", "", {}),
    "distill-deterministic": ("sd3_distill", ",deterministic", {}),
    "distill-direct": ("sd3_distill", ",direct", {}),
    "apt-approx": ("sd3_apt", "", {"r1_mode": "approx"}),
    "apt-exact": ("sd3_apt", "", {"r1_mode": "exact"}),
    "apt-none": ("sd3_apt", "", {"r1_mode": "none"}),
    "apt-lora": ("sd3_apt_lora", "", {}),
}
GiB = 2**30


def row_config(variant: str, recipe: str, overrides: dict):
    """The recipe's config for `variant`, with `overrides` (dotted keys) applied."""
    from apt_jax.cli import load_config

    if recipe not in RECIPES:
        raise SystemExit(f"Unknown recipe {recipe!r}; use one of {sorted(RECIPES)}.")
    name, suffix, own = RECIPES[recipe]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    config = load_config(os.path.join(path, f"{name}.py"), variant + suffix)
    for key, value in {**own, **overrides}.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def measure(variant: str, recipe: str, slice_, overrides: dict, args) -> dict:
    """One row: a compile at `--batch_per_replica`, or the batch search's best."""
    from apt_jax.plan import analysis, find_batch
    from apt_jax.train import sharding

    base = row_config(variant, recipe, overrides)
    sized, _ = analysis.compile_config(base, slice_)
    divisor = sharding.batch_divisor(sharding.make_mesh(sized.mesh, devices=slice_.devices))

    def compile_at(per_replica: int):
        config = base.copy_and_resolve_references()
        config.batch_size = per_replica * divisor
        p = analysis.plan(config, slice_)
        print(
            f"  {variant} {recipe} {slice_.label} batch {per_replica}/replica: "
            f"{p.total_bytes / GiB:.2f} GiB ({'fits' if p.fits else 'does not fit'}; "
            f"compiled in {p.compile_s:.0f} s)",
            flush=True,
        )
        return p

    if args.find_batch:
        search = find_batch.find_batch(compile_at, args.max_batch)
        best = search.best or search.tried[0]
        tried = [p.per_replica_batch for p in search.tried]
    else:
        best, tried = compile_at(args.batch_per_replica), [args.batch_per_replica]
    row = best.to_json()
    row.update(variant=variant, recipe=recipe, overrides=overrides, batches_tried=tried)
    row["remat_policy"] = base.model.remat_policy
    row["largest_fits"] = bool(args.find_batch and best.fits)
    return row


def _f(x, scale, digits=2):
    return "-" if x is None else f"{x / scale:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | recipe | remat | topology | chips | batch / chip | global | arguments "
        "| temp | total | HBM | fits | TFLOP / chip | model / step FLOPs | step bound s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        batch = f"{r['per_replica_batch']}" + (" (max)" if r.get("largest_fits") else "")
        ratio = r.get("model_flops_ratio")
        layers = (r.get("overrides") or {}).get("model.num_layers")
        model = r["variant"] + (f" ({layers} layers)" if layers else "")
        bound = _f(r["step_time_bound_s"], 1, 3)
        if r.get("bound_by"):
            bound += f" ({r['bound_by'][:3]})"
        lines.append(
            f"| {model} | {r['recipe']} | {r['remat_policy']} | {r['topology']} "
            f"| {r['chips']} | {batch} | {r['batch_size']} | {_f(r['argument_bytes'], GiB)} "
            f"| {_f(r['temp_bytes'], GiB)} | {_f(r['total_bytes'], GiB)} "
            f"| {_f(r['hbm_bytes'], GiB, 1)} | {'yes' if r['fits'] else 'no'} "
            f"| {_f(r['flops_per_chip'], 1e12, 1)} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {bound} |"
        )
    lines += [
        "",
        "Per chip: GiB from the TPU compiler's memory_analysis(); total = arguments + "
        "outputs - aliased (donated state) + temp. TFLOP / chip: the compiled step, loops "
        "counted in full. Step bound: roofline lower bound, max(FLOPs / peak bf16, bytes / "
        "HBM bandwidth), not a measurement; (com) / (mem): which term sets it.",
    ]
    return "\n".join(lines)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="sd3-medium")
    parser.add_argument("--recipes", default="sft")
    parser.add_argument("--topologies", default="v5e-16")
    parser.add_argument("--num_slices", type=int, default=1)
    parser.add_argument("--batch_per_replica", type=int, default=1)
    parser.add_argument("--find_batch", action="store_true")
    parser.add_argument("--max_batch", type=int, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=None, help="Write (append to) the rows in this file.")
    parser.add_argument("--from_json", default=None, help="Print the table of saved rows.")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(markdown(json.load(f)))
        return
    overrides = dict((k, _literal(v)) for k, v in (s.split("=", 1) for s in args.set))
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)
    for name in args.topologies.split(","):
        slice_ = topology.topology(name, args.num_slices)
        for variant in args.variants.split(","):
            for recipe in args.recipes.split(","):
                rows.append(measure(variant, recipe, slice_, overrides, args))
                if args.json:  # after every row: a long matrix keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=2)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
