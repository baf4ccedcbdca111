"""Tests for the digits source and the generic grain pipeline."""

import json

import numpy as np
import pytest

from apt_jax.data.digits import IMAGE_SHAPE, NUM_CLASSES, DigitsSource, load_digits_arrays
from apt_jax.data.pipeline import make_train_iterator


class IndexSource:
    """Record i is {"index": i}: makes the pipeline's element order visible."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": np.int64(i)}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def close(it):
    if hasattr(it, "close"):
        it.close()


# ---- digits ---------------------------------------------------------------


def test_digits_arrays_shape_range_labels():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, *IMAGE_SHAPE) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    # 0..16 integer pixels map to multiples of 1/8 in [-1, 1].
    np.testing.assert_array_equal((images + 1.0) * 8.0, np.round((images + 1.0) * 8.0))
    assert set(np.unique(labels).tolist()) == set(range(NUM_CLASSES))
    assert np.bincount(labels).min() >= 170
    assert not images.flags.writeable and not labels.flags.writeable
    assert load_digits_arrays()[0] is images  # cached


def test_digits_source_records():
    src = DigitsSource()
    images, labels = load_digits_arrays()
    assert len(src) == 1797
    rec = src[5]
    assert rec["image"].shape == IMAGE_SHAPE and rec["image"].dtype == np.float32
    assert rec["label"].dtype == np.int32 and np.ndim(rec["label"]) == 0
    np.testing.assert_array_equal(rec["image"], images[5])
    assert rec["label"] == labels[5]
    assert src[np.int64(7)]["label"] == labels[7]


# ---- pipeline -------------------------------------------------------------


def test_batch_shapes_and_dtypes():
    it = make_train_iterator(
        DigitsSource(), global_batch_size=16, seed=0, process_index=0, process_count=2
    )
    batch = next(it)
    assert batch["image"].shape == (8, *IMAGE_SHAPE) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_default_process_is_jax_process():
    it = make_train_iterator(DigitsSource(), global_batch_size=4, seed=0)
    ref = make_train_iterator(
        DigitsSource(), global_batch_size=4, seed=0, process_index=0, process_count=1
    )
    assert_batches_equal(take(it, 2), take(ref, 2))


def test_deterministic_for_seed_and_seeds_differ():
    mk = lambda seed: make_train_iterator(
        DigitsSource(), global_batch_size=32, seed=seed, process_index=0, process_count=1
    )
    a, b, c = take(mk(3), 4), take(mk(3), 4), take(mk(4), 4)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))


def test_epochs_are_permutations_reshuffled_each_epoch():
    n, bs = 37, 5
    it = make_train_iterator(
        IndexSource(n), global_batch_size=bs, seed=1, process_index=0, process_count=1
    )
    stream = np.concatenate([b["index"] for b in take(it, 3 * n // bs + 1)])
    epoch1, epoch2 = stream[:n], stream[n : 2 * n]
    assert sorted(epoch1.tolist()) == list(range(n))
    assert sorted(epoch2.tolist()) == list(range(n))
    assert not np.array_equal(epoch1, epoch2)
    assert not np.array_equal(epoch1, np.arange(n))  # shuffled


def test_no_shuffle_is_source_order():
    it = make_train_iterator(
        IndexSource(10),
        global_batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        shuffle=False,
    )
    stream = np.concatenate([b["index"] for b in take(it, 5)])
    np.testing.assert_array_equal(stream, np.arange(20) % 10)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_disjoint_and_cover_global_batch(process_count):
    n, gbs, steps = 53, 8, 12
    mk = lambda i, c: make_train_iterator(
        IndexSource(n), global_batch_size=gbs, seed=7, process_index=i, process_count=c
    )
    global_batches = take(mk(0, 1), steps)
    shards = [take(mk(i, process_count), steps) for i in range(process_count)]
    for s in range(steps):
        parts = [shards[i][s]["index"] for i in range(process_count)]
        assert all(p.shape == (gbs // process_count,) for p in parts)
        union = np.concatenate(parts)
        # Disjoint within the step (an epoch has n > gbs distinct elements) ...
        assert len(set(union.tolist())) == gbs
        # ... and together exactly the single-process global batch of that step.
        assert sorted(union.tolist()) == sorted(global_batches[s]["index"].tolist())


def test_digits_process_shards_cover_global_batch():
    mk = lambda i, c: make_train_iterator(
        DigitsSource(), global_batch_size=16, seed=0, process_index=i, process_count=c
    )
    g = next(mk(0, 1))
    p0, p1 = next(mk(0, 2)), next(mk(1, 2))
    key = lambda imgs: sorted(x.tobytes() for x in imgs)
    assert key(np.concatenate([p0["image"], p1["image"]])) == key(g["image"])


def test_get_state_set_state_resumes_exactly():
    mk = lambda: make_train_iterator(
        DigitsSource(), global_batch_size=12, seed=5, process_index=1, process_count=2
    )
    it = mk()
    take(it, 5)
    state = it.get_state()
    json.dumps(state)  # plain JSON, as grain's orbax handler stores it
    expected = take(it, 3)
    fresh = mk()
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    # A later state still resumes after more epochs have passed.
    take(it, 400)
    state2 = it.get_state()
    expected2 = take(it, 2)
    fresh2 = mk()
    fresh2.set_state(state2)
    assert_batches_equal(take(fresh2, 2), expected2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(global_batch_size=10, process_count=4, process_index=0),
            "global_batch_size=10 is not divisible by the process count 4",
        ),
        (
            dict(global_batch_size=0, process_count=1, process_index=0),
            "global_batch_size must be positive; got 0",
        ),
        (
            dict(global_batch_size=8, process_count=2, process_index=2),
            r"process_index=2 must lie in \[0, process_count=2\)",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_train_iterator(DigitsSource(), seed=0, **kwargs)


@pytest.mark.slow  # grain's worker_count=1 starts a worker process
def test_worker_prefetch_matches_in_process_and_resumes():
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    mk = lambda w: make_train_iterator(
        DigitsSource(),
        global_batch_size=8,
        seed=2,
        process_index=0,
        process_count=2,
        worker_count=w,
    )
    ref = mk(0)
    it = mk(1)
    try:
        assert_batches_equal(take(it, 20), take(ref, 20))
        state = it.get_state()
        json.dumps(state)
        expected = take(ref, 3)
    finally:
        close(it)
    fresh = mk(1)
    try:
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 3), expected)
    finally:
        close(fresh)
