"""An in-memory stand-in for GCS: fsspec's memory filesystem under `gs://`.

Without TensorFlow, `etils.epath` serves `gs://` with fsspec's `gcs`
implementation (gcsfs); `install` puts this class in its place, in this process.
"""

import os

from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

PROTOCOLS = ("gs", "gcs")


class FakeGCS(MemoryFileSystem):
    """fsspec's memory filesystem under the `gs://` / `gcs://` protocol."""

    protocol = PROTOCOLS
    store: dict = {}  # its own class-level state, apart from `memory://`
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return super()._strip_protocol(path)


def reset() -> None:
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem


def install() -> None:
    """Registers `FakeGCS` for `gs://` for good (in a subprocess); tests use the fixture."""
    for name in PROTOCOLS:
        _registry[name] = FakeGCS
    reset()


def objects(prefix: str) -> dict[str, bytes]:
    """{path relative to `prefix`: bytes} of the objects under `prefix` (`gs://b/dir`)."""
    root = "/" + prefix[len("gs://") :].rstrip("/") + "/"
    return {k[len(root) :]: v.getvalue() for k, v in FakeGCS.store.items() if k.startswith(root)}


def dump(prefix: str, local_dir: str) -> None:
    """Copies the objects under `prefix` into `local_dir` (for a parent process to read)."""
    for rel, data in objects(prefix).items():
        path = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
