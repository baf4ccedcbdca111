"""Compile a recipe's real train step for a TPU slice; what it needs per chip.

`plan(config, slice)` builds the recipe's task from the config alone
(`build_task(..., check_sources=False)`: shapes and shardings, no data, no
weights), over `config.mesh` laid on the slice's devices (ICI x DCN for
multislice), lowers its jitted step with abstract inputs and compiles it with
libtpu. From the compiled program come the per-chip memory
(`memory_analysis()`) and the FLOPs and bytes (`cost_analysis()`, loops
counted in full by `apt_jax.plan.loops`); the model FLOPs come from the
architecture (`apt_jax.plan.model_flops`), the time bound from the chip
(`apt_jax.plan.roofline`).

Call `apt_jax.plan.topology.prepare_environment()` before JAX starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import time
from collections import Counter
from typing import Any

import jax
import ml_collections
import numpy as np

from apt_jax.plan import model_flops, roofline
from apt_jax.plan.loops import LoopAnalysisError, loop_corrected_cost
from apt_jax.plan.topology import Slice
from apt_jax.train import sharding

log = logging.getLogger(__name__)

# SD3's prompt: CLIP-L/G (77) + T5 (256) context tokens.
SD3_CONTEXT_LENGTH = 333


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compile's numbers (bytes and FLOPs per chip unless said otherwise).

    Attributes:
      topology: the slice's label ("v5e:4x4", "v5e:2x2 x 2 slices").
      chips: chips in all slices.
      mesh: the mesh's axis sizes.
      batch_size: the global batch; per_replica_batch: its share per (data x fsdp) shard.
      argument_bytes, output_bytes, alias_bytes, temp_bytes: `memory_analysis()`.
      total_bytes: arguments + outputs - aliased (the donated state) + temp.
      hbm_bytes: the chip's HBM.
      fits: the compiler placed the step in HBM and total_bytes <= hbm_bytes.
      flops_per_chip: the compiled step's FLOPs, loops counted in full.
      raw_flops_per_chip: XLA's count (each loop body once).
      bytes_accessed_per_chip: the compiled step's HBM traffic, loops counted in full.
      model_flops: the step's model FLOPs over all chips (`model_flops`).
      step_time_bound_s: the roofline lower bound on the step's time.
      bound_by: "compute" or "memory", whichever term sets the bound.

    A step the TPU compiler refuses for lack of HBM has no compiled program:
    its bytes are the compiler's own figures (arguments from the abstract
    inputs' shards, temp from the error) and the FLOP fields are None.
      compile_s: lowering plus compile time here.
      notes: what the planner filled in or could not count.
    """

    topology: str
    chips: int
    mesh: dict[str, int]
    batch_size: int
    per_replica_batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    total_bytes: int
    hbm_bytes: int
    fits: bool
    flops_per_chip: float | None
    raw_flops_per_chip: float | None
    bytes_accessed_per_chip: float | None
    model_flops: float
    step_time_bound_s: float | None
    bound_by: str | None
    compile_s: float
    notes: tuple[str, ...] = ()

    @property
    def headroom_bytes(self) -> int:
        """HBM left (negative: missing) per chip."""
        return self.hbm_bytes - self.total_bytes

    @property
    def model_flops_ratio(self) -> float | None:
        """Model FLOPs over the compiled step's FLOPs (all chips): 1 minus the
        share of remat and elementwise work."""
        if self.flops_per_chip is None:
            return None
        return self.model_flops / max(self.flops_per_chip * self.chips, 1.0)

    def to_json(self) -> dict[str, Any]:
        """The `--json` fields of `launch/compile.py`, then the rest."""
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        d["headroom_bytes"] = self.headroom_bytes
        d["model_flops_ratio"] = self.model_flops_ratio
        return d


def compile_config(config: ml_collections.ConfigDict, slice_: Slice) -> tuple[Any, list[str]]:
    """A copy of `config` that builds from the config alone on `slice_`; what was filled in.

    Latents datasets get the model's own latent size (`config.model.sample_size`:
    128, i.e. 1024 px, for SD3) and SD3's 333 context tokens where
    `config.data.latent_size` / `context_length` are unset, and placeholder
    dataset names (nothing is opened). Runs a stage starts from (a LoRA base,
    a teacher, a generator) get placeholder names where unset (nothing is
    read). Multislice without `config.mesh.dcn` puts `data` across slices.
    """
    config = copy.deepcopy(config)
    notes = []
    with config.unlocked():
        if config.data.name == "latents":
            if not config.data.get("latent_size", 0):
                size = config.data.latent_size = config.model.sample_size
                notes.append(f"latents {size}x{size} (config.model.sample_size)")
            if not config.data.get("context_length", 0):
                config.data.context_length = SD3_CONTEXT_LENGTH
                notes.append(f"{SD3_CONTEXT_LENGTH} context tokens (SD3)")
            config.data.data_dir = config.data.data_dir or "(not read)"
            config.data.dataset = config.data.dataset or "(not read)"
        lora = config.get("lora", {})
        if lora.get("rank", 0) and not (config.get("init_from") or config.get("init_workdir")):
            config.init_from = "(not read)"
        for key in ("teacher_workdir", "generator_workdir"):
            if key in config and not config[key] and not config.get("init_from"):
                config[key] = "(not read)"
        dcn = dict(config.mesh.get("dcn") or {})
        if slice_.num_slices > 1 and all(v == 1 for v in dcn.values()):
            config.mesh.dcn = ml_collections.ConfigDict(
                dict(data=slice_.num_slices, fsdp=1, tensor=1)
            )
            notes.append(f"mesh.dcn.data={slice_.num_slices} (data parallel across slices)")
    return config, notes


