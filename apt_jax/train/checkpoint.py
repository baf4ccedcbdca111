"""Checkpoints of a training run: train state, data-iterator state and config.

A wrapper around :class:`orbax.checkpoint.CheckpointManager` (orbax
0.12.x) used by every training recipe. It is one file of ~900 lines because
all of it is one contract with orbax's on-disk layout (what is saved, what a
damaged step looks like, how the three items restore together): split, each
part would have to know the others' assumptions. One checkpoint step holds up to three
items, each in its own sub-directory of ``<workdir>/checkpoints/<step>/``:

``state``
    the train state, any pytree of ``jax.Array`` (sharded or not, float or
    integer leaves such as a step counter), written with
    ``ocp.args.StandardSave`` and read back with ``ocp.args.StandardRestore``
    onto the shardings the caller asks for, so a run can resume on another
    mesh or another number of devices.
``data``
    the position of a grain ``DatasetIterator`` (its ``get_state()``, one JSON
    file per process, ``process_{i}-of-{n}.json``), written with
    ``grain.checkpoint.CheckpointSave``; restoring sets the state of the
    iterator passed in, in place, and needs the same process count ``n``
    (:meth:`Checkpointer.data_process_count` tells it). Optional.
``config``
    the run's ``ml_collections.ConfigDict`` as JSON, so launch scripts can read
    a run's config from its workdir alone (:meth:`Checkpointer.restore_config`,
    :func:`read_config`). Optional.

Typical use in a training loop::

    ckpt = Checkpointer(workdir, max_to_keep=3)
    abstract = jax.eval_shape(init_fn, rng)            # carries target shardings
    if ckpt.latest_step() is not None:
        # The newest step that reads; damaged newer ones are moved aside.
        state, step = ckpt.restore(abstract_state=abstract, data_iterator=it)
    ...
    with PreemptionGuard() as guard:                    # apt_jax.train.preemption
        for step in range(step + 1, total_steps + 1):
            state, metrics = train_step(state, next(it), rng)
            stop = guard.requested or ckpt.reached_preemption(step)
            if step % checkpoint_every == 0 or stop or step == total_steps:
                ckpt.save(step, state, data_iterator=it, config=config, force=stop)
            if stop:
                break
    ckpt.close()

Every host of a multi-host job must make the same calls (orbax synchronises
the hosts inside ``save``, this module inside ``restore``); the directory must
be shared between hosts (a network file system or ``gs://``).

Damaged checkpoints
    ``restore(step=None)`` (a resume) takes the newest step that reads. A step
    whose files were truncated, overwritten or deleted after the save fails
    with a read or decode error (tensorstore's OUT_OF_RANGE, DATA_LOSS,
    NOT_FOUND, a missing file or item folder, broken JSON): a warning names it
    and the error, the next newest is tried, and once one reads the damaged
    ones are moved, never deleted, to ``<workdir>/checkpoints.damaged/<step>``
    (outside orbax's folder, which orbax neither lists nor cleans up) and the
    manager reloaded, so those step numbers save afresh. A read-only
    Checkpointer moves nothing. Where no step reads, nothing moves and
    :class:`DamagedCheckpointError` lists each step and its error. Errors that
    are not damage (a target whose shapes or shardings do not fit) are raised
    as they are: an older step would fail the same way.

    Multi-host: every process tries the same steps, newest first, and after
    each try the processes all-gather its outcome, so all restore the same step
    even where only some read the damaged file (one process's iterator state,
    one host's shards). Steps are read with orbax's handler, not the manager,
    whose restore barrier would pair one process's try with another's. Process
    0 moves the folders; every process reloads the step list after a barrier.

The module runs past ~600 lines (about 460 of code, the rest docstrings and
comments) because telling damage from a caller's error, and getting every
process to fall back together, belong with the restore they guard.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from apt_jax.errors import UserError
from apt_jax.paths import as_path

__all__ = ["Checkpointer", "DamagedCheckpointError", "abstract_like", "read_config"]

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
CONFIG = "config"

# Grain's per-process iterator state files.
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")

# How many offending key paths / shapes a mismatch error lists.
_MAX_LISTED = 10

# Where damaged step folders are moved: `<workdir>/checkpoints.damaged/<step>`.
_DAMAGED_SUFFIX = ".damaged"

# Orbax 0.12's per-step metadata file; its `item_handlers` names the items saved.
_STEP_METADATA = "_CHECKPOINT_METADATA"

# Tensorstore's errors start with a status code. These mean bytes missing, short or
# undecodable; FAILED_PRECONDITION and INVALID_ARGUMENT do where tensorstore says
# it failed reading or decoding (a zstd stream cut short or overwritten, a JSON
# file it parses). UNAVAILABLE, DEADLINE_EXCEEDED and the like are left out: a
# flaky network is no reason to set a checkpoint aside.
_TENSORSTORE_STATUS = re.compile(r"([A-Z_]+): ")
_DAMAGE_STATUS = frozenset({"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND"})
_READ_STATUS = frozenset({"FAILED_PRECONDITION", "INVALID_ARGUMENT"})
_READ_FAILURE = re.compile(r"Error (reading|decoding)|[Tt]runcated|decompress")

# Longest error text a damage warning quotes (tensorstore appends its whole spec).
_MAX_ERROR_CHARS = 300


class DamagedCheckpointError(UserError, RuntimeError):
    """No checkpoint step asked for (or none at all) can be read back: its files are
    truncated, overwritten or missing. A user error (the launch scripts print its
    message, which lists the steps and what to do, as one line)."""


class _DamagedItem(Exception):
    """A step's files are incomplete in a way this module sees before orbax does."""


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The item -> handler map. ``item_names=`` is deprecated in orbax 0.12."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.StandardSave)
    registry.add(STATE, ocp.args.StandardRestore)
    registry.add(DATA, grain.checkpoint.CheckpointSave)
    registry.add(DATA, grain.checkpoint.CheckpointRestore)
    registry.add(CONFIG, ocp.args.JsonSave)
    registry.add(CONFIG, ocp.args.JsonRestore)
    return registry


