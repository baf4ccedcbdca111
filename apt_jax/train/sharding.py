"""Device mesh, logical-axis rules and global batches.

The mesh has three named axes: `data` (pure data parallelism: parameters
replicated), `fsdp` (data parallelism with parameters and optimizer state
sharded along their `embed` axis) and `tensor` (heads / MLP width split). The
batch is sharded over (`data`, `fsdp`). Which parameter axis goes to which mesh
axis is decided by the logical-axis rules in the config, not by model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes in `MESH_AXES` order; one size of -1 takes the remaining devices.

    Raises:
      ValueError: more than one -1, a size that does not divide, or a mesh
        larger than the available devices.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(sizes)}.")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {dict(sizes)}.")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh {dict(sizes)}: {num_devices} devices are not divisible by the "
                f"fixed axes' product {fixed}."
            )
        shape[fill[0]] = num_devices // fixed
    total = int(np.prod(shape))
    if total > num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {total} devices "
            f"but only {num_devices} are available; shrink the mesh or set one axis to -1."
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh with Auto axes (what linen's GSPMD
    constraints need; `jax.make_mesh` now defaults to Explicit axes).

    When the mesh uses fewer devices than exist, the first ones are taken.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    n = int(np.prod(shape))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[:n], allow_split_physical_axes=True)
    except Exception:  # CPU or a device count the topology helper does not know
        grid = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-leading array: axis 0 over (data, fsdp), rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes (and processes)."""
    div = batch_divisor(mesh)
    if batch_size <= 0 or batch_size % div:
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by data x fsdp = {div} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {div}."
        )
    if batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by the {jax.process_count()} "
            "processes."
        )


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles a global, (data, fsdp)-sharded batch from this process's slice.

    Every process passes its own rows (`global_batch / process_count`); the
    result is one global `jax.Array` per leaf, so the same step code runs on one
    host or many.
    """

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)
