"""TPU slices by name, and the devices libtpu gives for them without a TPU.

Names are what `jax.experimental.topologies.get_topology_desc` takes,
`<generation>:<chips per axis>` ("v5e:4x4", "v5p:2x2x1"), or Cloud's
accelerator types ("v5e-16", "v5litepod-16", "v5p-8", "v6e-8", "v4-8"). Cloud's
v4 and v5p types count TensorCores, two per chip: "v5p-8" is 4 chips (2x2x1),
"v5p-64" 32 chips (2x4x4). The known slices are the single-slice shapes the
Cloud TPU pages list (`apt_jax.plan.chips` cites them); `num_slices` > 1 joins
several over the data-centre network (multislice).

libtpu compiles for a slice on any machine; it is an optional dependency
(`requirements-tpu.txt`). `prepare_environment()` must run before JAX starts
a backend: it keeps JAX on the CPU (the compile needs no TPU, and a TPU
machine's chips stay free for its training job) and quiets libtpu's start-up
complaints about the TPU it cannot find.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys
from typing import Any

from apt_jax.errors import UserError
from apt_jax.plan.chips import CHIPS, Chip, chip_for_device_kind

INSTALL_HINT = (
    "compiling for a TPU topology needs libtpu (no TPU needed): pip install -r requirements-tpu.txt"
)

# Single-slice shapes per generation (chips per axis), from the Cloud TPU pages.
SHAPES: dict[str, tuple[str, ...]] = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": (
        "2x2x1",
        "2x2x2",
        "2x2x4",
        "2x4x4",
        "4x4x4",
        "4x4x8",
        "4x8x8",
        "8x8x8",
        "8x8x16",
        "8x16x16",
        "16x16x16",
    ),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
# Cloud's accelerator-type prefixes per generation.
_CLOUD_PREFIXES = {"v4": ("v4",), "v5e": ("v5e", "v5litepod"), "v5p": ("v5p",), "v6e": ("v6e",)}


def _chips(shape: str) -> int:
    n = 1
    for s in shape.split("x"):
        n *= int(s)
    return n


def known_topologies() -> list[str]:
    """Every known slice as `generation:shape`, with its Cloud name."""
    out = []
    for gen, shapes in SHAPES.items():
        for shape in shapes:
            cloud = f"{gen}-{_chips(shape) * CHIPS[gen].cores_per_chip}"
            out.append(f"{gen}:{shape} ({cloud})")
    return out


def canonical_name(name: str) -> str:
    """`generation:shape` of a topology name or Cloud accelerator type.

    Raises:
      UserError: a name that is not a known slice (the message lists them).
    """
    raw = name.strip().lower()
    for gen, shapes in SHAPES.items():
        if raw.startswith(gen + ":") and raw.split(":", 1)[1] in shapes:
            return raw
        for prefix in _CLOUD_PREFIXES[gen]:
            if raw.startswith(prefix + "-") and raw[len(prefix) + 1 :].isdigit():
                count = int(raw[len(prefix) + 1 :])
                for shape in shapes:
                    if _chips(shape) * CHIPS[gen].cores_per_chip == count:
                        return f"{gen}:{shape}"
    raise UserError(f"Unknown TPU topology {name!r}; use one of: {', '.join(known_topologies())}.")


@dataclasses.dataclass(frozen=True)
class Slice:
    """The devices of a topology, as the planner needs them.

    Attributes:
      name: `generation:shape`.
      num_slices: slices joined over DCN.
      chip: the chip's facts.
      devices: libtpu's devices (`slice_index` tells the slices apart).
      chips: chips in all slices.
    """

    name: str
    num_slices: int
    chip: Chip
    devices: tuple[Any, ...]
    chips: int

    @property
    def devices_per_chip(self) -> int:
        """1, except where libtpu gives one device per TensorCore (v4)."""
        return len(self.devices) // self.chips

    @property
    def label(self) -> str:
        return self.name + (f" x {self.num_slices} slices" if self.num_slices > 1 else "")


def libtpu_available() -> bool:
    """Whether the libtpu wheel is importable (`requirements-tpu.txt`)."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):  # a module hidden as None in sys.modules
        return False


def prepare_environment() -> None:
    """Environment for an ahead-of-time TPU compile; call before JAX starts a backend.

    JAX stays on the CPU (`JAX_PLATFORMS=cpu` unless set): the compile needs no
    TPU, and on a TPU machine it must not take the chips from a training job.
    Several planner processes may load libtpu at once. On a machine without a
    TPU, libtpu is told so, instead of printing errors while it looks for one.
    """
    if "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported, but its backends start lazily
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        # Any valid values: they only answer libtpu's start-up queries; the
        # topology compiled for is the one `get_topology_desc` names.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology(name: str, num_slices: int = 1) -> Slice:
    """The devices of `num_slices` slices of topology `name`.

    Raises:
      UserError: an unknown name, a bad slice count, or libtpu not installed.
    """
    canonical = canonical_name(name)
    if not isinstance(num_slices, int) or num_slices < 1:
        raise UserError(f"--num_slices={num_slices!r} must be a positive int.")
    if not libtpu_available():
        raise UserError(INSTALL_HINT)
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        topology_name=canonical, platform="tpu", num_slices=num_slices
    )
    devices = tuple(desc.devices)
    chip = chip_for_device_kind(devices[0].device_kind)
    chips = _chips(canonical.split(":", 1)[1]) * num_slices
    return Slice(canonical, num_slices, chip, devices, chips)
