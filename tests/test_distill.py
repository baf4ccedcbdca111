"""Deterministic and direct distillation: losses, targets, sharding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax import sampling
from apt_jax.data.registry import moving_digits_data_config
from apt_jax.objectives.distill import direct_distill_loss, noise_from_seeds, teacher_solution
from apt_jax.tasks import build_task
from apt_jax.tasks.distill import make_targets
from apt_jax.tasks.networks import make_generator
from apt_jax.tasks.runs import load_run
from apt_jax.train import sharding
from apt_jax.train.config import model_config
from apt_jax.train.loop import train
from configs import digits_distill


def distill_config(teacher_dir, variant="deterministic", **overrides):
    c = digits_distill.get_config(f"{variant},tiny")
    c.teacher_workdir = teacher_dir
    c.update_from_flattened_dict(overrides)
    return c


def test_direct_loss_reaches_every_student_step(teacher_dir):
    task, state, _ = load_run(teacher_dir)
    gen = make_generator(task.config)
    params = state.ema_params
    k = 4
    sigmas = sampling.shifted_linear_sigmas(k, 1.0)
    z = noise_from_seeds(jnp.arange(6), (8, 8, 1))
    labels = jnp.arange(6) % 10
    target = jnp.zeros_like(z)

    def loss_of_offsets(offsets, remat):
        # offsets[i] is added to the velocity at step i only.
        def student(x, t, c):
            hit = (t[:, None] == jnp.asarray(sigmas[:-1], jnp.float32)[None]).astype(x.dtype)
            return gen.velocity(params, x, t, c) + (hit @ offsets)[:, None, None, None]

        return direct_distill_loss(student, z, labels, target, sigmas=sigmas, remat_steps=remat)[0]

    grads = jax.grad(loss_of_offsets)(jnp.zeros(k), True)
    assert np.all(np.abs(np.asarray(grads)) > 1e-6), grads
    grads_no_remat = jax.grad(loss_of_offsets)(jnp.zeros(k), False)
    np.testing.assert_allclose(grads, grads_no_remat, rtol=1e-5, atol=1e-7)


def test_precomputed_targets_equal_on_the_fly(teacher_dir, tmp_path):
    rows = make_targets(
        teacher_dir, str(tmp_path / "t.npz"), num=12, steps=3, cfg_scale=2.0, first_seed=100
    )
    assert rows["seed"].tolist() == list(range(100, 112))
    # The step's on-the-fly path: the same functions, from the same seeds.
    task, state, _ = load_run(teacher_dir)
    gen = make_generator(task.config)
    config = distill_config(teacher_dir, teacher_steps=3, teacher_cfg=2.0)
    labels = jnp.asarray(rows["label"])
    target = teacher_solution(
        gen.velocity_fn(state.ema_params),
        noise_from_seeds(jnp.asarray(rows["seed"]), (8, 8, 1)),
        labels,
        gen.null_condition(labels, config.teacher_negative_label),
        sigmas=sampling.shifted_linear_sigmas(3, 1.0),
        cfg_scale=2.0,
    )
    np.testing.assert_allclose(rows["target"], np.asarray(target), atol=1e-5)
    assert np.abs(rows["target"]).max() > 0.1


@pytest.mark.parametrize("variant", ["deterministic", "direct"])
def test_sharded_step_equals_single_device(teacher_dir, variant):
    config = distill_config(teacher_dir, variant)
    one = build_task(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    many = build_task(config, sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    batches = [next(one.make_iterator()) for _ in range(1)] * 2
    rng = jax.random.key(3)
    finals = []
    for task in (one, many):
        state = task.init_state(None)
        for b in batches:
            state, metrics = task.train_step(state, sharding.make_global_batch(b, task.mesh), rng)
        finals.append(state)
    a, b = finals
    for x, y in zip(
        jax.tree.leaves(a["student"].params), jax.tree.leaves(b["student"].params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    # The student moved; the teacher did not.
    t0 = jax.tree.leaves(a["teacher"])
    assert (
        max(
            float(np.abs(np.asarray(x) - np.asarray(y)).max())
            for x, y in zip(jax.tree.leaves(a["student"].params), t0, strict=True)
        )
        > 0
    )


@pytest.mark.parametrize("variant", ["deterministic", "direct"])
def test_distill_runs_end_to_end(teacher_dir, variant, tmp_path):
    results = train(build_task(distill_config(teacher_dir, variant)), str(tmp_path))
    assert results["step"] == 4
    assert np.isfinite(results["eval/frechet_distance"])


def test_precomputed_targets_train(teacher_dir, tmp_path):
    path = str(tmp_path / "targets.npz")
    make_targets(teacher_dir, path, num=32, steps=3, cfg_scale=1.0)
    config = distill_config(teacher_dir, targets="precomputed", targets_path=path)
    results = train(build_task(config), str(tmp_path / "run"))
    assert results["step"] == 4


def test_missing_teacher_fails_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match="holds no checkpoints"):
        build_task(distill_config(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="needs a teacher: pass --config.teacher_workdir"):
        build_task(distill_config(""))


def test_teacher_of_another_shape_fails_before_compiling(teacher_dir, monkeypatch):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    config = distill_config(teacher_dir, **{"model.num_layers": 3})
    with pytest.raises(ValueError, match=r"model.num_layers: 2 \(teacher\) vs 3"):
        build_task(config)


def test_precomputed_targets_must_match_config(teacher_dir, tmp_path):
    path = str(tmp_path / "t.npz")
    make_targets(teacher_dir, path, num=8, steps=2, cfg_scale=1.0)
    config = distill_config(teacher_dir, targets="precomputed", targets_path=path)
    with pytest.raises(ValueError, match="2 teacher steps"):
        build_task(config)


def test_precomputed_targets_must_fit_the_data(teacher_dir, tmp_path):
    """Image targets for a run on clips: refused, naming both shapes."""
    path = str(tmp_path / "t.npz")
    make_targets(teacher_dir, path, num=8, steps=3, cfg_scale=1.0)
    config = distill_config(teacher_dir, targets="precomputed", targets_path=path)
    config.data = moving_digits_data_config()
    config.model = model_config("digits-tiny-video")
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*shape \(4, 12, 12, 1\)"):
        build_task(config)
