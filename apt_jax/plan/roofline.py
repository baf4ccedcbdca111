"""A lower bound on a step's time from its FLOPs, its bytes and the chip.

A chip cannot finish a step faster than its FLOPs at peak bf16 rate, nor
faster than its HBM traffic at full bandwidth: the bound is the larger of the
two. It is a bound, not a prediction: it ignores collectives over ICI and DCN,
imperfect overlap, and ops that run below peak (fp32 matmuls, elementwise
work, small shapes). XLA's byte count sums every op's operands and outputs, so
it overstates traffic that stays in on-chip memory; read the memory term as
rough.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Bound:
    """`seconds`: max(compute, memory); `bound_by`: the larger term's name."""

    seconds: float
    compute_s: float
    memory_s: float

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def step_time_bound(
    flops: float, bytes_accessed: float, peak_flops: float, bandwidth: float
) -> Bound:
    """The roofline bound of one chip's step.

    Args:
      flops: the chip's FLOPs per step.
      bytes_accessed: its HBM bytes per step.
      peak_flops: the chip's peak FLOP/s.
      bandwidth: its HBM bytes/s.
    """
    compute, memory = flops / peak_flops, bytes_accessed / bandwidth
    return Bound(seconds=max(compute, memory), compute_s=compute, memory_s=memory)
