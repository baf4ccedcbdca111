"""Tests for apt_jax.train.checkpoint and apt_jax.train.preemption (CPU, 8 devices)."""

import os
import shutil
import signal
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apt_jax.train import preemption
from apt_jax.train.checkpoint import Checkpointer, abstract_like, read_config
from apt_jax.train.preemption import PreemptionGuard


def _mesh_1d(n=8):
    return Mesh(np.array(jax.devices()[:n]), ("fsdp",))


def _state(mesh):
    """Float and int leaves; the (16, 4) matrix sharded over the mesh."""
    w = jax.device_put(
        jnp.arange(64, dtype=jnp.float32).reshape(16, 4), NamedSharding(mesh, P("fsdp"))
    )
    replicated = NamedSharding(mesh, P())
    return {
        "params": {
            "w": w,
            "b": jax.device_put(jnp.linspace(-1.0, 1.0, 4), replicated),
        },
        "opt": [
            jax.device_put(jnp.full((16, 4), 0.5, jnp.bfloat16), NamedSharding(mesh, P("fsdp")))
        ],
        "step": jax.device_put(jnp.array(7, jnp.int32), replicated),
        "counts": jax.device_put(jnp.arange(5, dtype=jnp.int32), replicated),
    }


def _shardings(mesh, big_spec):
    return {
        "params": {"w": NamedSharding(mesh, big_spec), "b": NamedSharding(mesh, P())},
        "opt": [NamedSharding(mesh, big_spec)],
        "step": NamedSharding(mesh, P()),
        "counts": NamedSharding(mesh, P()),
    }


def _assert_same_values(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_shardings(tree, shardings):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert x.sharding == s, (x.sharding, s)


def test_roundtrip_sharded_state(tmp_path):
    mesh = _mesh_1d()
    state = _state(mesh)
    target = _shardings(mesh, P("fsdp"))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state)
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 10
        restored, step = ckpt.restore(abstract_state=abstract_like(state, target))
    assert step == 10
    _assert_same_values(restored, state)
    _assert_shardings(restored, target)
    assert restored["step"].dtype == jnp.int32


def test_restore_right_after_async_save(tmp_path, caplog):
    # The step is listed while still being written; restore must wait for it.
    state = {"w": jnp.arange(256 * 1024, dtype=jnp.float32).reshape(512, 512)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored, step = ckpt.restore(abstract_state=abstract_like(state))
    assert step == 1
    _assert_same_values(restored, state)
    assert "Could not read" not in caplog.text


@pytest.mark.parametrize(
    "make_mesh, spec",
    [
        (lambda: Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp")), P("fsdp", "data")),
        (
            lambda: Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp")),
            P(("data", "fsdp")),
        ),
        (lambda: _mesh_1d(4), P("fsdp")),
        (lambda: _mesh_1d(1), P()),
    ],
    ids=["2x4-transposed", "2x4-flat", "4-devices", "1-device"],
)
def test_restore_onto_other_mesh(tmp_path, make_mesh, spec):
    state = _state(_mesh_1d())
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
    new_mesh = make_mesh()
    target = _shardings(new_mesh, spec)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target
    )
    with Checkpointer(tmp_path) as ckpt:
        restored, step = ckpt.restore(3, abstract_state=abstract)
    assert step == 3
    _assert_same_values(restored, state)
    _assert_shardings(restored, target)


class _TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt: tuple


def test_namedtuple_state_restores_to_its_own_type(tmp_path):
    # Orbax stores the namedtuple as a dict and the tuple as a list; the key
    # comparison must not report that as a mismatch.
    state = _TrainState(
        step=jnp.array(2, jnp.int32),
        params={"w": jnp.ones((2, 3))},
        opt=((), {"mu": jnp.zeros((2, 3))}, None),
    )
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        restored, _ = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
    assert isinstance(restored, _TrainState)
    _assert_same_values(restored, state)


def _make_iterator():
    ds = grain.MapDataset.range(100).seed(0).shuffle().repeat().batch(4)
    return iter(ds.to_iter_dataset())


def test_grain_iterator_roundtrip(tmp_path):
    state = {"x": jnp.zeros(3)}
    it = _make_iterator()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, data_iterator=it)
        # Keep consuming while the save may still be running in the background.
        recorded = [np.asarray(next(it)) for _ in range(2)]
    fresh = _make_iterator()
    assert not np.array_equal(np.asarray(next(_make_iterator())), recorded[0])
    with Checkpointer(tmp_path) as ckpt:
        _, step = ckpt.restore(abstract_state=jax.eval_shape(lambda: state), data_iterator=fresh)
    assert step == 3
    for want in recorded:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)


