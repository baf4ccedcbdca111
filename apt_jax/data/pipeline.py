"""The generic grain input pipeline every recipe uses.

Order of operations, for a random-access ``source`` of ``N`` records, ``B``
the global batch size and ``P`` the process count::

    grain.MapDataset.source(source)
        .seed(seed)                      # one seed for every random op below
        .shuffle()                       # one global permutation of the N records
        .repeat()                        # infinite epochs, reshuffled each epoch
        .batch(B // P, drop_remainder=True)  # blocks of B / P consecutive records
        [process_index::process_count]   # this process's block of every global batch
        .to_iter_dataset()
        .mp_prefetch(...)                # only when worker_count > 0

Why this order:

* Shuffle *before* shard. Every process builds the same global permutation
  (same seed) and keeps its part of it, so the processes read disjoint
  records and together cover exactly what a single process would have read.
  Sharding first and shuffling per shard would pin each record to one process
  forever.
* Repeat after shuffle with ``reseed_each_epoch`` (grain's default): each epoch
  is a fresh permutation, and the stream is infinite, so a train loop counts
  steps, not epochs.
* Batch into blocks of ``B / P``, then shard the blocks: at step ``s`` process
  ``p`` holds the global elements ``[s * B + p * B / P, s * B + (p + 1) * B / P)``,
  a contiguous block. `apt_jax.train.sharding.make_global_batch` places process
  ``p``'s rows at exactly those rows of the global batch (where each process's
  devices are consecutive along the batch axes, as in ``jax.devices()`` order),
  so the global batch of step ``s`` is the single-process stream's batch
  ``[s * B, (s + 1) * B)``, in the same row order, whatever the process count:
  per-example noise (drawn for the global batch) meets the same example, and
  runs on 1 or P processes compute the same update.
* Everything up to the shard is a ``MapDataset`` (random access, index
  arithmetic only), so the iterator state is just a position (the number of
  steps consumed): ``get_state()`` / ``set_state()`` restore it exactly,
  grain's orbax handlers (``grain.checkpoint.CheckpointSave/CheckpointRestore``)
  save it per process, and :func:`seek_to_step` can put a fresh iterator at
  any step, which is how a run resumes on another process count.
* ``mp_prefetch`` comes last; with workers the batch order is unchanged
  (workers take interleaved slices and are read round-robin), so results do not
  depend on ``worker_count``. It spawns processes that re-import ``__main__``:
  launch scripts must guard their work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

from typing import Any

import grain


def make_train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator of this process's batches.

    Args:
      source: a random-access source (``__len__`` and ``__getitem__``) of records,
        e.g. ``DigitsSource()`` or ``tfds.data_source(...)``.
      global_batch_size: batch size summed over all processes.
      seed: seed of the shuffle; the stream is a deterministic function of it.
      process_index / process_count: this process's shard; default
        ``jax.process_index()`` / ``jax.process_count()``.
      shuffle: shuffle (and reshuffle every epoch); off gives the source order.
      worker_count: grain worker processes (``mp_prefetch``); 0 reads in-process.
      worker_buffer_size: batches each worker prefetches.

    Returns:
      A ``grain.DatasetIterator`` yielding dicts (the record's structure) of numpy
      arrays with a leading per-process batch dim ``global_batch_size //
      process_count``. ``it.get_state()`` / ``it.set_state(state)`` save and
      restore its position.
    """
    if process_index is None or process_count is None:
        import jax

        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive; got {global_batch_size}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the process count "
            f"{process_count}; set batch_size to a multiple of {process_count}."
        )
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0; got {worker_count}.")
    if len(source) == 0:
        raise ValueError("The data source is empty.")

    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat()
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]
    ds = ds.to_iter_dataset()
    if worker_count > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(ds)


def seek_to_step(iterator: grain.DatasetIterator, step: int) -> None:
    """Puts a fresh iterator of :func:`make_train_iterator` at ``step`` (in place).

    After the call the next batch is the one of step ``step + 1`` (``step``
    batches consumed), whatever the process count that produced earlier steps:
    the pipeline's position is a pure function of the step. This is how a run
    resumes when the checkpoint's per-process iterator states were written by
    another number of processes.

    Args:
      iterator: an iterator returned by :func:`make_train_iterator` (with or
        without workers), not yet advanced.
      step: number of batches already consumed, ``>= 0``.

    Raises:
      ValueError: a negative step, or an iterator whose state format this does
        not know (not one of :func:`make_train_iterator`'s).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    state = iterator.get_state()
    if set(state) == {"next_index"}:
        # In-process iterator over the MapDataset: one element per step.
        iterator.set_state({"next_index": step})
        return
    if "iterators_in_use_states" in state and "next_index_in_cycle" in state:
        # mp_prefetch: worker w reads elements w, w + W, ... and the workers
        # are read round-robin, so after `step` elements worker w has read
        # ceil((step - w) / W) of them and worker `step % W` is next.
        workers = len(state["iterators_in_use_states"])
        worker_states = [s for s in state["iterators_in_use_states"]]
        if not all(set(s) == {"next_index"} for s in worker_states):
            raise ValueError(f"Unknown grain worker iterator state {worker_states}.")
        state = dict(state)
        state["next_index_in_cycle"] = step % workers
        state["next_index_in_datasets"] = workers
        state["iterators_in_use_indices"] = list(range(workers))
        state["iterators_in_use_states"] = [
            {"next_index": max(0, -(-(step - w) // workers))} for w in range(workers)
        ]
        state["exhausted"] = [0] * workers
        state["future_states"] = {}
        iterator.set_state(state)
        return
    raise ValueError(
        f"Cannot seek a grain iterator with state keys {sorted(state)} to step {step}; "
        "seek_to_step knows the iterators of make_train_iterator only."
    )
