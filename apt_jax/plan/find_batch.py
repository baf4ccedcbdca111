"""The largest per-replica batch whose step fits the chip's HBM.

Each try is a full compile (a minute or more at SD3 scale on a laptop), so the
search spends few: batches 1 and 2 give the memory's slope in the batch, the
line through them predicts the largest batch that fits, and that guess and
its neighbour bracket the answer, which bisection then pins down. Memory is
assumed to grow with the batch (it does: activations and temporaries scale
with it); the line only picks where to look, every answer is a compile.

The batch is per replica, i.e. per (data x fsdp) shard of the mesh: per chip
on the recipes' FSDP meshes (`fsdp=-1`); the global batch is that times
data x fsdp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from apt_jax.plan.analysis import Plan

MAX_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    """`best`: the plan at the largest batch that fits (None if batch 1 does not);
    `tried`: every plan compiled, in batch order."""

    best: Plan | None
    tried: tuple[Plan, ...]


def find_batch(compile_at: Callable[[int], Plan], max_batch: int = MAX_BATCH) -> BatchSearch:
    """Searches the largest per-replica batch `b` with `compile_at(b).fits`.

    Args:
      compile_at: per-replica batch -> the plan of that step.
      max_batch: stop looking above this batch.
    """
    plans: dict[int, Plan] = {}

    def fits(b: int) -> bool:
        if b not in plans:
            plans[b] = compile_at(b)
        return plans[b].fits

    def result(b: int | None) -> BatchSearch:
        tried = tuple(plans[k] for k in sorted(plans))
        return BatchSearch(plans[b] if b else None, tried)

    if not fits(1):
        return result(None)
    if max_batch == 1 or not fits(2):
        return result(1)
    lo, hi = 2, None  # lo fits; hi, once known, does not
    slope = plans[2].total_bytes - plans[1].total_bytes
    guess = lo + 1
    if slope > 0:
        guess = 1 + (plans[1].hbm_bytes - plans[1].total_bytes) // slope
    guess = max(lo + 1, min(int(guess), max_batch))
    if fits(guess):
        # Up from the guess: its neighbour first, then doubling.
        lo, b = guess, guess + 1
        while b <= max_batch and fits(b):
            lo, b = b, (b + 1 if b == guess + 1 else 2 * b)
            b = min(b, max_batch) if lo < max_batch else max_batch + 1
        if b > max_batch:
            return result(lo)
        hi = b
    else:
        # Down from the guess: its neighbour first, then bisection.
        hi = guess
        if guess - 1 > lo:
            if fits(guess - 1):
                lo = guess - 1
            else:
                hi = guess - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return result(lo)