def test_restore_iterator_absent_from_checkpoint(tmp_path):
    state = {"x": jnp.zeros(3)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore(abstract_state=state, data_iterator=_make_iterator())


def test_config_roundtrip(tmp_path):
    config = ml_collections.ConfigDict()
    config.seed = 3
    config.lr = 1e-4
    config.name = "apt"
    config.model = ml_collections.ConfigDict({"num_layers": 2, "dims": (8, 16), "qk_norm": None})
    config.dtype = np.float32(0.5)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.zeros(2)}, config=config)
        ckpt.save(2, {"x": jnp.zeros(2)})
        ckpt.wait_until_finished()
        got = ckpt.restore_config(1)
        with pytest.raises(FileNotFoundError, match=r"holds no config \(it was saved without"):
            ckpt.restore_config()  # step 2 was saved without a config
    expected = {
        "seed": 3,
        "lr": 1e-4,
        "name": "apt",
        "model": {"num_layers": 2, "dims": [8, 16], "qk_norm": None},
        "dtype": 0.5,
    }
    assert got == expected
    assert read_config(tmp_path, step=1) == expected
    assert ml_collections.ConfigDict(got).model.num_layers == 2


def test_read_config_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No finalised checkpoint in \S*nothing"):
        read_config(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # read-only: nothing created


def test_latest_step_and_max_to_keep(tmp_path):
    state = {"x": jnp.zeros(2), "step": jnp.array(0, jnp.int32)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 5
        assert ckpt.all_steps() == [4, 5]
        # An existing step is never overwritten.
        assert not ckpt.save(5, state, force=True)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 5
        with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 2 .*steps: \[4, 5\]"):
            ckpt.restore(2, abstract_state=state)


def test_mismatched_keys_raise_readable_error(tmp_path):
    state = {"params": {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}, "step": jnp.array(0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state)
        ckpt.wait_until_finished()
        abstract = jax.eval_shape(lambda: state)
        abstract = {
            "params": {"w": abstract["params"]["w"], "extra": abstract["params"]["b"]},
            "step": abstract["step"],
        }
        with pytest.raises(ValueError, match="saved at step 4 .* does not match") as info:
            ckpt.restore(abstract_state=abstract)
    msg = str(info.value)
    assert "step 4" in msg
    assert "['params']['extra']" in msg  # missing from the checkpoint
    assert "['params']['b']" in msg  # unexpected in the checkpoint
    assert "missing" in msg and "unexpected" in msg


def test_mismatched_shapes_raise_readable_error(tmp_path):
    state = {"params": {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        abstract = jax.eval_shape(lambda: state)
        abstract["params"]["w"] = jax.ShapeDtypeStruct((5, 2), jnp.float32)
        with pytest.raises(ValueError, match=r"shape mismatch\(es\) \(saved vs expected\)") as info:
            ckpt.restore(abstract_state=abstract)
    msg = str(info.value)
    assert "['params']['w']" in msg
    assert "saved (4, 2) vs expected (5, 2)" in msg
    assert "['params']['b']" not in msg


def test_unfinalised_checkpoint_is_ignored(tmp_path):
    """A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`; it is ignored."""
    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state)
    root = tmp_path / "checkpoints"
    # What orbax leaves when killed while writing step 6 (and an older-style name).
    shutil.copytree(root / "5", root / "6.orbax-checkpoint-tmp")
    shutil.rmtree(root / "6.orbax-checkpoint-tmp" / "state")
    (root / "6.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp").mkdir()
    (root / "7.orbax-checkpoint-tmp-1700000000").mkdir()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 5
        assert ckpt.all_steps() == [5]
        restored, step = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
        assert step == 5
        _assert_same_values(restored, state)
        # The next save clears the leftovers.
        ckpt.save(6, {"x": jnp.arange(4.0) + 1})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5, 6]
    assert sorted(os.listdir(root)) == ["5", "6"]


def test_sync_save(tmp_path):
    state = {"x": jnp.arange(3)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        assert (tmp_path / "checkpoints" / "1" / "state").is_dir()


def test_reached_preemption_is_false_single_process(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert not ckpt.reached_preemption(1)


def test_preemption_guard_catches_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert guard.installed
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested  # and we are still alive
        assert guard.signal_received == signal.SIGTERM
    assert not guard.installed
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_defers_to_jax_distributed(monkeypatch):
    monkeypatch.setattr(preemption, "distributed_initialized", lambda: True)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.installed
        assert signal.getsignal(signal.SIGTERM) is before
    assert not guard.requested


# ------------------------------------------------- the real train state, remeshed
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny SFT train state (its shapes, dtypes, shardings) written under fsdp=8."""
    from apt_jax.tasks import build_task
    from apt_jax.train import sharding
    from configs import digits_sft

    config = digits_sft.get_config("tiny")
    task = build_task(config, sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    shardings = jax.tree.map(lambda s: s.sharding, task.abstract_state)

    def distinct():
        # Every leaf its own values (no model init to compile: shapes suffice).
        leaves, treedef = jax.tree.flatten(task.abstract_state)
        leaves = [
            (jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * 1e-3 + i).astype(x.dtype)
            for i, x in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, leaves)

    state = jax.jit(distinct, out_shardings=shardings)()
    workdir = tmp_path_factory.mktemp("sft_fsdp8")
    with Checkpointer(workdir) as ckpt:
        ckpt.save(5, state)
    return str(workdir), config, jax.device_get(state)


@pytest.mark.parametrize(
    "mesh_sizes, num_devices",
    [({"data": 2, "fsdp": 4, "tensor": 1}, 8), ({"data": 1, "fsdp": 4, "tensor": 1}, 4)],
    ids=["data2xfsdp4", "4-devices"],
)
def test_train_state_restores_onto_another_mesh(sft_checkpoint, mesh_sizes, num_devices):
    from apt_jax.tasks import build_task
    from apt_jax.train import sharding

    workdir, config, saved = sft_checkpoint
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:num_devices])
    task = build_task(config, mesh)
    with Checkpointer(workdir) as ckpt:
        restored, step = ckpt.restore(abstract_state=task.abstract_state)
    assert step == 5
    _assert_same_values(restored, saved)  # bitwise
    wanted = jax.tree.map(lambda s: s.sharding, task.abstract_state)
    _assert_shardings(restored, wanted)
    leaves = jax.tree.leaves(restored)
    assert all(set(x.sharding.device_set) == set(mesh.devices.flat) for x in leaves)
    # The new mesh really splits the state: fsdp=4 shards of the big matrices.
    split = [x for x in leaves if x.sharding.shard_shape(x.shape) != x.shape]
    assert split and all(
        int(np.prod(x.shape)) == 4 * int(np.prod(x.sharding.shard_shape(x.shape))) for x in split
    )


def test_data_process_count(tmp_path):
    state = {"x": jnp.zeros(3)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_iterator=_make_iterator())
        ckpt.save(2, state)
        ckpt.wait_until_finished()
        assert ckpt.data_process_count(1) == 1
        assert ckpt.data_process_count(2) is None
        assert ckpt.data_process_count() is None  # newest step
    # As a 2-process job leaves it (grain's file names), read by 1 process.
    data = tmp_path / "checkpoints" / "1" / "data"
    os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.data_process_count(1) == 2
        with pytest.raises(ValueError, match="restores only with the process count"):
            ckpt.restore(1, abstract_state=abstract_like(state), data_iterator=_make_iterator())
