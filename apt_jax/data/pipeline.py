"""The generic grain input pipeline every recipe uses.

Order of operations, for a random-access ``source`` of ``N`` records::

    grain.MapDataset.source(source)
        .seed(seed)                      # one seed for every random op below
        .shuffle()                       # one global permutation of the N records
        .repeat()                        # infinite epochs, reshuffled each epoch
        [process_index::process_count]   # this process's slice of the global stream
        .batch(global_batch_size // process_count, drop_remainder=True)
        .to_iter_dataset()
        .mp_prefetch(...)                # only when worker_count > 0

Why this order:

* Shuffle *before* shard. Every process builds the same global permutation
  (same seed) and keeps a strided slice of it, so the processes read disjoint
  records and together cover exactly what a single process would have read.
  Sharding first and shuffling per shard would pin each record to one process
  forever.
* Repeat after shuffle with ``reseed_each_epoch`` (grain's default): each epoch
  is a fresh permutation, and the stream is infinite, so a train loop counts
  steps, not epochs.
* Shard the *element* stream, then batch: at step ``s`` process ``p`` holds
  global elements ``s * B + p, s * B + p + P, ...`` (``B`` the global batch,
  ``P`` the process count); the union over processes of step ``s`` is the
  global batch ``[s * B, (s + 1) * B)`` of the single-process stream.
* Everything up to ``batch`` is a ``MapDataset`` (random access, index
  arithmetic only), so the iterator state is just a position: ``get_state()``
  / ``set_state()`` restore it exactly, and grain's orbax handlers
  (``grain.checkpoint.CheckpointSave/CheckpointRestore``) save it per process.
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
    ds = ds[process_index::process_count]
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    ds = ds.to_iter_dataset()
    if worker_count > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(ds)
