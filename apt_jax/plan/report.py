"""A plan as the table `launch/compile.py` prints (Markdown, so docs can paste it)."""

from __future__ import annotations

from apt_jax.plan.analysis import Plan
from apt_jax.plan.find_batch import BatchSearch

GiB = 2**30


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB (tiny test models)."""
    if abs(n) < GiB:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def plan_table(plan: Plan, title: str = "") -> str:
    """The per-chip table of one compile."""
    verdict = (
        f"fits, {_gib(plan.headroom_bytes)} to spare"
        if plan.fits
        else f"DOES NOT FIT: {_gib(-plan.headroom_bytes)} over"
    )
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows = [
        ("topology", f"{plan.topology}: {plan.chips} chips, mesh {mesh}"),
        ("batch", f"{plan.batch_size} global, {plan.per_replica_batch} per replica"),
        ("arguments", _gib(plan.argument_bytes)),
        ("outputs", _gib(plan.output_bytes)),
        ("aliased (donated)", _gib(plan.alias_bytes)),
        ("temp", _gib(plan.temp_bytes)),
        ("total", f"{_gib(plan.total_bytes)} of {_gib(plan.hbm_bytes)} HBM: {verdict}"),
    ]
    if plan.flops_per_chip is None:
        rows.append(("step FLOPs, time bound", "none: the compiler refused the step (no HBM)"))
        rows.append(("model FLOPs, all chips", _flops(plan.model_flops)))
    else:
        rows += [
            (
                "step FLOPs per chip",
                f"{_flops(plan.flops_per_chip)} (XLA raw: {_flops(plan.raw_flops_per_chip)}, "
                "loop bodies once)",
            ),
            ("step FLOPs, all chips", _flops(plan.flops_per_chip * plan.chips)),
            (
                "model FLOPs, all chips",
                f"{_flops(plan.model_flops)} (ratio to step FLOPs {plan.model_flops_ratio:.2f})",
            ),
            ("HBM traffic per chip", _gib(plan.bytes_accessed_per_chip)),
            (
                "step time, roofline bound",
                f">= {_seconds(plan.step_time_bound_s)} ({plan.bound_by}-bound; a lower "
                "bound, not a measurement)",
            ),
        ]
    rows += [
        ("compile time here", f"{plan.compile_s:.0f} s"),
    ]
    lines = [f"{title}", ""] if title else []
    lines += ["| per chip | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if plan.notes:
        lines += ["", "Filled in or noted: " + "; ".join(plan.notes) + "."]
    return "\n".join(lines)


def search_table(search: BatchSearch) -> str:
    """One row per batch the search compiled, and its answer."""
    lines = [
        "| batch per replica | global | total per chip | HBM | fits | step bound |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for p in search.tried:
        lines.append(
            f"| {p.per_replica_batch} | {p.batch_size} | {_gib(p.total_bytes)} "
            f"| {_gib(p.hbm_bytes)} | {'yes' if p.fits else 'no'} "
            f"| {_seconds(p.step_time_bound_s) if p.step_time_bound_s else '-'} |"
        )
    best = search.best
    lines.append("")
    lines.append(
        f"Largest batch that fits: {best.per_replica_batch} per replica ({best.batch_size} global)."
        if best
        else "Even batch 1 per replica does not fit."
    )
    return "\n".join(lines)
