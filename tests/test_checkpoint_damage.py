"""Nothing lost when the newest checkpoint is damaged (apt_jax.train.checkpoint).

What orbax 0.12.8 writes for one step (``<workdir>/checkpoints/<step>/``), and
what damage to each file does to a restore (probed file by file, truncated,
overwritten with random bytes and deleted):

``state/ocdbt.process_0/d/<hash>``
    the arrays' bytes (zstd-compressed chunks; the largest file) and process
    0's own b-tree nodes, which the merged database below supersedes: damage to
    the chunks fails the read (OUT_OF_RANGE, FAILED_PRECONDITION "Truncated
    Zstd-compressed stream"), damage to the superseded nodes is harmless.
``state/d/<hash>``
    the merged OCDBT b-tree (array metadata ``.zarray`` and small values
    inline): OUT_OF_RANGE, DATA_LOSS, NOT_FOUND.
``state/manifest.ocdbt``
    the merged database's manifest: DATA_LOSS, NOT_FOUND.
``state/_METADATA``, ``state/array_metadatas/process_0``
    JSON tree and array metadata: a JSONDecodeError or UnicodeDecodeError when
    broken; orbax does without either when deleted.
``state/_sharding``, ``state/ocdbt.process_0/manifest.ocdbt``, ``commit_success.txt``
(every folder), ``_CHECKPOINT_METADATA``
    not needed to restore onto a given target: the step still reads.
``data/process_0-of-1.json``
    grain's iterator state: JSONDecodeError / UnicodeDecodeError; deleted, a
    step saved with an iterator but without this process's file.
``config/metadata``
    the run's config as JSON: only :meth:`Checkpointer.restore_config` reads it.

The quick tests below damage each of these in a small state checkpoint; the
slow ones train the tiny SFT recipe, damage its newest checkpoint, resume it
with the training loop, and check the run ends where an undamaged one does. A
two-process test damages a file only process 1 reads.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apt_jax.train.checkpoint import Checkpointer, DamagedCheckpointError, abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGER = "apt_jax.train.checkpoint"


# ------------------------------------------------------------------ damage
def _damage(path, how):
    """Truncates (to 500 bytes, or half a smaller file), overwrites with random
    bytes of the same length, or deletes ``path`` (a file or a folder)."""
    if how == "delete":
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        return
    size = os.path.getsize(path)
    if how == "truncate":
        os.truncate(path, 500 if size > 1000 else size // 2)
    elif how == "garbage":
        with open(path, "r+b") as f:
            f.write(np.random.default_rng(0).bytes(size))
    else:
        raise ValueError(how)


def _largest_file(folder):
    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    return max(files, key=os.path.getsize)


# The files whose damage makes a step unreadable, as paths inside the step.
KINDS = {
    "array data": lambda step: _largest_file(os.path.join(step, "state/ocdbt.process_0/d")),
    "b-tree": lambda step: _largest_file(os.path.join(step, "state/d")),
    "state manifest": lambda step: os.path.join(step, "state/manifest.ocdbt"),
    "state metadata": lambda step: os.path.join(step, "state/_METADATA"),
    "array metadata": lambda step: os.path.join(step, "state/array_metadatas/process_0"),
    "iterator json": lambda step: os.path.join(step, "data/process_0-of-1.json"),
}
# Deleting these orbax does without (see the module docstring).
NOT_NEEDED_WHEN_DELETED = {"state metadata", "array metadata"}
CASES = [
    (kind, how)
    for kind in KINDS
    for how in ("truncate", "garbage", "delete")
    if not (how == "delete" and kind in NOT_NEEDED_WHEN_DELETED)
] + [("state folder", "delete"), ("iterator folder", "delete")]
FOLDERS = {"state folder": "state", "iterator folder": "data"}


def _target(step_dir, kind):
    if kind in FOLDERS:
        return os.path.join(step_dir, FOLDERS[kind])
    return KINDS[kind](step_dir)


# ------------------------------------------------------- a small checkpoint
def _iterator():
    return iter(grain.MapDataset.range(100).seed(0).shuffle().repeat().batch(4).to_iter_dataset())


def _state(i):
    """Step ``i``'s state: a sharded matrix (its chunk is the largest array file)."""
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    w = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) + 1000 * i
    return {
        "w": jax.device_put(w, NamedSharding(mesh, P("fsdp"))),
        "b": jnp.full(3, float(i)),
        "step": jnp.array(i, jnp.int32),
    }


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Steps 1 and 2 of a state, iterator and config; ``batches[i]``: the batch
    that follows step ``i``."""
    workdir = tmp_path_factory.mktemp("small_run")
    it = _iterator()
    batches = {}
    with Checkpointer(workdir) as ckpt:
        for i in (1, 2):
            next(it)
            ckpt.save(i, _state(i), data_iterator=it, config={"step": i})
            batches[i] = np.asarray(next(_copy_iterator(it)))
    return str(workdir), batches


def _copy_iterator(it):
    fresh = _iterator()
    fresh.set_state(it.get_state())
    return fresh


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return str(dst)


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind, how", CASES, ids=[f"{k}-{h}" for k, h in CASES])
def test_damaged_newest_step_falls_back(small_run, tmp_path, caplog, kind, how):
    run, batches = small_run
    work = _copy(run, tmp_path)
    damaged = _target(os.path.join(work, "checkpoints", "2"), kind)
    _damage(damaged, how)
    size = os.path.getsize(damaged) if os.path.exists(damaged) else None
    it = _iterator()
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpointer(work) as ckpt:
        state, step = ckpt.restore(abstract_state=abstract_like(_state(0)), data_iterator=it)
        # The manager forgot step 2: the same step number saves afresh.
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, _state(2))
    assert step == 1
    _assert_trees_equal(state, _state(1))
    np.testing.assert_array_equal(np.asarray(next(it)), batches[1])
    assert f"Checkpoint step 2 in {work}/checkpoints is damaged" in caplog.text
    assert "Moved the damaged checkpoint step 2" in caplog.text
    # Kept aside as it was, damage included; nothing else moved.
    kept = os.path.join(work, "checkpoints.damaged", "2")
    assert os.path.isfile(os.path.join(kept, "_CHECKPOINT_METADATA"))
    inside = os.path.join(kept, os.path.relpath(damaged, os.path.join(work, "checkpoints", "2")))
    assert (os.path.getsize(inside) if os.path.exists(inside) else None) == size
    assert os.listdir(os.path.join(work, "checkpoints.damaged")) == ["2"]
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1", "2"]


@pytest.mark.parametrize(
    "relative",
    [
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "state/commit_success.txt",
        "state/_sharding",
        "state/ocdbt.process_0/manifest.ocdbt",
    ],
)
def test_files_a_restore_does_not_read_are_not_damage(small_run, tmp_path, relative):
    run, _ = small_run
    work = _copy(run, tmp_path)
    _damage(os.path.join(work, "checkpoints", "2", relative), "garbage")
    with Checkpointer(work) as ckpt:
        state, step = ckpt.restore(abstract_state=abstract_like(_state(0)))
    assert step == 2
    _assert_trees_equal(state, _state(2))
    assert not os.path.exists(os.path.join(work, "checkpoints.damaged"))


def test_a_step_damaged_twice_is_kept_twice(small_run, tmp_path):
    run, _ = small_run
    work = _copy(run, tmp_path)
    for _ in range(2):
        _damage(KINDS["array data"](os.path.join(work, "checkpoints", "2")), "truncate")
        with Checkpointer(work) as ckpt:
            assert ckpt.restore(abstract_state=abstract_like(_state(0)))[1] == 1
            ckpt.save(2, _state(2))
    assert sorted(os.listdir(os.path.join(work, "checkpoints.damaged"))) == ["2", "2-1"]


def test_wrong_target_is_not_damage(small_run, tmp_path):
    # A sharding that does not divide the array: the user's error, raised as it
    # is; no step is skipped or moved.
    run, _ = small_run
    work = _copy(run, tmp_path)
    target = abstract_like(_state(0))
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    target["b"] = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    with Checkpointer(work) as ckpt:
        with pytest.raises(ValueError, match="the dimension size is 3"):
            ckpt.restore(abstract_state=target)
        # A shape that differs from the saved one: the readable mismatch error.
        target = abstract_like(_state(0))
        target["w"] = jax.ShapeDtypeStruct((64, 32), jnp.float32)
        with pytest.raises(ValueError, match=r"\['w'\]: saved \(64, 64\) vs expected \(64, 32\)"):
            ckpt.restore(abstract_state=target)
        assert ckpt.all_steps() == [1, 2]
    assert not os.path.exists(os.path.join(work, "checkpoints.damaged"))


def test_explicit_damaged_step_raises(small_run, tmp_path):
    run, _ = small_run
    work = _copy(run, tmp_path)
    _damage(KINDS["array data"](os.path.join(work, "checkpoints", "2")), "truncate")
    with Checkpointer(work) as ckpt:
        with pytest.raises(
            DamagedCheckpointError,
            match=r"Checkpoint step 2 in .* is damaged and cannot be restored: OUT_OF_RANGE.*"
            r"Restore with step=None",
        ):
            ckpt.restore(2, abstract_state=abstract_like(_state(0)))
        assert ckpt.all_steps() == [1, 2]  # nothing moved
        assert ckpt.restore(1, abstract_state=abstract_like(_state(0)))[1] == 1


def test_every_step_damaged_raises_and_moves_nothing(small_run, tmp_path):
    run, _ = small_run
    work = _copy(run, tmp_path)
    for step in ("1", "2"):
        _damage(os.path.join(work, "checkpoints", step, "state", "manifest.ocdbt"), "garbage")
    with Checkpointer(work) as ckpt:
        with pytest.raises(
            DamagedCheckpointError,
            match=r"every step is damaged: step 2 \(.*checkpoints/2\): DATA_LOSS.*; "
            r"step 1 \(.*checkpoints/1\): DATA_LOSS.*Nothing was moved or deleted\. "
            r"To start the run over from step 0, move these step folders out of",
        ):
            ckpt.restore(abstract_state=abstract_like(_state(0)))
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1", "2"]
    assert not os.path.exists(os.path.join(work, "checkpoints.damaged"))


def test_read_only_falls_back_and_moves_nothing(small_run, tmp_path, caplog):
    run, _ = small_run
    work = _copy(run, tmp_path)
    _damage(KINDS["array data"](os.path.join(work, "checkpoints", "2")), "garbage")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with Checkpointer(work, read_only=True) as ckpt:
            state, step = ckpt.restore(abstract_state=abstract_like(_state(0)))
    assert step == 1
    _assert_trees_equal(state, _state(1))
    assert "damaged newer step(s) [2] stay in" in caplog.text
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1", "2"]
    assert not os.path.exists(os.path.join(work, "checkpoints.damaged"))


def test_iterator_of_another_process_count_is_repositioned(small_run, tmp_path):
    # Grain's files as a 2-process job leaves them: not damage, the caller's
    # `reposition` places the iterator (what the loop does with seek_to_step).
    run, _ = small_run
    work = _copy(run, tmp_path)
    data = os.path.join(work, "checkpoints", "2", "data")
    os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
    shutil.copy(
        os.path.join(data, "process_0-of-2.json"), os.path.join(data, "process_1-of-2.json")
    )
    calls = []
    with Checkpointer(work) as ckpt:
        _, step = ckpt.restore(
            abstract_state=abstract_like(_state(0)),
            data_iterator=_iterator(),
            reposition=lambda it, s: calls.append(s),
        )
        assert step == 2 and calls == [2]
        with pytest.raises(ValueError, match="restores only with the process count"):
            ckpt.restore(abstract_state=abstract_like(_state(0)), data_iterator=_iterator())


@pytest.mark.parametrize("how", ["truncate", "garbage", "delete"])
def test_damaged_config_falls_back(small_run, tmp_path, caplog, how):
    run, _ = small_run
    work = _copy(run, tmp_path)
    _damage(os.path.join(work, "checkpoints", "2", "config", "metadata"), how)
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpointer(work) as ckpt:
        assert ckpt.restore_config() == {"step": 1}
        with pytest.raises(
            DamagedCheckpointError, match="Checkpoint step 2 in .* is damaged and cannot be"
        ):
            ckpt.restore_config(2)
        # The state is intact: it restores from step 2, and nothing is moved.
        assert ckpt.restore(abstract_state=abstract_like(_state(0)))[1] == 2
    assert "The config of checkpoint step 2 in" in caplog.text
    assert not os.path.exists(os.path.join(work, "checkpoints.damaged"))


# ------------------------------------------ the training loop resumes (slow)
def _config():
    from configs import digits_sft

    config = digits_sft.get_config("tiny")  # as conftest.teacher_dir trains it
    config.eval.num_samples = 20
    config.eval.grid_rows = 2
    return config


@pytest.fixture(scope="module")
def trained(teacher_dir):
    """The finished tiny SFT run (checkpoints 3 and 6) and its two saved states."""
    from apt_jax.tasks import build_task

    config = _config()
    assert (config.checkpoint_every, config.total_steps) == (3, 6)
    task = build_task(config)
    with Checkpointer(teacher_dir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        states = {
            s: jax.device_get(ckpt.restore(s, abstract_state=task.abstract_state)[0])
            for s in (3, 6)
        }
    return teacher_dir, states


# Each kind of file once (the quick tests above take every kind and damage);
# first the case: `truncate -s 500` on an array file of the newest step.
LOOP_CASES = [
    ("array data", "truncate"),
    ("b-tree", "garbage"),
    ("state manifest", "delete"),
    ("state metadata", "garbage"),
    ("array metadata", "truncate"),
    ("iterator json", "delete"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind, how", LOOP_CASES, ids=[f"{k}-{h}" for k, h in LOOP_CASES])
def test_training_resumes_from_the_previous_step(trained, tmp_path, caplog, kind, how):
    from apt_jax.tasks import build_task
    from apt_jax.train.loop import train

    run, states = trained
    work = _copy(run, tmp_path)
    _damage(_target(os.path.join(work, "checkpoints", "6"), kind), how)
    task = build_task(_config())
    real_step, resumed_from = task.train_step, []

    def recording_step(state, batch, rng):
        if not resumed_from:
            resumed_from.append(jax.device_get(state))
        return real_step(state, batch, rng)

    task.train_step = recording_step
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = train(task, work)
    assert "Checkpoint step 6 in" in caplog.text and "is damaged" in caplog.text
    assert os.path.isdir(os.path.join(work, "checkpoints.damaged", "6", "state"))
    # It resumed from step 3, with the state a clean restore of step 3 gives...
    first = resumed_from[0]
    assert int(first.step) == 3
    _assert_trees_equal(first, states[3])
    # ...and trained on to a new step 6, the same as the undamaged run's.
    assert result["step"] == 6
    with Checkpointer(work, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        again, _ = ckpt.restore(abstract_state=task.abstract_state)
    _assert_trees_equal(jax.device_get(again), states[6])


@pytest.mark.slow
def test_damaged_config_keeps_the_state_and_load_run_falls_back(trained, tmp_path, caplog):
    # The loop does not read the config back: a damaged one loses nothing. A
    # reader of the run (load_run) takes the previous step's config.
    from apt_jax.tasks.runs import load_run

    run, states = trained
    work = _copy(run, tmp_path)
    _damage(os.path.join(work, "checkpoints", "6", "config", "metadata"), "garbage")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        task, state, step = load_run(work)
    assert step == 6
    _assert_trees_equal(jax.device_get(state), states[6])
    assert task.config.total_steps == 6
    assert "The config of checkpoint step 6 in" in caplog.text


@pytest.mark.slow
def test_load_run_falls_back_without_moving(trained, tmp_path, caplog):
    from apt_jax.tasks.runs import load_run

    run, states = trained
    work = _copy(run, tmp_path)
    _damage(KINDS["array data"](os.path.join(work, "checkpoints", "6")), "truncate")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, state, step = load_run(work)
    assert step == 3
    _assert_trees_equal(jax.device_get(state), states[3])
    assert "Checkpoint step 6 in" in caplog.text
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3", "6"]


# --------------------------------------------- two processes agree (slow)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(phase, workdir, tmp_path):
    """Runs `_worker` as processes 0 and 1; returns their logs and results."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    procs = []
    for i in range(2):
        out = open(tmp_path / f"{phase}{i}.log", "w")  # noqa: SIM115
        result = tmp_path / f"{phase}{i}.json"
        cmd = [sys.executable, __file__, phase, str(workdir), str(port), str(i), str(result)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=REPO), out))
    deadline = time.monotonic() + 300
    results = []
    for i, (p, out) in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            pytest.fail(f"{phase}: process {i} did not finish; see {tmp_path}")
        out.close()
        log = (tmp_path / f"{phase}{i}.log").read_text()
        assert p.returncode == 0, log[-3000:]
        result = tmp_path / f"{phase}{i}.json"
        results.append((log, json.loads(result.read_text()) if result.exists() else None))
    return results


