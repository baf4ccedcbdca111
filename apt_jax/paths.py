"""Run outputs on a local disk or a bucket, through one API (`etils.epath.Path`).

A workdir may be a local folder or a URI (`gs://bucket/run`): every write and
read of a run's files goes through `as_path`, so a URI reaches the bucket
instead of a local folder named `gs:/bucket/run`. Without TensorFlow, epath
serves `gs://` with fsspec's `gcs` filesystem, i.e. `gcsfs` (requirements.txt).

Object stores write whole objects (no append, no seek while writing), so
writers here build a file in memory and write it in one call.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a local path made absolute (orbax needs absolute
    paths), a URI (`gs://...`) unchanged."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def is_local(path: PathLike) -> bool:
    """True for a path on this machine's file system, False for a URI (`gs://...`)."""
    return "://" not in os.fspath(path)
