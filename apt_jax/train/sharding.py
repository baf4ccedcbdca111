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

A known XLA miscompile (docs/miscompile.md) makes some (mesh, batch, model)
combinations compute wrong values on CPU; `check_batch_size` refuses them when
it is given the model's width and tokens (`known_miscompile`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apt_jax.errors import UserError
from apt_jax.models import axes

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
        raise UserError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise UserError(f"config.mesh: at most one axis may be -1, got {dict(sizes)}.")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"config.mesh sizes must be positive or -1, got {dict(sizes)}.")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if fill:
        if num_devices % fixed:
            raise UserError(
                f"config.mesh {dict(sizes)}: {num_devices} devices are not divisible by the "
                f"fixed axes' product {fixed}."
            )
        shape[fill[0]] = num_devices // fixed
    total = int(np.prod(shape))
    if total > num_devices:
        raise UserError(
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
        raise UserError(f"config.mesh.dcn has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    shape = tuple(dcn.get(a, 1) for a in MESH_AXES)
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise UserError(
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
        raise UserError(
            f"config.mesh.dcn {dict(zip(MESH_AXES, dcn_shape, strict=True))} spans "
            f"{int(np.prod(dcn_shape))} granules but the job has {len(counts)} {what}; make "
            f"the dcn sizes multiply to {len(counts)}."
        )
    if len(set(counts.values())) != 1:
        raise UserError(
            f"The {what} hold unequal device counts {counts}; a hybrid mesh needs equal."
        )
    per_granule = next(iter(counts.values()))
    ici_shape = resolve_mesh_shape(sizes, per_granule)
    if int(np.prod(ici_shape)) != per_granule:
        raise UserError(
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
        raise UserError(
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


def check_batch_size(
    batch_size: int,
    mesh: Mesh,
    *,
    width: int | None = None,
    tokens_per_example: Mapping[str, int] | None = None,
    rules: Rules | None = None,
    microbatches: int = 1,
) -> None:
    """The global batch must split evenly over the batch axes (and processes), and
    must not be one XLA is known to miscompile on this mesh and platform.

    Args:
      batch_size: the global batch of one update.
      mesh: the `(data, fsdp, tensor)` mesh the step runs on.
      width: the MMDiT's width (`MMDiTConfig.inner_dim`); with `tokens_per_example`,
        turns on the miscompile check (`known_miscompile`).
      tokens_per_example: tokens of each of the model's streams in one example, by
        name (`mmdit_token_streams`).
      rules: the logical-axis rules the step shards its parameters by
        (`config.logical_axis_rules`; default `axes.DEFAULT_RULES`).
      microbatches: `config.optimizer.accumulation_steps`: each forward sees
        `batch_size // microbatches` examples.

    Raises:
      ValueError: a batch that does not split, or one `known_miscompile` refuses.
    """
    div = batch_divisor(mesh)
    if batch_size <= 0 or batch_size % div:
        raise UserError(
            f"config.batch_size={batch_size} is not divisible by data x fsdp = {div} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {div}."
        )
    if batch_size % jax.process_count():
        raise UserError(
            f"config.batch_size={batch_size} is not divisible by the {jax.process_count()} "
            "processes."
        )
    if width is not None and tokens_per_example:
        check_known_miscompile(
            batch_size,
            mesh,
            width=width,
            tokens_per_example=tokens_per_example,
            rules=rules,
            microbatches=microbatches,
        )


# ------------------------------------------------------- a known XLA miscompile
# docs/miscompile.md. XLA's SPMD partitioner (jaxlib 0.10.2) miscompiles
# `h @ w` with `h` split (data, fsdp) x tensor, `w` split (tensor, fsdp) and the
# result wanted (data, fsdp) x tensor, when data > 1 and fsdp == tensor > 1: it
# collective-permutes the rows of `h` as if data and fsdp were swapped and never
# permutes them back, so rows land on the wrong devices (O(1) errors, no warning).
# The MMDiT's attention output and MLP down projections are such dots under the
# default rules (heads / mlp -> tensor, embed -> fsdp). Whether the partitioner
# takes that path is a cost decision: in the MMDiT's forward and gradient it did
# exactly when a stream's rows in one call, T = batch x tokens, satisfy
# width <= T <= data x width. The TPU compiler's programs for the same steps are
# right (it takes a windowed-einsum path; with that disabled it emits the same
# wrong program, so the defect is the shared partitioner's); GPU runs the shared
# partitioner without windowed einsum, like CPU, and is refused too (unchecked).
MISCOMPILE_PLATFORMS = frozenset({"cpu", "gpu", "cuda", "rocm"})
MISCOMPILE_DOC = "docs/miscompile.md"


def mmdit_token_streams(
    model: Any, sample_shape: Sequence[int], context_tokens: int
) -> dict[str, int]:
    """Tokens per example of the MMDiT's two streams.

    Args:
      model: an `MMDiTConfig` (its `patch_size` and `patch_size_t` are read).
      sample_shape: one latent, `(H, W, C)` or `(F, H, W, C)`.
      context_tokens: the context stream's length (text tokens, or the class
        embedder's `context_tokens`).

    Returns:
      `{"image": patches per example, "context": context_tokens}`.
    """
    p = int(model.patch_size)
    *frames, h, w, _ = (int(s) for s in sample_shape)
    image = (h // p) * (w // p)
    if frames:
        image *= frames[0] // int(model.patch_size_t or 1)
    return {"image": image, "context": int(context_tokens)}


def _rule_axes(rules: Rules, name: str) -> tuple[str, ...]:
    """The mesh axes the first rule for logical `name` maps it to (flax's order)."""
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def known_miscompile(
    batch_size: int,
    mesh: Mesh,
    *,
    width: int,
    tokens_per_example: Mapping[str, int],
    rules: Rules | None = None,
    platform: str | None = None,
    microbatches: int = 1,
) -> str | None:
    """Why this step would hit the known XLA miscompile, or None where it is not known to.

    Args:
      batch_size: the global batch of one update (or of one sampler call).
      mesh: the `(data, fsdp, tensor)` mesh.
      width: the MMDiT's width `D` (the output width of the projections at risk).
      tokens_per_example: tokens of each stream in one example, by name.
      rules: logical-axis rules (default `axes.DEFAULT_RULES`).
      platform: the compiler's platform (default: that of the mesh's devices).
      microbatches: gradient-accumulation steps; each forward sees
        `batch_size // microbatches` examples.

    Returns:
      A sentence naming the stream and its window, or None.
    """
    platform = platform or mesh.devices.flat[0].platform
    if platform not in MISCOMPILE_PLATFORMS:
        return None
    data, fsdp, tensor = (int(mesh.shape.get(a, 1)) for a in MESH_AXES)
    if data == 1 or fsdp != tensor or tensor == 1:
        return None
    rules = axes.DEFAULT_RULES if rules is None else rules
    rows_on_tensor = any("tensor" in _rule_axes(rules, n) for n in (axes.HEADS, axes.MLP))
    if not (rows_on_tensor and "fsdp" in _rule_axes(rules, axes.EMBED)):
        return None  # no kernel is split (tensor, fsdp)
    low, high = width, data * width
    per_call = batch_size // max(int(microbatches), 1)
    for stream, tokens in tokens_per_example.items():
        rows = per_call * int(tokens)
        if low <= rows <= high:
            return (
                f"the {stream} stream's {rows} rows per forward ({per_call} examples x "
                f"{tokens} tokens) lie in [width, data x width] = [{low}, {high}]"
            )
    return None


def _safe_batches(batch_size: int, mesh: Mesh, microbatches: int, **facts: Any) -> list[int]:
    """The nearest batch sizes below and above `batch_size` that split over the mesh
    (per micro-batch) and that `known_miscompile` passes."""
    step = batch_divisor(mesh) * max(int(microbatches), 1)

    def safe(b: int) -> bool:
        return known_miscompile(b, mesh, microbatches=microbatches, **facts) is None

    below = [b for b in range(batch_size - step, 0, -step) if safe(b)][:1]
    # Above data x width rows per forward every stream is past its window.
    top = max(batch_size, facts["width"] * mesh.shape["data"] * max(int(microbatches), 1))
    above = [b for b in range(batch_size + step, top + 2 * step, step) if safe(b)][:1]
    return below + above


def check_known_miscompile(
    batch_size: int,
    mesh: Mesh,
    *,
    width: int,
    tokens_per_example: Mapping[str, int],
    rules: Rules | None = None,
    platform: str | None = None,
    microbatches: int = 1,
) -> None:
    """Refuses the (mesh, batch, model) combinations XLA is known to miscompile.

    Arguments as `known_miscompile`.

    Raises:
      ValueError: naming the mesh, the batch, the stream at risk and the fixes.
    """
    facts = dict(width=width, tokens_per_example=tokens_per_example, rules=rules)
    platform = platform or mesh.devices.flat[0].platform
    why = known_miscompile(batch_size, mesh, platform=platform, microbatches=microbatches, **facts)
    if why is None:
        return
    data, fsdp, tensor = (int(mesh.shape[a]) for a in MESH_AXES)
    batches = _safe_batches(batch_size, mesh, microbatches, platform=platform, **facts)
    batch_fix = f"use batch_size {' or '.join(map(str, batches))}, or " if batches else ""
    raise UserError(
        f"batch_size={batch_size} on mesh {dict(mesh.shape)} ({platform}) hits a known XLA "
        f"miscompile ({MISCOMPILE_DOC}): with data > 1 and fsdp == tensor = {tensor}, "
        f"{why}, where XLA's SPMD partitioner computes wrong values. Fix: {batch_fix}"
        f"make fsdp differ from tensor (--config.mesh.data=1 --config.mesh.fsdp="
        f"{data * fsdp} --config.mesh.tensor={tensor}), or set --config.mesh.tensor=1 "
        f"(--config.mesh.fsdp={fsdp * tensor}); TPU meshes are not affected."
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
