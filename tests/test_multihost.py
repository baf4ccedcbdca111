"""Multi-host training: two local processes of 4 CPU devices each against one of 8.

One 2-process run (the real `launch/train.py`, `jax.distributed` over
127.0.0.1, gloo collectives) is preempted with SIGTERM to one process, and a
second 2-process launch resumes it on another (hybrid) mesh and finishes. A
1-process, 8-device run of the same steps is the reference; a 1-process run
continuing from the 2-process checkpoint checks the data-iterator rule for a
changed process count. The runs are shared by the assertions (module fixture).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from apt_jax.data.pipeline import make_train_iterator, seek_to_step
from apt_jax.tasks import build_task
from apt_jax.train import distributed, sharding
from apt_jax.train.checkpoint import Checkpointer
from apt_jax.train.loop import train
from configs import digits_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420  # seconds for one 2-process launch on a busy 2-core machine
EXTRA_STEPS = 2  # steps the resumed run trains after the preemption step

# Constant schedule: total_steps does not change the learning rates, so a run
# preempted anywhere and resumed with a smaller total_steps trains like one run.
COMMON = {
    "optimizer.schedule": "constant",
    "checkpoint_every": 1000,
    "log_every": 1,
    "eval.num_samples": 20,
    "eval.grid_rows": 2,
}
FSDP8 = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
# Per process fsdp=4 (ICI), the two processes along data (DCN): data=2 x fsdp=4.
HYBRID = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "mesh.dcn.data": 2}


def tiny_config(**overrides):
    c = digits_sft.get_config("tiny")
    c.update_from_flattened_dict({**COMMON, **overrides})
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, overrides, logdir, tag):
    """Starts `launch/train.py` as processes 0 and 1 of a 2-process job."""
    port = free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    flags = [f"--config.{k}={v}" for k, v in {**COMMON, **overrides}.items()]
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            os.path.join(REPO, "launch", "train.py"),
            "--config",
            os.path.join(REPO, "configs", "digits_sft.py:tiny"),
            "--workdir",
            str(workdir),
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            *flags,
        ]
        # Files, not pipes: orbax logs a lot and a full pipe would block the child.
        out = open(os.path.join(logdir, f"{tag}{i}.out"), "w")  # noqa: SIM115
        err = open(os.path.join(logdir, f"{tag}{i}.err"), "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err), out, err))
    return procs


def finish(procs, logdir, tag, deadline):
    """Waits for both processes; returns `[(returncode, stdout, stderr)]`."""
    results = []
    for i, (p, out, err) in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            pytest.fail(f"{tag}: process {i} did not finish in time; logs in {logdir}")
        out.close()
        err.close()
        with open(out.name) as f1, open(err.name) as f2:
            results.append((p.returncode, f1.read(), f2.read()))
    return results


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def read_state(workdir, task, step):
    with Checkpointer(workdir, read_only=True) as ckpt:
        state, _ = ckpt.restore(step, abstract_state=task.abstract_state)
    return state


def assert_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    logdir = str(root)
    work = root / "two_process"

    # 1. Two processes, fsdp=8 across both; SIGTERM to process 1 after step 3.
    deadline = time.monotonic() + TIMEOUT
    procs = launch(work, {**FSDP8, "total_steps": 1000}, logdir, "preempted")
    while max(logged_steps(work), default=0) < 3:
        if any(p.poll() is not None for p, _, _ in procs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    procs[1][0].send_signal(signal.SIGTERM)
    preempted = finish(procs, logdir, "preempted", deadline)
    with Checkpointer(work, read_only=True) as ckpt:
        saved = ckpt.all_steps()
    assert len(saved) == 1, (saved, [r[2][-3000:] for r in preempted])
    k = saved[0]
    data_files = sorted(
        f for f in os.listdir(work / "checkpoints" / str(k) / "data") if f.endswith(".json")
    )
    metrics_after_preemption = logged_steps(work)

    # A copy of the 2-process checkpoint for the 1-process continuation.
    shutil.copytree(work / "checkpoints" / str(k), root / "one_process" / "checkpoints" / str(k))

    # 2. Two processes resume on a hybrid mesh (dcn data=2 x ici fsdp=4) and finish.
    total = k + EXTRA_STEPS
    deadline = time.monotonic() + TIMEOUT
    resumed = finish(
        launch(work, {**HYBRID, "total_steps": total}, logdir, "resumed"),
        logdir,
        "resumed",
        deadline,
    )

    # 3. The reference: one process, 8 devices, fsdp=8, straight to `total`.
    train(build_task(tiny_config(**FSDP8, total_steps=total)), str(root / "reference"))
    # 4. One process (data=2 x fsdp=4) continues from the 2-process checkpoint.
    mesh_2x4 = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}
    train(build_task(tiny_config(**mesh_2x4, total_steps=total)), str(root / "one_process"))

    return dict(
        root=root,
        k=k,
        total=total,
        preempted=preempted,
        resumed=resumed,
        data_files=data_files,
        metrics_after_preemption=metrics_after_preemption,
    )


@pytest.fixture(scope="module")
def reference_task(runs):
    return build_task(tiny_config(**FSDP8, total_steps=runs["total"]))


@pytest.mark.slow
def test_sigterm_to_one_process_saves_both_at_the_same_step(runs):
    k = runs["k"]
    for i, (rc, _, err) in enumerate(runs["preempted"]):
        assert rc == 0, f"process {i}:\n{err[-3000:]}"
        assert f"Preemption requested: saved step {k}, exiting." in err, f"process {i}"
    assert k >= 3
    # Both processes' iterator states are in the one checkpoint.
    assert runs["data_files"] == ["process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 logs and prints; the preempted run does not evaluate.
    steps = runs["metrics_after_preemption"]
    assert steps == list(range(1, k + 1))
    assert "'preempted': 1.0" in runs["preempted"][0][1]
    assert "'step'" not in runs["preempted"][1][1]  # (gloo prints its own lines)


@pytest.mark.slow
def test_resumed_two_process_run_finishes_with_one_log(runs):
    k, total, root = runs["k"], runs["total"], runs["root"]
    for i, (rc, _, err) in enumerate(runs["resumed"]):
        assert rc == 0, f"process {i}:\n{err[-3000:]}"
        assert f"Resumed from step {k}" in err
    assert f"'step': {total}" in runs["resumed"][0][1]
    assert "'step'" not in runs["resumed"][1][1]  # process 1 prints no results
    work = root / "two_process"
    # Scalars once per step (process 0 only), then the final evaluation.
    with open(work / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, total + 1))
    assert [r["step"] for r in records if "eval/accuracy" in r] == [total]
    assert os.path.exists(work / "eval" / f"samples_step{total}.png")
    assert sorted(os.listdir(work / "checkpoints")) == sorted([str(k), str(total)])


@pytest.mark.slow
def test_two_processes_reach_the_one_process_params(runs, reference_task):
    total, root = runs["total"], runs["root"]
    reference = read_state(str(root / "reference"), reference_task, total)
    two = read_state(str(root / "two_process"), reference_task, total)
    assert int(two.step) == total
    assert_close(two, reference)
    # Not vacuous: training moved the parameters by far more than the tolerance.
    initial = reference_task.init_state(jax.random.split(jax.random.key(0))[0])
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(initial.params), jax.tree.leaves(reference.params), strict=True
        )
    )
    assert moved > 1e-3


@pytest.mark.slow
def test_one_process_continues_a_two_process_checkpoint(runs, reference_task):
    # The iterator state was written by 2 processes: the 1-process run restarts
    # the stream at the step, so it reads the reference's batches and ends equal.
    total, root = runs["total"], runs["root"]
    reference = read_state(str(root / "reference"), reference_task, total)
    continued = read_state(str(root / "one_process"), reference_task, total)
    assert_close(continued, reference)


# ---------------------------------------------------------------- in-process
# A plain list: grain's worker processes unpickle it without importing this module.
INDEX_SOURCE = [{"index": np.int32(i)} for i in range(29)]


def _iterator(process_index=0, process_count=1, worker_count=0):
    return make_train_iterator(
        INDEX_SOURCE,
        global_batch_size=8,
        seed=3,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
    )


def test_process_blocks_concatenate_to_the_global_batch_in_order():
    # Process p holds rows [p * B / P, (p + 1) * B / P) of the global batch: the
    # row order make_global_batch builds, so 1 and P processes see one batch.
    single = _iterator()
    shards = [_iterator(p, 4) for p in range(4)]
    for _ in range(6):
        want = next(single)["index"]
        got = np.concatenate([next(it)["index"] for it in shards])
        np.testing.assert_array_equal(got, want)


# Workers are slow to spawn (they import the test module): one case with them, in the
# slow tier since it starts processes.
@pytest.mark.parametrize(
    "worker_count, step",
    [(0, 0), (0, 1), (0, 5), (0, 8), pytest.param(2, 5, marks=pytest.mark.slow)],
)
def test_seek_to_step_equals_advancing(worker_count, step):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags
    advanced = _iterator(worker_count=worker_count)
    for _ in range(step):
        next(advanced)
    seeked = _iterator(worker_count=worker_count)
    seek_to_step(seeked, step)
    try:
        for _ in range(3):
            np.testing.assert_array_equal(next(seeked)["index"], next(advanced)["index"])
    finally:
        for it in (advanced, seeked):
            if hasattr(it, "close"):
                it.close()


def test_seek_after_process_count_change_continues_the_global_stream():
    single = _iterator()
    batches = [next(single)["index"] for _ in range(5)]
    # A 2-process stream stopped after 3 steps, resumed on 1 process.
    resumed = _iterator()
    seek_to_step(resumed, 3)
    np.testing.assert_array_equal(next(resumed)["index"], batches[3])
    # ... and the other way round: 1 process -> 2 processes.
    halves = [_iterator(p, 2) for p in range(2)]
    for it in halves:
        seek_to_step(it, 4)
    np.testing.assert_array_equal(np.concatenate([next(it)["index"] for it in halves]), batches[4])


def test_seek_to_step_rejects_bad_input():
    with pytest.raises(ValueError, match="step must be >= 0"):
        seek_to_step(_iterator(), -1)

    class Other:
        def get_state(self):
            return {"position": 3}

    with pytest.raises(ValueError, match="knows the iterators of make_train_iterator only"):
        seek_to_step(Other(), 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"multihost": "slurm"}, "--multihost='slurm' is unknown"),
        ({"coordinator_address": "127.0.0.1:1234"}, "without --num_processes, --process_id"),
        (
            {"coordinator_address": "localhost", "num_processes": 2, "process_id": 0},
            "must be HOST:PORT",
        ),
        (
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
            r"--process_id=2 must lie in \[0, --num_processes=2\)",
        ),
        (
            {"coordinator_address": "h:1", "num_processes": 0, "process_id": 0},
            "--num_processes=0 must be >= 1",
        ),
    ],
)
def test_distributed_flags_are_validated(kwargs, match, monkeypatch):
    def no_init(**kw):
        raise AssertionError("initialised before validating")

    monkeypatch.setattr(jax.distributed, "initialize", no_init)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_distributed_off_initialises_nothing(monkeypatch):
    def no_init(**kw):
        raise AssertionError("must not initialise")

    monkeypatch.setattr(jax.distributed, "initialize", no_init)
    assert distributed.initialize() is False
    assert not distributed.is_initialized()


def test_make_global_batch_rows_of_one_process():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert sharding.process_batch_rows(mesh, 16) == ((0, 16),)


# ------------------------------------------------------------- hybrid mesh
class FakeDevice:
    """Just what mesh_utils reads of a device: 2 slices of 8 CPU-like devices."""

    platform = device_kind = "cpu"

    def __init__(self, i, per_slice=8):
        self.id = i
        self.slice_index = i // per_slice
        self.process_index = i // 4

    def __repr__(self):
        return f"D{self.id}"


@pytest.mark.parametrize(
    "sizes",
    [{"data": -1}, {"data": 2, "fsdp": 4}, {"fsdp": -1}, {"data": 2, "fsdp": 2, "tensor": 2}],
)
def test_all_ones_dcn_is_the_plain_mesh(sizes):
    plain = sharding.make_mesh(sizes)
    hybrid = sharding.make_mesh({**sizes, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}})
    assert hybrid == plain
    assert hybrid.devices.tolist() == plain.devices.tolist()


def test_hybrid_grid_puts_slices_along_the_dcn_axis():
    devices = [FakeDevice(i) for i in range(16)]
    sizes = {"data": 1, "fsdp": -1, "tensor": 2, "dcn": {"data": 2}}
    assert sharding.resolve_hybrid_shape(sizes, devices) == ((1, 4, 2), (2, 1, 1))
    grid = sharding.device_grid(sizes, devices)
    assert grid.shape == (2, 4, 2)
    # Each data index is one whole slice; inside it the ICI layout.
    for d in range(2):
        assert {dev.slice_index for dev in grid[d].ravel()} == {d}
        assert sorted(dev.id for dev in grid[d].ravel()) == list(range(8 * d, 8 * d + 8))
    # fsdp across slices instead: slices side by side along fsdp.
    grid = sharding.device_grid({"fsdp": 2, "tensor": 4, "dcn": {"fsdp": 2}}, devices)
    assert grid.shape == (1, 4, 4)
    assert [dev.slice_index for dev in grid[0, :, 0]] == [0, 0, 1, 1]


@pytest.mark.parametrize("with_slice_index", [True, False])
def test_hybrid_mesh_uses_processes_within_one_slice(with_slice_index):
    class NoSlice(FakeDevice):
        def __getattribute__(self, name):
            if name == "slice_index":
                raise AttributeError(name)
            return super().__getattribute__(name)

    # 2 processes of 4 devices, one slice (CPU devices say slice_index=0).
    devices = [(FakeDevice if with_slice_index else NoSlice)(i) for i in range(8)]
    sizes = {"fsdp": -1, "dcn": {"data": 2}}
    assert sharding.resolve_hybrid_shape(sizes, devices) == ((1, 4, 1), (2, 1, 1))
    grid = sharding.device_grid(sizes, devices)
    assert [[dev.process_index for dev in row] for row in grid[:, :, 0]] == [[0] * 4, [1] * 4]


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"fsdp": -1, "dcn": {"data": 3}}, r"spans 3 granules but the job has 2 slices"),
        ({"fsdp": -1, "dcn": {"pipeline": 2}}, r"config.mesh.dcn has unknown axes \['pipeline'\]"),
        ({"fsdp": -1, "dcn": {"data": 0}}, "config.mesh.dcn sizes must be positive ints"),
        ({"fsdp": -1, "dcn": {"data": -1}}, "config.mesh.dcn sizes must be positive ints"),
        ({"fsdp": 2, "dcn": {"data": 2}}, "uses 2 of each granule's 8 devices"),
        ({"fsdp": 16, "dcn": {"data": 2}}, "needs 16 devices but only 8"),
    ],
)
def test_hybrid_mesh_validation(sizes, match):
    devices = [FakeDevice(i) for i in range(16)]
    with pytest.raises(ValueError, match=match):
        sharding.device_grid(sizes, devices)


def test_hybrid_mesh_on_one_process_names_the_fix():
    with pytest.raises(ValueError, match="spans 2 granules but the job has 1 processes"):
        sharding.make_mesh({"fsdp": -1, "dcn": {"data": 2}})


def test_unequal_slices_are_rejected():
    devices = [FakeDevice(i) for i in range(16)][:12]  # slice 1 has 4 devices
    with pytest.raises(ValueError, match="unequal device counts"):
        sharding.resolve_hybrid_shape({"fsdp": -1, "dcn": {"data": 2}}, devices)


def test_multi_process_mesh_must_use_every_device():
    devices = [FakeDevice(i) for i in range(8)]  # processes 0 and 1
    with pytest.raises(ValueError, match="every process needs devices in the mesh"):
        sharding.make_mesh({"data": 2}, devices)
