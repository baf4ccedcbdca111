"""Scalar logging (TensorBoard event files via tensorboardX, no TensorFlow) and
the finite-metrics safety rail.

A bucket workdir (`gs://...`) cannot be appended to, and tensorboardX reaches
`gs://` only through its own google-cloud-storage writer, so for a non-local
workdir both files are written to a local staging folder and copied, whole,
to the workdir after every write (they hold scalars only: kilobytes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from typing import Any

import jax
import numpy as np

from apt_jax.paths import as_path, is_local


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
    elsewhere.

    A local workdir is written in place. For a URI workdir (`gs://...`) the files
    live in a local staging folder and every `write_scalars` / `close` copies them
    to the workdir; an existing `metrics.jsonl` there is fetched first, so a
    resumed run appends to it as on a local disk.
    """

    def __init__(self, workdir: str | os.PathLike):
        self._writer = None
        self._jsonl = None
        self._staging = None  # local folder mirrored to a URI workdir
        self._remote = None
        if jax.process_index() != 0:
            return
        from tensorboardX import SummaryWriter

        suffix = ""
        if is_local(workdir):
            local = os.fspath(workdir)
        else:
            # Event files are named by the second and the host; a unique suffix keeps
            # a quick restart's upload from replacing the previous run's file.
            suffix = f".{uuid.uuid4().hex[:8]}"
            self._remote = as_path(workdir)
            self._staging = local = tempfile.mkdtemp(prefix="apt_jax_metrics_")
            remote_jsonl = self._remote / "metrics.jsonl"
            if remote_jsonl.exists():
                with open(os.path.join(local, "metrics.jsonl"), "wb") as f:
                    f.write(remote_jsonl.read_bytes())
        self._writer = SummaryWriter(
            logdir=os.path.join(local, "tensorboard"), filename_suffix=suffix
        )
        self._jsonl = open(os.path.join(local, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if self._writer is None:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        self._upload()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._upload()
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._writer = self._jsonl = None

    def _upload(self) -> None:
        """Copies the staged files (event files, metrics.jsonl) over their workdir copies."""
        if self._staging is None:
            return
        for root, _, files in os.walk(self._staging):
            rel = os.path.relpath(root, self._staging)
            target_dir = self._remote if rel == "." else self._remote / rel
            target_dir.mkdir(parents=True, exist_ok=True)
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    (target_dir / name).write_bytes(f.read())