@pytest.mark.slow
def test_two_processes_restore_the_same_step(tmp_path):
    # Only process 1 reads its iterator file: with it damaged, process 0's own
    # try succeeds, and still both must restore step 1.
    work = tmp_path / "run"
    _two_processes("save", work, tmp_path)
    _damage(work / "checkpoints" / "2" / "data" / "process_1-of-2.json", "truncate")
    logs, results = zip(*_two_processes("restore", work, tmp_path), strict=True)
    for i, r in enumerate(results):
        assert r == {"step": 1, "steps": [1], "values": [1], "positions": [1]}, logs[i][-3000:]
    assert "Checkpoint step 2 in" in logs[1] and "is damaged" in logs[1]
    assert "unreadable on process(es) [1]" in logs[0]
    assert "Moved the damaged checkpoint step 2" in logs[0]
    assert os.listdir(work / "checkpoints.damaged") == ["2"]


def _worker(phase, workdir, port, index, result):
    """One process of `test_two_processes_restore_the_same_step`: saves steps 1
    and 2 of a state sharded over both processes, or restores the newest one."""
    logging.basicConfig(level=logging.WARNING)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("fsdp",)), P("fsdp"))

    def weights(i):
        return np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + 1000 * i

    def state(i):
        return {"w": jax.make_array_from_callback((64, 64), sharding, lambda x: weights(i)[x])}

    def iterator():
        ds = grain.MapDataset.range(100).seed(0).shuffle().repeat()[index::2].batch(2)
        return iter(ds.to_iter_dataset())

    it = iterator()
    with Checkpointer(workdir) as ckpt:
        if phase == "save":
            for i in (1, 2):
                next(it)
                ckpt.save(i, state(i), data_iterator=it)
            return
        restored, step = ckpt.restore(abstract_state=abstract_like(state(0)), data_iterator=it)
        steps = ckpt.all_steps()
    # Which saved step this process's shards and iterator position are.
    shards = restored["w"].addressable_shards
    values = [
        i
        for i in (1, 2)
        if all(np.array_equal(np.asarray(s.data), weights(i)[s.index]) for s in shards)
    ]
    after = {}
    for i in (1, 2):
        fresh = iterator()
        for _ in range(i + 1):
            after[i] = next(fresh).tolist()
    batch = next(it).tolist()
    positions = [i for i in (1, 2) if after[i] == batch]
    with open(result, "w") as f:
        json.dump({"step": step, "steps": steps, "values": values, "positions": positions}, f)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
