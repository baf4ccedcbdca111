"""Checkpoints of a training run: train state, data-iterator state and config.

A thin wrapper around :class:`orbax.checkpoint.CheckpointManager` (orbax
0.12.x) used by every training recipe. One checkpoint step holds up to three
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
the hosts inside ``save`` and ``restore``); the directory must be shared
between hosts (a network file system or ``gs://``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "abstract_like", "read_config"]

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
CONFIG = "config"

# Grain's per-process iterator state files.
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")

# How many offending key paths / shapes a mismatch error lists.
_MAX_LISTED = 10


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


def _as_path(path: str | os.PathLike) -> epath.Path:
    """Absolute local path, or a cloud path (``gs://...``) unchanged."""
    path = os.fspath(path)
    if "://" not in path:
        path = os.path.abspath(path)
    return epath.Path(path)


class Checkpointer:
    """Saves and restores a run's train state, data-iterator state and config.

    Checkpoints live in ``<workdir>/checkpoints/<step>/``. Only the newest
    ``max_to_keep`` finalised steps are kept (orbax's ``LatestN`` preservation
    policy; ``CheckpointManagerOptions.max_to_keep`` is deprecated in 0.12).

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
        self.directory = _as_path(workdir) / "checkpoints"
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
        self._closed = False

    # ------------------------------------------------------------------ steps

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The underlying orbax manager, for anything this wrapper lacks."""
        return self._manager

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
    ) -> tuple[Any, int]:
        """Reads a checkpoint's train state (and iterator position) back.

        Args:
            step: which step; ``None`` takes :meth:`latest_step`.
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
                processes as the run that saved.

        Returns:
            ``(state, step)``.

        Raises:
            FileNotFoundError: no checkpoint (at that step).
            ValueError: the saved tree's key paths or leaf shapes do not match
                ``abstract_state`` (the message lists them), or the checkpoint
                holds no iterator state for this process.
        """
        step = self._resolve_step(step)
        self._check_state_matches(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            self._check_data_item(step)
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], step

    def restore_config(self, step: int | None = None) -> dict:
        """The config JSON stored with a checkpoint, as a plain dict.

        Use ``ml_collections.ConfigDict(d)`` to get a ConfigDict back.
        """
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
            )
        except KeyError as e:
            raise FileNotFoundError(
                f"Checkpoint step {step} in {self.directory} holds no config "
                "(it was saved without config=)."
            ) from e
        return restored[CONFIG]

    def data_process_count(self, step: int | None = None) -> int | None:
        """How many processes wrote the data-iterator state of ``step`` (newest by
        default); ``None`` when the checkpoint holds none.

        Grain saves one ``process_{i}-of-{n}.json`` per process and restores
        only onto ``n`` processes; a caller resuming on another process count
        positions its iterator by other means (the training loop uses
        :func:`apt_jax.data.pipeline.seek_to_step`).
        """
        step = self._resolve_step(step)
        data_dir = self.directory / str(step) / DATA
        if not data_dir.exists():
            return None
        counts = set()
        for path in data_dir.iterdir():
            match = _PROCESS_FILE.fullmatch(path.name)
            if match:
                counts.add(int(match.group(2)))
        if len(counts) != 1:
            names = sorted(p.name for p in data_dir.iterdir())
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

    def _check_state_matches(self, step: int, abstract_state: Any) -> None:
        """Raises a readable ValueError when the saved tree differs from the target."""
        try:
            metadata = self._manager.metadata(step).item_metadata[STATE]
        except Exception:  # Metadata is a nicety: let orbax's restore report.
            log.warning("Could not read the state metadata of step %d.", step, exc_info=True)
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

    def _check_data_item(self, step: int) -> None:
        """Fails early and clearly where grain's handler would fail obscurely."""
        data_dir = self.directory / str(step) / DATA
        if not data_dir.exists():
            raise ValueError(
                f"Checkpoint step {step} in {self.directory} holds no data-iterator state "
                "(it was saved without data_iterator=); restore without data_iterator."
            )
        index, count = jax.process_index(), jax.process_count()
        if not (data_dir / f"process_{index}-of-{count}.json").exists():
            found = sorted(p.name for p in data_dir.iterdir())
            raise ValueError(
                f"Checkpoint step {step} holds no iterator state for process {index} of "
                f"{count} (found {found}). Grain iterator state restores only with the "
                "process count that saved it; restore without data_iterator= and position "
                "the iterator from the step (apt_jax.data.pipeline.seek_to_step, what the "
                "training loop does)."
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