class Checkpointer:
    """Saves and restores a run's train state, data-iterator state and config.

    Checkpoints live in ``<workdir>/checkpoints/<step>/``. Only the newest
    ``max_to_keep`` finalised steps are kept (orbax's ``LatestN`` preservation
    policy; ``CheckpointManagerOptions.max_to_keep`` is deprecated in 0.12).

    :meth:`restore` with ``step=None`` takes the newest step that reads and
    moves damaged newer ones aside (module docstring, "Damaged checkpoints").

    Saves are atomic: orbax writes each step into a temporary directory
    ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only once
    every item (on every host) is written, so a process killed in the middle
    of a save leaves the previous checkpoints intact; unfinalised directories
    are ignored by :meth:`latest_step` and :meth:`restore`, and deleted before
    the next save.

    Args:
        workdir: the run's directory (local path or ``gs://``).
        max_to_keep: how many of the newest checkpoints to keep; ``None``
            keeps all.
        async_save: write in a background thread. :meth:`save` returns once
            the arrays are copied to host memory; call
            :meth:`wait_until_finished` (or :meth:`close`) before reading the
            checkpoint back or exiting.
        read_only: open an existing run without creating directories or
            deleting anything; :meth:`save` then writes nothing.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        self.directory = as_path(workdir) / "checkpoints"
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Delete `<step>.orbax-checkpoint-tmp` leftovers of a killed save.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )
        # Reads go through the handler the manager wraps, without the manager's
        # restore barrier (see "Damaged checkpoints" in the module docstring).
        self._reader = ocp.CompositeCheckpointHandler(handler_registry=_handler_registry())
        self._closed = False

    # ------------------------------------------------------------------ steps

    def latest_step(self) -> int | None:
        """The newest finalised step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finalised steps, oldest first."""
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: grain.DatasetIterator | None = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Writes a checkpoint of ``state`` (and optionally iterator and config).

        Asynchronous by default: returns once the arrays are copied off the
        accelerator, so the caller may donate or overwrite ``state`` right
        away; the files are written in the background. The iterator state is
        captured synchronously, at the time of the call. The write goes to a
        temporary directory renamed on completion, so a crash mid-save leaves
        the previous checkpoint intact.

        Args:
            step: the step number the checkpoint is filed under.
            state: pytree of ``jax.Array`` (the train state).
            data_iterator: a grain ``DatasetIterator`` whose position to save.
            config: an ``ml_collections.ConfigDict`` (or a plain mapping) to
                store as JSON. Values JSON cannot represent are stored as
                ``str(value)``.
            force: save even where orbax's save policy would skip the step.
                Without it, a step not newer than :meth:`latest_step` is
                skipped (orbax's rule), e.g. after restoring an older step.

        Returns:
            Whether a save was started. A step that already has a checkpoint
            is never overwritten: it is skipped and ``False`` returned.
        """
        if step in self._manager.all_steps():
            log.info(
                "Checkpoint for step %d already exists in %s; not saving.", step, self.directory
            )
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_config_to_json(config))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    # ---------------------------------------------------------------- restore

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None = None,
        reposition: Callable[[grain.DatasetIterator, int], None] | None = None,
    ) -> tuple[Any, int]:
        """Reads a checkpoint's train state (and iterator position) back.

        With ``step=None`` (a resume) this takes the newest step that reads:
        damaged newer steps are skipped with a warning and moved to
        ``<workdir>/checkpoints.damaged/`` (see "Damaged checkpoints" in the
        module docstring).

        Args:
            step: which step; ``None`` takes the newest readable step.
            abstract_state: a pytree like the saved state whose leaves are
                ``jax.ShapeDtypeStruct`` carrying the TARGET shardings (and
                dtypes), e.g. from ``jax.eval_shape`` plus the run's sharding
                rules, or :func:`abstract_like`. The restored arrays get these
                shardings, so the mesh may differ from the one that saved.
                The result has this tree's structure (dataclasses, namedtuples
                and all), whatever containers the saved tree used. A leaf
                whose ``sharding`` is ``None`` gets the sharding recorded at
                save time, which only works where those devices exist.
            data_iterator: a grain ``DatasetIterator`` built like the saved
                one; its state is set in place. Needs the same number of
                processes as the run that saved, unless ``reposition`` is given.
            reposition: called as ``reposition(data_iterator, step)`` (after the
                state is read) where the restored step's iterator state does not
                restore onto this run: it was written by another number of
                processes (grain restores only onto the same count) or not saved
                at all. The training loop passes
                :func:`apt_jax.data.pipeline.seek_to_step`. Without it, those
                cases raise ValueError.

        Returns:
            ``(state, step)``, ``step`` being the step restored.

        Raises:
            FileNotFoundError: no checkpoint (at that step).
            DamagedCheckpointError: the step asked for cannot be read, or (with
                ``step=None``) no step can; the message names each step and its
                error. Nothing is moved then.
            ValueError: the saved tree's key paths or leaf shapes do not match
                ``abstract_state`` (the message lists them), the target's
                shardings do not fit the arrays, or the iterator state cannot be
                restored and no ``reposition`` is given.
        """
        candidates = self._candidates(step)
        damaged: list[tuple[int, str]] = []
        with _quiet_abandoned_reads():
            for candidate in candidates:
                try:
                    state, iterator_restored = self._read_step(
                        candidate, abstract_state, data_iterator, reposition
                    )
                except DamagedCheckpointError as e:
                    log.warning(
                        "Checkpoint step %d in %s is damaged and cannot be restored: %s",
                        candidate,
                        self.directory,
                        e,
                    )
                    damaged.append((candidate, str(e)))
                    continue
                break
            else:
                raise self._unreadable_error(damaged, asked=step)
        if damaged:
            self._set_aside([s for s, _ in damaged], restored=candidate)
        if data_iterator is not None and not iterator_restored:
            counts = sorted(self._saved_process_counts(candidate) or ())
            log.warning(
                "Checkpoint step %d holds data-iterator state of %s process(es), this run has "
                "%d: positioning the data iterator from the step instead.",
                candidate,
                counts or "no",
                jax.process_count(),
            )
            reposition(data_iterator, candidate)
        return state, candidate

    def restore_config(self, step: int | None = None) -> dict:
        """The config JSON stored with a checkpoint, as a plain dict.

        Use ``ml_collections.ConfigDict(d)`` to get a ConfigDict back. With
        ``step=None`` a damaged newest config is skipped with a warning for the
        next newest one (nothing is moved: only :meth:`restore` moves steps).
        Every process reads the same one file, so all agree without talking.

        Raises:
            FileNotFoundError: no checkpoint (at that step), or the step was
                saved without ``config=``.
            DamagedCheckpointError: the config asked for, or (with
                ``step=None``) every one, cannot be read.
        """
        damaged: list[tuple[int, str]] = []
        for candidate in self._candidates(step):
            step_dir = self.directory / str(candidate)
            config_dir = step_dir / CONFIG
            if not config_dir.exists() and CONFIG not in self._saved_items(candidate):
                raise FileNotFoundError(
                    f"Checkpoint step {candidate} in {self.directory} holds no config "
                    "(it was saved without config=)."
                )
            try:
                if not config_dir.exists():
                    raise _DamagedItem(f"the config folder {config_dir} is missing")
                restored = self._reader.restore(
                    step_dir, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
                )
            except Exception as e:
                if not _is_damage(e):
                    raise
                log.warning(
                    "The config of checkpoint step %d in %s is damaged and cannot be read: %s",
                    candidate,
                    self.directory,
                    _describe(e),
                )
                damaged.append((candidate, _describe(e)))
                continue
            return restored[CONFIG]
        raise self._unreadable_error(damaged, asked=step)

    def data_process_count(self, step: int | None = None) -> int | None:
        """How many processes wrote the data-iterator state of ``step`` (newest by
        default); ``None`` when the checkpoint holds none.

        Grain saves one ``process_{i}-of-{n}.json`` per process and restores
        only onto ``n`` processes; a caller resuming on another process count
        positions its iterator by other means (the training loop passes
        :func:`apt_jax.data.pipeline.seek_to_step` to :meth:`restore`).
        """
        step = self._resolve_step(step)
        counts = self._saved_process_counts(step)
        if counts is None:
            return None
        if len(counts) != 1:
            names = sorted(p.name for p in (self.directory / str(step) / DATA).iterdir())
            raise ValueError(
                f"Checkpoint step {step}: data-iterator files {names} name no single process count."
            )
        return counts.pop()

    # ------------------------------------------------------------- preemption

    def reached_preemption(self, step: int) -> bool:
        """Whether every host has agreed to save at ``step`` after a preemption.

        With ``jax.distributed`` initialised, JAX's preemption service catches
        SIGTERM on any host and picks a step that all hosts reach; this turns
        True on every host at that same step (call it every step). Without
        ``jax.distributed`` it is always False: use
        :class:`apt_jax.train.preemption.PreemptionGuard` instead.
        """
        return self._manager.reached_preemption(step)

    # -------------------------------------------------------------- lifecycle

    def wait_until_finished(self) -> None:
        """Blocks until background saves are written and finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads. Idempotent."""
        if not self._closed:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, steps={self.all_steps()})"

    # -------------------------------------------------------------- internals

    def _resolve_step(self, step: int | None) -> int:
        # A step being written in the background is already listed by orbax
        # but not readable yet: finish pending saves before reading.
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No finalised checkpoint in {self.directory}.")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; "
                f"available steps: {self.all_steps()}."
            )
        return step

    def _candidates(self, step: int | None) -> list[int]:
        """``[step]``, or with ``None`` every step, newest first (what a restore tries)."""
        if step is not None:
            return [self._resolve_step(step)]
        # A step being written in the background is already listed by orbax
        # but not readable yet: finish pending saves before reading.
        self._manager.wait_until_finished()
        candidates = sorted(self._manager.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"No finalised checkpoint in {self.directory}.")
        return candidates

    def _read_step(
        self,
        step: int,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None,
        reposition: Callable | None,
    ) -> tuple[Any, bool]:
        """One try at ``step``, made by every process together.

        Returns:
            ``(state, whether data_iterator's state was restored)``.

        Raises:
            DamagedCheckpointError: the step is damaged as read by any process
                (so that every process moves on to the next step together).
            The error itself where it is not damage (on another process: a
            RuntimeError pointing to that process's log).
        """
        step_dir = self.directory / str(step)
        result, error = None, None
        try:
            if not (step_dir / STATE).is_dir():
                raise _DamagedItem(f"the train-state folder {step_dir / STATE} is missing")
            self._check_state_matches(step, abstract_state)
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            with_data = data_iterator is not None and self._restores_iterator(step, reposition)
            if with_data:
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = self._reader.restore(step_dir, args=ocp.args.Composite(**items))
            result = (restored[STATE], with_data)
        except Exception as e:  # Judged below, with the other processes' outcomes.
            error = e
        outcome = _OK if error is None else _DAMAGED if _is_damage(error) else _FAILED
        outcomes = _all_processes(outcome)
        if (outcomes == _FAILED).any():
            if outcome == _FAILED:
                raise error
            failed = np.flatnonzero(outcomes == _FAILED).tolist()
            raise RuntimeError(
                f"Restoring checkpoint step {step} in {self.directory} failed on process(es) "
                f"{failed}; their logs say why."
            )
        if (outcomes == _DAMAGED).any():
            if outcome == _DAMAGED:
                raise DamagedCheckpointError(_describe(error)) from error
            others = np.flatnonzero(outcomes == _DAMAGED).tolist()
            raise DamagedCheckpointError(f"unreadable on process(es) {others} (see their logs)")
        return result

    def _unreadable_error(self, damaged: list[tuple[int, str]], asked: int | None):
        """The DamagedCheckpointError of a restore that found nothing readable."""
        if asked is not None:
            why = damaged[0][1]
            return DamagedCheckpointError(
                f"Checkpoint step {asked} in {self.directory} is damaged and cannot be "
                f"restored: {why}. Restore with step=None to take the newest readable step "
                f"(steps: {self.all_steps()}), or put back an intact copy of "
                f"{self.directory / str(asked)}."
            )
        listing = "; ".join(f"step {s} ({self.directory / str(s)}): {why}" for s, why in damaged)
        return DamagedCheckpointError(
            f"No checkpoint in {self.directory} can be restored, every step is damaged: "
            f"{listing}. Nothing was moved or deleted. To start the run over from step 0, "
            f"move these step folders out of {self.directory} (or use another workdir); to "
            "continue it, put back an intact copy of one of them."
        )

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Moves damaged step folders to ``checkpoints.damaged/`` (process 0), then
        makes every process's manager forget them."""
        if self._read_only:
            log.warning(
                "Restored step %d; the damaged newer step(s) %s stay in %s (read-only: "
                "nothing moved).",
                restored,
                steps,
                self.directory,
            )
            return
        if jax.process_index() == 0:
            root = self.directory.parent / (self.directory.name + _DAMAGED_SUFFIX)
            for step in steps:
                source, target = self.directory / str(step), _unused_path(root, str(step))
                try:
                    root.mkdir(parents=True, exist_ok=True)
                    source.rename(target)
                except OSError as e:
                    log.error(
                        "Could not move the damaged checkpoint %s to %s (%s): it stays "
                        "listed; move it out of %s by hand.",
                        source,
                        target,
                        e,
                        self.directory,
                    )
                else:
                    log.warning(
                        "Moved the damaged checkpoint step %d to %s (kept, not deleted); "
                        "restored step %d instead.",
                        step,
                        target,
                        restored,
                    )
        if jax.process_count() > 1:
            # Every process lists the steps afresh only once process 0's moves are done.
            multihost_utils.sync_global_devices("apt_jax Checkpointer: damaged steps moved")
        # Forget the moved steps, so that a later save of the same step number
        # is not skipped as existing and `latest_step` is the restored one.
        self._manager.reload()

    def _saved_items(self, step: int) -> set[str]:
        """The items the step's metadata says were saved; empty where it cannot tell
        (then a missing item folder reads as not saved, not as damage)."""
        try:
            metadata = json.loads((self.directory / str(step) / _STEP_METADATA).read_text())
            return set(metadata["item_handlers"])
        except Exception:  # Unreadable metadata is no damage to the items themselves.
            return set()

    def _saved_process_counts(self, step: int) -> set[int] | None:
        """The ``n`` of the step's ``process_{i}-of-{n}.json`` files; ``None`` without
        a data-iterator folder."""
        data_dir = self.directory / str(step) / DATA
        if not data_dir.exists():
            return None
        return {
            int(match.group(2))
            for match in (_PROCESS_FILE.fullmatch(p.name) for p in data_dir.iterdir())
            if match
        }

    def _check_state_matches(self, step: int, abstract_state: Any) -> None:
        """Raises a readable ValueError when the saved tree differs from the target."""
        try:
            metadata = self._manager.metadata(step).item_metadata[STATE]
        except Exception as e:  # Metadata is a nicety: let the restore itself report.
            # Damage is reported by the restore that follows; anything else, here.
            (log.info if _is_damage(e) else log.warning)(
                "Could not read the state metadata of step %d: %s", step, _describe(e)
            )
            return
        if metadata is None:
            return
        saved = _leaves_by_name(getattr(metadata, "tree", metadata))
        wanted = _leaves_by_name(abstract_state)
        missing = [wanted[k][0] for k in wanted if k not in saved]
        unexpected = [saved[k][0] for k in saved if k not in wanted]
        mismatched = []
        for name, (path, leaf) in wanted.items():
            if name not in saved:
                continue
            saved_shape = getattr(saved[name][1], "shape", None)
            wanted_shape = getattr(leaf, "shape", None)
            if saved_shape is not None and wanted_shape is not None:
                if tuple(saved_shape) != tuple(wanted_shape):
                    mismatched.append((path, tuple(saved_shape), tuple(wanted_shape)))
        if not (missing or unexpected or mismatched):
            return
        lines = [
            f"The train state saved at step {step} in {self.directory / str(step)} "
            "does not match abstract_state:"
        ]
        if missing:
            lines.append(
                f"  {len(missing)} key path(s) in abstract_state missing from the checkpoint: "
                + _listing(jax.tree_util.keystr(p) for p in missing)
            )
        if unexpected:
            lines.append(
                f"  {len(unexpected)} unexpected key path(s) in the checkpoint, not in "
                "abstract_state: " + _listing(jax.tree_util.keystr(p) for p in unexpected)
            )
        if mismatched:
            lines.append(
                f"  {len(mismatched)} shape mismatch(es) (saved vs expected): "
                + _listing(
                    f"{jax.tree_util.keystr(p)}: saved {s} vs expected {w}"
                    for p, s, w in mismatched
                )
            )
        raise ValueError("\n".join(lines))

    def _restores_iterator(self, step: int, reposition: Callable | None) -> bool:
        """Whether ``step``'s iterator state restores onto this run; ``False`` where
        ``reposition`` places the iterator instead.

        Fails early and clearly where grain's handler would fail obscurely:
        ValueError where the state is absent or from another process count and
        no ``reposition`` is given; damage where this process's file is missing
        though the step was written by this process count.
        """
        data_dir = self.directory / str(step) / DATA
        if not data_dir.exists():
            if DATA in self._saved_items(step):
                raise _DamagedItem(f"the data-iterator folder {data_dir} is missing")
            if reposition is not None:
                return False
            raise ValueError(
                f"Checkpoint step {step} in {self.directory} holds no data-iterator state "
                "(it was saved without data_iterator=); restore without data_iterator."
            )
        index, count = jax.process_index(), jax.process_count()
        if (data_dir / f"process_{index}-of-{count}.json").exists():
            return True
        found = sorted(p.name for p in data_dir.iterdir())
        counts = self._saved_process_counts(step)
        if not counts or count in counts:
            # The step was saved with an iterator, by this many processes: the
            # file is lost, not from another run layout.
            raise _DamagedItem(
                f"{data_dir} lacks process_{index}-of-{count}.json, the data-iterator state "
                f"of process {index} (found {found})"
            )
        if reposition is not None:
            return False
        raise ValueError(
            f"Checkpoint step {step} holds no iterator state for process {index} of "
            f"{count} (found {found}). Grain iterator state restores only with the "
            "process count that saved it; restore without data_iterator= and position "
            "the iterator from the step (apt_jax.data.pipeline.seek_to_step, what the "
            "training loop passes as reposition=)."
        )


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves for :meth:`Checkpointer.restore`.

    Args:
        tree: pytree of arrays or abstract arrays (e.g. ``jax.eval_shape``
            output).
        shardings: ``None`` (keep each leaf's own ``.sharding``), one
            ``jax.sharding.Sharding`` for every leaf, or a pytree of shardings
            matching ``tree``.
    """

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding, weak_type=getattr(x, "weak_type", False)
        )

    if shardings is None:
        return jax.tree.map(lambda x: sds(x, getattr(x, "sharding", None)), tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: sds(x, shardings), tree)
    return jax.tree.map(sds, tree, shardings)


def read_config(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The config stored with a run's checkpoint (newest by default), read-only."""
    with Checkpointer(workdir, read_only=True, async_save=False) as ckpt:
        return ckpt.restore_config(step)


# ----------------------------------------------------------------- helpers

# One process's outcome of a try at a step, as exchanged between processes.
_OK, _DAMAGED, _FAILED = 0, 1, 2


def _all_processes(outcome: int) -> np.ndarray:
    """Every process's ``outcome``, indexed by process (a collective: all must call)."""
    if jax.process_count() == 1:
        return np.array([outcome])
    return np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was explicitly raised from (``raise ... from``).

    Only ``__cause__``: an implicit ``__context__`` may be an unrelated error
    handled earlier (a missing optional file) that would pass a user error off
    as damage.
    """
    for _ in range(32):  # a chain is short; the bound guards against cycles
        if error is None:
            return
        yield error
        error = error.__cause__


def _is_damage(error: BaseException) -> bool:
    """Whether ``error`` means the checkpoint's bytes are missing, short or undecodable.

    Orbax wraps tensorstore's errors (a ValueError whose message starts with its
    status code) in a bare Exception, so the whole chain is looked at. A shape,
    dtype or sharding that does not fit (a wrong target, not damage) raises a
    plain ValueError or TypeError with none of these.
    """
    for e in _causes(error):
        if isinstance(
            e,
            _DamagedItem
            | FileNotFoundError
            | NotADirectoryError
            | IsADirectoryError
            | EOFError
            | UnicodeDecodeError
            | json.JSONDecodeError,
        ):
            return True
        if isinstance(e, OSError) and e.errno == errno.EIO:
            return True
        status = _TENSORSTORE_STATUS.match(str(e))
        if status and (
            status.group(1) in _DAMAGE_STATUS
            or (status.group(1) in _READ_STATUS and _READ_FAILURE.search(str(e)))
        ):
            return True
    return False


def _describe(error: BaseException) -> str:
    """The innermost error of the chain, on one line, cut short."""
    *_, root = _causes(error)
    lines = str(root).strip().splitlines()
    text = lines[0] if lines else ""
    if not (isinstance(root, _DamagedItem) or _TENSORSTORE_STATUS.match(text)):
        text = f"{type(root).__name__}: {text}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """Logs (at debug level) instead of printing the read errors of orbax's
    abandoned coroutines.

    Where one array of a step fails to read, orbax's other reads of that step are
    dropped unfinished, and each reports the error it was reading or the
    GeneratorExit of its closing, with tensorstore's whole spec, as "Exception
    ignored in: <coroutine ...>" on stderr when it is garbage-collected: a
    screenful per damaged step, after the one warning that says it all.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        abandoned = error is not None and (
            _is_damage(error) or any(isinstance(e, GeneratorExit) for e in _causes(error))
        )
        # Tensorstore's callbacks for reads that finish after orbax closed their
        # event loop: nothing is waiting for them any more.
        late = unraisable.object is None and str(error) == "Event loop is closed"
        if (abandoned and isinstance(unraisable.object, types.CoroutineType)) or late:
            log.debug("%s: %s", unraisable.err_msg, _describe(error))
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # Finalise the abandoned reads while the hook is in place.
        sys.unraisablehook = previous


def _unused_path(root: epath.Path, name: str) -> epath.Path:
    """``root / name``, or ``root / f"{name}-{i}"`` for the first ``i`` not taken."""
    path, i = root / name, 0
    while path.exists():
        i += 1
        path = root / f"{name}-{i}"
    return path


def _key_name(key: Any) -> str:
    """One path entry as orbax names it: dict key, sequence index or field name."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _leaves_by_name(tree: Any) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """``{normalised path: (key path, leaf)}``.

    Orbax stores dataclasses and namedtuples as dicts and tuples as lists, so
    paths are compared by their entry names (``.mu`` and ``['mu']`` agree).
    Empty nodes (``None``, ``optax.EmptyState()``) have no leaves on either side.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in path): (path, leaf) for path, leaf in leaves}


def _listing(items) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def _config_to_json(config: Any) -> dict:
    """A ConfigDict or mapping as a JSON-clean dict (``str()`` for the rest)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a ConfigDict or a mapping, got {type(config)}.")
    return json.loads(json.dumps(dict(config), default=_json_default))
