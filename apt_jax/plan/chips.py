"""What each TPU generation's chip offers: HBM, peak bf16 FLOP/s, HBM bandwidth.

One row per generation, each with the Cloud TPU page its numbers come from
(per chip, as those pages give them). The planner compares a step's per-chip
memory with `hbm_bytes` and bounds its time with the other two
(`apt_jax.plan.roofline`).

HBM is the chip's capacity; the TPU runtime keeps a little of it for itself
(programs, infeed buffers), so a step within a few hundred MiB of it may still
fail to load: `apt_jax.plan.report` shows the headroom.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip generation.

    Attributes:
      name: the generation as topologies name it ("v5e").
      device_kind: what `jax.Device.device_kind` reads for its devices.
      hbm_bytes: HBM capacity per chip.
      peak_bf16_flops: peak dense bf16 matmul FLOP/s per chip.
      hbm_bandwidth: HBM bytes/s per chip.
      cores_per_chip: TensorCores per chip; Cloud's v4 and v5p slice names
        (`v5p-8`) count cores, the others count chips.
      source: the public page the numbers are read from.
    """

    name: str
    device_kind: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    cores_per_chip: int
    source: str


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip(
            name="v4",
            device_kind="TPU v4",
            hbm_bytes=32 * GiB,
            peak_bf16_flops=275e12,
            hbm_bandwidth=1200e9,
            cores_per_chip=2,
            source="https://cloud.google.com/tpu/docs/v4",
        ),
        Chip(
            name="v5e",
            device_kind="TPU v5 lite",
            hbm_bytes=16 * GiB,
            peak_bf16_flops=197e12,
            hbm_bandwidth=819e9,
            cores_per_chip=1,
            source="https://cloud.google.com/tpu/docs/v5e",
        ),
        Chip(
            name="v5p",
            device_kind="TPU v5",
            hbm_bytes=95 * GiB,
            peak_bf16_flops=459e12,
            hbm_bandwidth=2765e9,
            cores_per_chip=2,
            source="https://cloud.google.com/tpu/docs/v5p",
        ),
        Chip(
            name="v6e",
            device_kind="TPU v6 lite",
            hbm_bytes=32 * GiB,
            peak_bf16_flops=918e12,
            hbm_bandwidth=1640e9,
            cores_per_chip=1,
            source="https://cloud.google.com/tpu/docs/v6e",
        ),
    )
}


def chip_for_device_kind(device_kind: str) -> Chip:
    """The `Chip` whose devices report `device_kind`.

    Raises:
      KeyError: a kind not in `CHIPS` (add its row, with its source).
    """
    for chip in CHIPS.values():
        if chip.device_kind == device_kind:
            return chip
    raise KeyError(
        f"No chip facts for device kind {device_kind!r}; add it to apt_jax.plan.chips.CHIPS "
        f"(known kinds: {sorted(c.device_kind for c in CHIPS.values())})."
    )
