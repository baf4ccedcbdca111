"""The training system: sharded steps, resume, safety rails, the SFT recipe."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.tasks import build_task
from apt_jax.train import sharding
from apt_jax.train.loop import train
from apt_jax.train.metrics_writer import NonFiniteMetricError
from apt_jax.train.state import compute_grads
from configs import digits_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = digits_sft.get_config("tiny")
    c.eval.num_samples = 20
    c.eval.grid_rows = 2
    for k, v in overrides.items():
        node, *path = k.split(".")
        target = c
        for p in [node, *path][:-1]:
            target = target[p]
        target[[node, *path][-1]] = v
    return c


def run_steps(task, n, batches=None):
    it = task.make_iterator()
    state = task.init_state(jax.random.key(task.config.seed))
    rng = jax.random.split(jax.random.key(task.config.seed))[1]
    for i in range(n):
        local = batches[i] if batches is not None else next(it)
        state, _ = task.train_step(state, sharding.make_global_batch(local, task.mesh), rng)
    return state


def tree_max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def batches():
    task = build_task(tiny_config(), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    it = task.make_iterator()
    return [next(it) for _ in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_sizes", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]
)
def test_sharded_step_equals_single_device(batches, mesh_sizes):
    one = build_task(tiny_config(), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    many = build_task(tiny_config(), sharding.make_mesh(mesh_sizes))
    s1 = run_steps(one, 3, batches)
    s8 = run_steps(many, 3, batches)
    assert int(s8.step) == 3
    assert tree_max_diff(s1.params, s8.params) < 1e-5
    assert tree_max_diff(s1.ema_params, s8.ema_params) < 1e-5
    # The update moved the parameters (the comparison is not vacuous).
    s0 = one.init_state(jax.random.key(0))
    assert tree_max_diff(s0.params, s1.params) > 1e-4


def test_fsdp_splits_the_state():
    # Width 128 so that the blocks dominate the parameter count, as in real models.
    config = tiny_config(**{"model.attention_head_dim": 64, "model.caption_projection_dim": 128})
    task = build_task(config, sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    state = task.init_state(jax.random.key(0))
    leaves = jax.tree.leaves(state)
    total = sum(x.nbytes for x in leaves)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    # Everything with an `embed` axis is split 8 ways; the few leaves without
    # one (embedder inputs, non-embed biases, label tables, scalars) replicate.
    assert total / 8 <= per_device < 1.3 * total / 8, (per_device, total)
    kernel = state.params["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 8


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    # A constant schedule, so that the first run's total_steps=4 does not change
    # the learning rates of its first 4 steps.
    def config(total):
        return tiny_config(**{"total_steps": total, "optimizer.schedule": "constant"})

    straight = train(build_task(config(8)), str(tmp_path / "a"))
    train(build_task(config(4)), str(tmp_path / "b"))
    resumed = train(build_task(config(8)), str(tmp_path / "b"))
    assert straight == resumed
    from apt_jax.train.checkpoint import Checkpointer

    task = build_task(config(8))
    states = []
    for run in ("a", "b"):
        with Checkpointer(str(tmp_path / run)) as ckpt:
            state, step = ckpt.restore(abstract_state=task.abstract_state)
            assert step == 8
            states.append(state)
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_data_order_resumes(tmp_path):
    task = build_task(tiny_config())
    it = task.make_iterator()
    seen = [next(it)["label"].copy() for _ in range(6)]
    it2 = task.make_iterator()
    for _ in range(3):
        next(it2)
    state = it2.get_state()
    it3 = task.make_iterator()
    it3.set_state(state)
    for i in range(3, 6):
        np.testing.assert_array_equal(next(it3)["label"], seen[i])


@pytest.mark.slow
def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    task = build_task(tiny_config(**{"total_steps": 6, "checkpoint_every": 2, "log_every": 1}))
    real_step = task.train_step

    def poisoned(state, batch, rng):
        state, metrics = real_step(state, batch, rng)
        if int(state.step) >= 3:
            metrics = dict(metrics, loss=jnp.float32(jnp.nan))
        return state, metrics

    task.train_step = poisoned
    with pytest.raises(NonFiniteMetricError, match=r"Step 3: metric\(s\) loss"):
        train(task, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
    task = build_task(tiny_config(**{"total_steps": 6, "checkpoint_every": 100}))
    real_step = task.train_step

    def preempted(state, batch, rng):
        out = real_step(state, batch, rng)
        if int(out[0].step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    task.train_step = preempted
    result = train(task, str(tmp_path))
    assert result == {"step": 3, "preempted": True}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    final = train(
        build_task(tiny_config(**{"total_steps": 6, "checkpoint_every": 100})), str(tmp_path)
    )
    assert final["step"] == 6
    assert "6" in os.listdir(tmp_path / "checkpoints")


def test_gradient_accumulation_matches_full_batch():
    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 3))}

    def loss_fn(p, b, rng):
        loss = jnp.mean(jnp.square(b["x"] @ p["w"]))
        return loss, {"loss": loss}

    g1, m1 = compute_grads(loss_fn, params, batch, jax.random.key(1), 1)
    g4, m4 = compute_grads(loss_fn, params, batch, jax.random.key(1), 4)
    np.testing.assert_allclose(g1["w"], g4["w"], rtol=1e-6)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batch_size": 12, "mesh.fsdp": 8, "mesh.data": 1}, "not divisible by data x fsdp"),
        ({"mesh.data": 16}, "needs 16 devices but only 8"),
        ({"optimizer.name": "lamb2"}, "optimizer.name='lamb2' is unknown"),
        (
            {"model.attention_implementation": "flash"},
            "attention_implementation='flash' is unknown",
        ),
        ({"model.dual_attention_layers": (5,)}, r"dual_attention_layers has indices \[5\] outside"),
        ({"flow.density": "beta"}, "flow.density='beta' is unknown"),
        ({"total_steps": 0}, "total_steps must be a positive int"),
    ],
)
def test_bad_config_fails_before_compiling(overrides, match, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ValueError, match=match):
        build_task(tiny_config(**overrides))


@pytest.mark.slow
def test_launch_train_subprocess(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "train.py"),
        "--config",
        os.path.join(REPO, "configs", "digits_sft.py:tiny"),
        "--workdir",
        str(tmp_path),
        "--config.total_steps=4",
        "--config.eval.num_samples=20",
        "--config.eval.grid_rows=2",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'step': 4" in out.stdout
    assert os.path.exists(tmp_path / "checkpoints" / "4")
    assert os.path.exists(tmp_path / "eval" / "samples_step4.png")
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines if "loss" in r] == [2, 3, 4]  # log_every=2, and saves
    assert np.isfinite(lines[-1]["eval/frechet_distance"])
