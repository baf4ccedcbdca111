"""Scalar logging (TensorBoard event files via tensorboardX, no TensorFlow) and
the finite-metrics safety rail.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


class NonFiniteMetricError(FloatingPointError):
    """A logged metric was NaN or Inf; the run stops before saving that state."""


def check_finite(metrics: dict[str, Any], step: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(float(np.asarray(v)))]
    if bad:
        raise NonFiniteMetricError(
            f"Step {step}: metric(s) {', '.join(sorted(bad))} = "
            f"{', '.join(str(float(np.asarray(metrics[k]))) for k in sorted(bad))}. Stopping; "
            "the last checkpoint saved before this step is intact (lower the learning rate "
            "or enable config.optimizer.grad_clip_norm, then relaunch to resume)."
        )


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` and, a line of JSON per call, to
    `<workdir>/metrics.jsonl` (readable without TensorBoard), on process 0; a no-op
    elsewhere."""

    def __init__(self, workdir: str):
        self._writer = None
        self._jsonl = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if self._writer is None:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()
