"""Catch SIGTERM so a training loop can checkpoint and exit cleanly.

Schedulers (Slurm, Kubernetes, spot/preemptible VMs) send SIGTERM some
seconds before killing a job. :class:`PreemptionGuard` turns that signal into
a flag the loop polls once per step; the loop then saves at the current step
and returns normally (exit status 0), and the next launch on the same workdir
resumes from that checkpoint::

    with PreemptionGuard() as guard:
        for step in ...:
            state, metrics = train_step(state, batch, rng)
            if guard.requested or ckpt.reached_preemption(step):
                ckpt.save(step, state, data_iterator=it, config=config, force=True)
                break

Multi-host: once ``jax.distributed.initialize()`` has run, JAX's preemption
service installs its own (C++) SIGTERM handler and agrees across hosts on a
step at which all of them save; :meth:`Checkpointer.reached_preemption(step)
<apt_jax.train.checkpoint.Checkpointer.reached_preemption>` turns True on
every host at that step. A Python handler would replace JAX's, so by default
the guard installs nothing when ``jax.distributed`` is initialised
(``guard.installed`` is False and ``guard.requested`` stays False) and the
loop must consult ``reached_preemption``. Hosts must never act on a local
flag alone, or they would save at different steps.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

__all__ = ["PreemptionGuard", "distributed_initialized"]

log = logging.getLogger(__name__)


def distributed_initialized() -> bool:
    """Whether ``jax.distributed.initialize()`` has run in this process."""
    import jax

    return jax.distributed.is_initialized()


class PreemptionGuard:
    """Context manager that records SIGTERM (or other signals) in a flag.

    On entry it installs a handler for ``signals`` that only sets the flag, so
    the process is not killed; on exit it puts the previous handlers back.
    Must be entered from the main thread (a Python rule for signal handlers).

    Args:
        signals: the signals to catch; SIGTERM by default.
        skip_if_distributed: install nothing when ``jax.distributed`` is
            initialised, leaving SIGTERM to JAX's preemption service (see the
            module docstring).
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM,),
        *,
        skip_if_distributed: bool = True,
    ):
        self._signals = tuple(signals)
        self._skip_if_distributed = skip_if_distributed
        self._previous: dict[int, object] = {}
        self._requested = threading.Event()
        self._signum: int | None = None

    @property
    def requested(self) -> bool:
        """True once one of the signals has arrived."""
        return self._requested.is_set()

    @property
    def signal_received(self) -> int | None:
        """The first signal caught, or None."""
        return self._signum

    @property
    def installed(self) -> bool:
        """Whether the guard's handlers are currently installed."""
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        del frame
        if not self._requested.is_set():
            self._signum = signum
            log.warning(
                "Received %s: will checkpoint and stop at the end of this step.",
                signal.Signals(signum).name,
            )
        self._requested.set()

    def __enter__(self) -> PreemptionGuard:
        if self._skip_if_distributed and distributed_initialized():
            log.info(
                "jax.distributed is initialised: leaving SIGTERM to JAX's preemption "
                "service; use Checkpointer.reached_preemption(step)."
            )
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered from the main thread.")
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            # `None` means a handler not installed from Python; the default is
            # the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