def per_replica_batch(config: ml_collections.ConfigDict, mesh) -> int:
    return config.batch_size // sharding.batch_divisor(mesh)


def plan(config: ml_collections.ConfigDict, slice_: Slice) -> Plan:
    """Compiles `config`'s train step for `slice_` and reads its costs.

    Raises:
      ValueError: a config that does not build (bad mesh, batch, recipe keys).
    """
    from apt_jax.tasks import build_task

    jax.config.update("jax_threefry_partitionable", True)
    config, notes = compile_config(config, slice_)
    mesh = sharding.make_mesh(config.mesh, devices=slice_.devices)
    if mesh.devices.size != len(slice_.devices):
        raise ValueError(
            f"config.mesh {dict(mesh.shape)} uses {mesh.devices.size} of the slice's "
            f"{len(slice_.devices)} devices; set one axis to -1 to use them all."
        )
    task = build_task(config, mesh, check_sources=False)
    per_device = slice_.devices_per_chip
    hbm = slice_.chip.hbm_bytes // per_device
    common = dict(
        topology=slice_.label,
        chips=slice_.chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=config.batch_size,
        per_replica_batch=per_replica_batch(config, mesh),
        hbm_bytes=int(hbm),
        model_flops=float(model_flops.step_model_flops(config)),
    )
    inputs = (task.abstract_state, task.abstract_batch, task.abstract_rng())
    t0 = time.perf_counter()
    lowered = task.train_step.lower(*inputs)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _refused(e, inputs, task.abstract_state, common, notes, time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = arg + out - alias + temp

    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, list | tuple) else raw
    try:
        cost = loop_corrected_cost(compiled.as_text())
        flops, nbytes, raw_flops = cost.flops, cost.bytes_accessed, cost.raw_flops
        if cost.loops:
            trips = Counter(lp.trip_count for lp in cost.loops)
            counts = ", ".join(f"{n} x {t}" for t, n in sorted(trips.items(), reverse=True))
            notes.append(f"{len(cost.loops)} loops counted in full (trips: {counts})")
    except (LoopAnalysisError, RuntimeError, ValueError) as e:
        # Never lose a long compile to the count: report XLA's, and say so.
        flops = raw_flops = float(raw.get("flops", 0.0))
        nbytes = float(raw.get("bytes accessed", 0.0))
        notes.append(f"FLOPs count each loop body once ({type(e).__name__}: {e})")
        log.warning("FLOPs count each loop body once: %s", e)
    bound = roofline.step_time_bound(
        flops,
        nbytes,
        slice_.chip.peak_bf16_flops / per_device,
        slice_.chip.hbm_bandwidth / per_device,
    )
    return Plan(
        **common,
        argument_bytes=int(arg),
        output_bytes=int(out),
        alias_bytes=int(alias),
        temp_bytes=int(temp),
        total_bytes=int(total),
        fits=bool(total <= hbm),
        flops_per_chip=float(flops),
        raw_flops_per_chip=float(raw_flops),
        bytes_accessed_per_chip=float(nbytes),
        step_time_bound_s=bound.seconds,
        bound_by=bound.bound_by,
        compile_s=compile_s,
        notes=tuple(notes),
    )


# ------------------------------------------------------ refused for lack of HBM
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        try:
            itemsize = np.dtype(leaf.dtype).itemsize
        except TypeError:  # a PRNG key: two uint32 per key
            itemsize = 8
        total += math.prod(shape) * itemsize
    return int(total)


def _refused(error, inputs, state, common: dict, notes: list, compile_s: float) -> Plan:
    """The `Plan` of a step the compiler refused: RESOURCE_EXHAUSTED on HBM.

    XLA says either "the total memory required for HLO temporaries (X) exceeds
    available HBM (Y)" or "Used X of Y hbm"; the arguments are the inputs'
    shards, the outputs the donated state (aliased).
    """
    message = str(error)
    arg = shard_bytes(inputs)
    alias = out = shard_bytes(state)
    temporaries = re.search(
        rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", message
    )
    used = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
    if temporaries:
        temp = _size(*temporaries.groups()[:2])
        available = _size(*temporaries.groups()[2:])
        total = arg + temp
    elif used:
        total, available = _size(*used.groups()[:2]), _size(*used.groups()[2:])
        temp = max(total - arg, 0)
    else:
        temp, available, total = 0, None, arg
        notes.append("the compiler gave no sizes")
    if available is not None:
        notes.append(f"the compiler: {available / 2**30:.2f} GiB of HBM available to the step")
    first = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), "")
    notes.append("not compiled: " + first.split("RESOURCE_EXHAUSTED: ", 1)[-1].strip().rstrip("."))
    return Plan(
        **common,
        argument_bytes=arg,
        output_bytes=out,
        alias_bytes=alias,
        temp_bytes=int(temp),
        total_bytes=int(total),
        fits=False,
        flops_per_chip=None,
        raw_flops_per_chip=None,
        bytes_accessed_per_chip=None,
        step_time_bound_s=None,
        bound_by=None,
        compile_s=compile_s,
        notes=tuple(notes),
    )
