"""Starting `jax.distributed` for a multi-host (multi-process) run.

One process runs per host (per GPU node, per TPU VM); each sees its local
devices, and after `jax.distributed.initialize` all of them form one global
device list that a mesh can span. Two ways to start:

* **auto** (`--multihost=auto`): `jax.distributed.initialize()` with no
  arguments. JAX detects the coordinator, process count and index from the
  environment on Cloud TPU pods and multislice jobs, Slurm, Open MPI and
  GKE; arguments that are given override what it detects.
* **explicit** (`--coordinator_address=HOST:PORT --num_processes=N
  --process_id=I`, all three): any cluster, including several processes on
  one machine (on CPU the collectives go over gloo, JAX's default).

It must run before anything touches a JAX backend (`jax.devices()`, an array),
and once per process. Every process then runs the same program: the input
pipeline reads its own shard, global batches are assembled with
`jax.make_array_from_process_local_data`, only process 0 writes logs and
images, and every process takes part in checkpoints (orbax synchronises them).
"""

from __future__ import annotations

import logging

import jax

__all__ = ["MULTIHOST_MODES", "initialize", "is_initialized"]

log = logging.getLogger(__name__)

# "off": one process, no jax.distributed; "auto": let JAX detect the cluster.
MULTIHOST_MODES = ("off", "auto")


def is_initialized() -> bool:
    """Whether `jax.distributed.initialize()` has run in this process."""
    return jax.distributed.is_initialized()


def initialize(
    multihost: str = "off",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Initialises `jax.distributed` as the launch flags ask; validates them first.

    Args:
      multihost: "off" (default) starts nothing unless the explicit arguments
        are given; "auto" calls `jax.distributed.initialize` and lets JAX detect
        what is not given (TPU pods, Slurm, MPI, GKE).
      coordinator_address: `host:port` of process 0's coordinator service.
      num_processes: how many processes the job has.
      process_id: this process's index in `[0, num_processes)`.
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      Whether `jax.distributed` was initialised by this call.

    Raises:
      ValueError: an unknown mode, only some of the explicit arguments (with
        `multihost="off"`), a malformed address or an out-of-range index.
    """
    if multihost not in MULTIHOST_MODES:
        raise ValueError(f"--multihost={multihost!r} is unknown; use one of {MULTIHOST_MODES}.")
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if multihost == "off" and not given:
        return False
    if multihost == "off" and len(given) != len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(
            f"Multi-host launch: --{', --'.join(sorted(given))} given without "
            f"--{', --'.join(missing)}. Pass all three, or --multihost=auto to let JAX "
            "detect the rest (TPU pods, Slurm, MPI)."
        )
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--coordinator_address={coordinator_address!r} must be HOST:PORT, "
                "e.g. 10.0.0.1:1234 (process 0's address)."
            )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1.")
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must lie in [0, --num_processes={num_processes})."
            )
    if is_initialized():
        raise ValueError("jax.distributed is already initialised in this process.")
    jax.distributed.initialize(**given, initialization_timeout=initialization_timeout)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
