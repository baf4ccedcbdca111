"""Device mesh, logical-axis rules and global batches.

The mesh has three named axes: `data` (pure data parallelism: parameters
replicated), `fsdp` (data parallelism with parameters and optimizer state
sharded along their `embed` axis) and `tensor` (heads / MLP width split). The
batch is sharded over (`data`, `fsdp`). Which parameter axis goes to which mesh
axis is decided by the logical-axis rules in the config, not by model code.

Multislice (hybrid) meshes: `config.mesh.dcn = dict(data=2, fsdp=1, tensor=1)`
splits each axis into a fast part inside a slice (ICI; the sizes `config.mesh.
data/fsdp/tensor`, per slice) and a slow part across slices (DCN; `dcn`), and
the mesh axis has size `ici * dcn`. Put across slices what communicates least:
usually `data`. Granules are TPU slices (`device.slice_index`) or, where devices
are all in one slice (GPU clusters, CPU), processes. A `dcn` of all 1 is the
plain mesh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

log = logging.getLogger(__name__)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes in `MESH_AXES` order; one size of -1 takes the remaining devices.

    Raises:
      ValueError: more than one -1, a size that does not divide, or a mesh
        larger than the available devices.
    """
    sizes = {k: v for k, v in sizes.items() if k != "dcn"}
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


def resolve_dcn_shape(sizes: Mapping[str, Any]) -> tuple[int, ...]:
    """`config.mesh.dcn` sizes in `MESH_AXES` order (missing axes are 1).

    Raises:
      ValueError: an unknown axis or a size that is not a positive int.
    """
    dcn = dict(sizes.get("dcn") or {})
    unknown = set(dcn) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh.dcn has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    shape = tuple(dcn.get(a, 1) for a in MESH_AXES)
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(
            f"config.mesh.dcn sizes must be positive ints (slices per axis), got {dcn}."
        )
    return shape


def _granule_attr(devices: Sequence[Any]) -> str:
    """What a DCN granule is: a TPU slice where the devices span several (they
    carry `slice_index`), else a process (GPU clusters, CPU, one slice)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    return "slice_index" if len(slices) > 1 else "process_index"


def resolve_hybrid_shape(
    sizes: Mapping[str, Any], devices: Sequence[Any]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(ici_shape, dcn_shape)` of a hybrid mesh over all of `devices`.

    `sizes` holds the per-slice (ICI) axis sizes, one of which may be -1, and
    `sizes["dcn"]` the across-slice ones, whose product must be the number of
    granules (slices, or processes where all devices are in one slice).

    Raises:
      ValueError: dcn sizes that do not multiply to the granule count, granules
        of unequal size, or ICI sizes that do not fill a granule.
    """
    dcn_shape = resolve_dcn_shape(sizes)
    attr = _granule_attr(devices)
    counts: dict[Any, int] = {}
    for d in devices:
        counts[getattr(d, attr)] = counts.get(getattr(d, attr), 0) + 1
    what = "slices" if attr == "slice_index" else "processes"
    if int(np.prod(dcn_shape)) != len(counts):
        raise ValueError(
            f"config.mesh.dcn {dict(zip(MESH_AXES, dcn_shape, strict=True))} spans "
            f"{int(np.prod(dcn_shape))} granules but the job has {len(counts)} {what}; make "
            f"the dcn sizes multiply to {len(counts)}."
        )
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"The {what} hold unequal device counts {counts}; a hybrid mesh needs equal."
        )
    per_granule = next(iter(counts.values()))
    ici_shape = resolve_mesh_shape(sizes, per_granule)
    if int(np.prod(ici_shape)) != per_granule:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, ici_shape, strict=True))} (per slice) uses "
            f"{int(np.prod(ici_shape))} of each granule's {per_granule} devices; a hybrid "
            "mesh must use them all (set one axis to -1)."
        )
    return ici_shape, dcn_shape


def device_grid(sizes: Mapping[str, Any], devices: Sequence[Any]) -> np.ndarray:
    """The `(data, fsdp, tensor)` array of devices `make_mesh` builds its mesh on."""
    devices = list(devices)
    if int(np.prod(resolve_dcn_shape(sizes))) > 1:
        from jax.experimental import mesh_utils

        ici_shape, dcn_shape = resolve_hybrid_shape(sizes, devices)
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            dcn_shape,
            devices,
            process_is_granule=_granule_attr(devices) == "process_index",
            allow_split_physical_axes=True,
        )
    shape = resolve_mesh_shape(sizes, len(devices))
    n = int(np.prod(shape))
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_device_mesh(shape, devices[:n], allow_split_physical_axes=True)
    except Exception:  # CPU or a device count the topology helper does not know
        return np.asarray(devices[:n], dtype=object).reshape(shape)


def make_mesh(sizes: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh with Auto axes (what linen's GSPMD
    constraints need; `jax.make_mesh` now defaults to Explicit axes).

    `sizes` is `config.mesh`: axis sizes (one may be -1) and optionally `dcn`
    (see the module docstring). When the mesh uses fewer devices than exist,
    the first ones are taken (single-process runs only).

    Raises:
      ValueError: bad sizes, or a multi-process mesh leaving devices out.
    """
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(sizes, devices)
    if grid.size < len(devices) and len({d.process_index for d in devices}) > 1:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, grid.shape, strict=True))} uses {grid.size} "
            f"of the {len(devices)} devices of a multi-process job; every process needs "
            "devices in the mesh: make it use all (set one axis to -1)."
        )
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


@functools.lru_cache(maxsize=16)
def process_batch_rows(mesh: Mesh, global_rows: int) -> tuple[tuple[int, int], ...]:
    """The `[start, stop)` blocks of a `global_rows` batch on this process's devices,
    sorted and with adjacent blocks merged."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    blocks = sorted({(i[0].start or 0, i[0].stop or global_rows) for i in index_map.values()})
    merged = [blocks[0]]
    for start, stop in blocks[1:]:
        if start == merged[-1][1]:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return tuple(merged)


@functools.lru_cache(maxsize=16)
def _warn_row_order(mesh: Mesh, rows: tuple, expected: tuple) -> None:
    log.warning(
        "Process %d's devices hold rows %s of the global batch, not %s: the mesh interleaves "
        "processes along %s (a TPU topology can). Each step still trains on the same "
        "examples, in another row order than a single-process run.",
        jax.process_index(),
        rows,
        expected,
        BATCH_AXES,
    )


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles a global, (data, fsdp)-sharded batch from this process's slice.

    Every process passes its own rows (`global_batch / process_count`); the
    result is one global `jax.Array` per leaf, so the same step code runs on one
    host or many. Where each process's devices are consecutive along the batch
    axes (the `jax.devices()` order on CPU and GPU), process `p`'s rows land at
    rows `[p * n, (p + 1) * n)` of the global batch, which is where the input
    pipeline (`apt_jax.data.pipeline`) takes them from in the global stream: the
    global batch is the single-process one, row for row. Otherwise (logged once)
    it holds the same examples in another row order.
    """
    leaves = jax.tree.leaves(local_batch)
    if jax.process_count() > 1 and leaves:
        n = np.shape(leaves[0])[0]
        rows = process_batch_rows(mesh, n * jax.process_count())
        p = jax.process_index()
        if rows != ((p * n, (p + 1) * n),):
            _warn_row_order(mesh, rows, ((p * n, (p + 1) * n),))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)
