"""The APT recipe: its losses, the step's gradients, sharding, resume and config errors.

Both source runs are the shared tiny SFT run (`teacher_dir`): an SFT run serves a
generator like a distilled one, and the tests only need the shapes to agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apt_jax import sampling
from apt_jax.objectives import adversarial as adv
from apt_jax.objectives.apt import APTLossSettings, discriminator_loss, generator_loss
from apt_jax.tasks import apt, build_task
from apt_jax.tasks.networks import make_discriminator, make_generator
from apt_jax.tasks.runs import load_run
from apt_jax.train import sharding
from apt_jax.train.config import rmsprop_config
from apt_jax.train.loop import train
from apt_jax.train.optim import make_optimizer
from configs import digits_apt


def apt_config(teacher_dir, **overrides):
    c = digits_apt.get_config("tiny")
    c.teacher_workdir = teacher_dir
    c.generator_workdir = teacher_dir
    c.update_from_flattened_dict(overrides)
    return c


def one_device(config):
    return build_task(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def batch(teacher_dir):
    task = one_device(apt_config(teacher_dir))
    return next(task.make_iterator())


# --------------------------------------------------------------------------- losses
@pytest.fixture(scope="module")
def loss_inputs(teacher_dir, batch):
    task = one_device(apt_config(teacher_dir))
    state = task.init_state(jax.random.key(0))
    disc = make_discriminator(task.config)
    real = jnp.asarray(batch["image"][:4])
    fake = jax.random.normal(jax.random.key(5), real.shape) * 0.5
    labels = jnp.asarray(batch["label"][:4])
    return disc, state["discriminator"].params, real, fake, labels


def _logits(disc, params, x, labels, rng, shift):
    return disc.noised_logits(params, x, labels, rng, shift=shift, attention_implementation="xla")


LOSS_CASES = [
    (loss, mode)
    for loss in ("nonsaturating", "relativistic", "wgan_gp")
    for mode in ("none", "approx", "exact")
]


def test_discriminator_loss_is_its_formula(loss_inputs):
    disc, params, real, fake, labels = loss_inputs
    rng = jax.random.key(9)

    def settings(loss, mode):
        return APTLossSettings(
            loss=loss, r1_mode=mode, r1_weight=50.0, r1_sigma=0.05, d_timestep_shift=0.5
        )

    @jax.jit
    def all_cases(p):
        """Every (loss, r1_mode) in one compiled program (one compile, not nine)."""
        return {
            case: discriminator_loss(
                disc, settings(*case), p, real, fake, labels, rng, attention_implementation="xla"
            )
            for case in LOSS_CASES
        }

    @jax.jit
    def reference(p):
        """The same quantities from the primitives, with the key layout the docstring fixes."""
        r_noise, r_eps1, _, r_gp = jax.random.split(rng, 4)  # real and fake share r_noise
        real_fn = disc.logits_fn(p, labels, r_noise, shift=0.5, attention_implementation="xla")
        lr, lf = real_fn(real), _logits(disc, p, fake, labels, r_noise, 0.5)
        losses = {
            "nonsaturating": jax.nn.softplus(-lr) + jax.nn.softplus(lf),
            "relativistic": jax.nn.softplus(-(lr - lf)),
            "wgan_gp": lf - lr + 10.0 * adv.gradient_penalty(real_fn, real, fake, r_gp),
        }
        penalties = {
            "none": jnp.zeros(4),
            "approx": 50.0 * adv.r1_approx(real_fn, real, 0.05, r_eps1),
            "exact": 50.0 * 0.05**2 * adv.r1_exact(real_fn, real),
        }
        accuracy = {
            "nonsaturating": 0.5 * (jnp.mean(lr > 0) + jnp.mean(lf < 0)),
            "relativistic": jnp.mean(lr > lf),  # paired: the common offset is free
            "wgan_gp": jnp.mean(lr > lf),
        }
        return {c: jnp.mean(losses[c[0]] + penalties[c[1]]) for c in LOSS_CASES}, (
            jnp.mean(lr),
            accuracy,
        )

    got, (want, (real_mean, accuracy)) = all_cases(params), reference(params)
    for case in LOSS_CASES:
        loss, metrics = got[case]
        np.testing.assert_allclose(loss, want[case], rtol=2e-5, atol=1e-6, err_msg=str(case))
        np.testing.assert_allclose(metrics["real_logits"], real_mean, rtol=1e-5, atol=1e-6)
        assert float(metrics["d_accuracy"]) == float(accuracy[case[0]]), case
        assert (float(metrics["r1"]) > 0) == (case[1] != "none"), case


def test_generator_loss_is_its_formula(loss_inputs):
    disc, params, real, fake, labels = loss_inputs
    rng = jax.random.key(3)
    lf = _logits(disc, params, fake, labels, rng, 1.0)  # pairs share D's noise
    lr = _logits(disc, params, real, labels, rng, 1.0)
    for loss, want in [
        ("nonsaturating", jax.nn.softplus(-lf)),
        ("relativistic", jax.nn.softplus(-(lf - lr))),
        ("wgan_gp", -lf),
    ]:
        s = APTLossSettings(loss=loss)
        got, _ = generator_loss(
            disc, s, params, fake, real, labels, rng, attention_implementation="xla"
        )
        np.testing.assert_allclose(got, jnp.mean(want), rtol=1e-5, err_msg=loss)


def test_exact_weight_defaults_to_lambda_sigma_squared():
    assert APTLossSettings(r1_weight=100, r1_sigma=0.01).exact_weight == pytest.approx(0.01)
    assert APTLossSettings(r1_exact_weight=0.3).exact_weight == 0.3
    with pytest.raises(ValueError, match="r1_mode='exactly' is unknown"):
        APTLossSettings(r1_mode="exactly")


def test_head_lr_multiplier_scales_only_the_heads_updates():
    params = {"mmdit": {"w": jnp.ones((3, 2))}, "heads": {"w": jnp.ones(4), "b": jnp.ones(())}}
    grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape), params)
    opt = rmsprop_config(1e-3)

    def updates(multiplier):
        opt.head_lr_multiplier = multiplier
        tx = apt.discriminator_optimizer(opt, total_steps=10)
        return tx.update(grads, tx.init(params), params)[0]

    base, scaled = updates(1.0), updates(7.0)
    np.testing.assert_array_equal(scaled["mmdit"]["w"], base["mmdit"]["w"])
    for k in ("w", "b"):
        np.testing.assert_allclose(scaled["heads"][k], 7.0 * base["heads"][k], rtol=1e-6)
    assert float(jnp.abs(base["heads"]["w"]).max()) > 0


# ----------------------------------------------------------------------------- step
@pytest.fixture(scope="module")
def exact_tasks(teacher_dir):
    """The exact-R1 recipe on one device and on the 8-device fsdp mesh (compiled once each
    and shared by the step tests below)."""
    config = apt_config(teacher_dir, r1_mode="exact")
    many = build_task(config, sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    return one_device(config), many


def test_step_updates_d_then_g_through_the_updated_d(exact_tasks, batch):
    """The step's updates equal optax updates of gradients recomputed from the losses:
    D's of discriminator_loss, then G's of generator_loss(G(p)) through the *updated* D."""
    task = exact_tasks[0]
    config = task.config
    state = task.init_state(jax.random.key(0))
    g0, d0 = state["generator"].params, state["discriminator"].params
    disc, gen = make_discriminator(config), make_generator(config)
    settings = apt.loss_settings(config)
    g_tx = make_optimizer(config.generator_optimizer, config.total_steps)
    d_tx = apt.discriminator_optimizer(config.discriminator_optimizer, config.total_steps)
    real, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    rng = jax.random.key(11)

    def update(tx, params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    @jax.jit
    def expected(g0, d0):
        r_z, r_d, r_g = apt.step_rngs(rng, 0)
        z = jax.random.normal(r_z, real.shape)
        G = lambda p: sampling.one_step_generate(gen.velocity_fn(p), z, labels)  # noqa: E731
        d_grads = jax.grad(
            lambda p: discriminator_loss(disc, settings, p, real, G(g0), labels, r_d)[0]
        )(d0)
        d1 = update(d_tx, d0, d_grads)
        g_grads = jax.grad(
            lambda p: generator_loss(disc, settings, d1, G(p), real, labels, r_g)[0]
        )(g0)
        return d1, update(g_tx, g0, g_grads)

    want_d, want_g = expected(g0, d0)
    g0_copy = jax.tree.map(np.asarray, g0)
    new, metrics = task.train_step(state, sharding.make_global_batch(batch, task.mesh), rng)
    for got, want in ((new["discriminator"].params, want_d), (new["generator"].params, want_g)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - b).max(), new["generator"].params, g0_copy
    )
    assert max(jax.tree.leaves(moved)) > 0
    assert new["discriminator"].ema_params is None  # D keeps no EMA
    assert set(metrics) >= {"d_loss", "g_loss", "r1", "d_accuracy", "real_logits"}


def test_discriminator_warmup_updates_d_alone_then_both(teacher_dir, batch):
    """Warm-up steps update D as the joint step does and leave G's whole state as it
    was; after them G updates (its own count starting at 0)."""
    joint = one_device(apt_config(teacher_dir))
    warm = one_device(apt_config(teacher_dir, discriminator_warmup_steps=2))
    global_batch = sharding.make_global_batch(batch, warm.mesh)
    rng = jax.random.key(4)
    start = warm.init_state(jax.random.key(0))
    g0 = jax.tree.map(np.asarray, start["generator"])
    want, _ = joint.train_step(joint.init_state(jax.random.key(0)), global_batch, rng)
    want_d = jax.tree.map(np.asarray, want["discriminator"].params)

    state, metrics = warm.train_step(start, global_batch, rng)
    d_leaves = jax.tree.leaves(state["discriminator"].params)
    for a, b in zip(d_leaves, jax.tree.leaves(want_d), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state["generator"]), jax.tree.leaves(g0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(metrics["g_grad_norm"]) == 0 and np.isfinite(float(metrics["g_loss"]))

    state, _ = warm.train_step(state, global_batch, rng)
    assert int(state["generator"].step) == 0 and int(state["discriminator"].step) == 2
    state, metrics = warm.train_step(state, global_batch, rng)
    assert int(state["generator"].step) == 1 and float(metrics["g_grad_norm"]) > 0
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - b).max(), state["generator"].params, g0.params
    )
    assert max(jax.tree.leaves(moved)) > 0


def test_exact_r1_step_sharded_equals_single_device(exact_tasks, batch):
    rng = jax.random.key(3)
    finals = []
    for task in exact_tasks:
        state = task.init_state(jax.random.key(0))
        for _ in range(2):
            state, _ = task.train_step(state, sharding.make_global_batch(batch, task.mesh), rng)
        finals.append(state)
    a, b = finals
    # fsdp really splits D's backbone and heads.
    for part in ("mmdit", "heads"):
        leaves = jax.tree.leaves(b["discriminator"].params[part])
        assert any(x.addressable_shards[0].data.shape != x.shape for x in leaves), part
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_resume_equals_uninterrupted_run(exact_tasks, tmp_path):
    # One task (one compiled step) for all three runs; only total_steps changes.
    task = exact_tasks[1]
    assert (task.config.total_steps, task.config.checkpoint_every) == (4, 2)
    train(task, str(tmp_path / "straight"))
    task.config.total_steps = 2
    train(task, str(tmp_path / "resumed"))
    task.config.total_steps = 4
    results = train(task, str(tmp_path / "resumed"))
    assert results["step"] == 4 and np.isfinite(results["eval/frechet_distance"])
    _, s1, _ = load_run(str(tmp_path / "straight"))
    _, s2, _ = load_run(str(tmp_path / "resumed"))
    for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert s2["discriminator"].ema_params is None


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(r1_mode="exactly"), "r1_mode='exactly' is unknown"),
        (dict(loss="hinge"), "loss='hinge' is unknown"),
        (dict(r1_sigma=0.0), "r1_sigma=0.0 must be > 0"),
        (dict(d_head_layers=(0, 5)), r"head_layers has indices \[5\] outside \[0, num_layers=2\)"),
        ({"discriminator_optimizer.accumulation_steps": 2}, "accumulation_steps must be 1"),
        (dict(generator_workdir=""), "generator_workdir is empty"),
        (dict(teacher_workdir="/nonexistent"), "holds no checkpoints"),
        ({"model.num_layers": 3}, r"model.num_layers: 2 \(teacher\) vs 3"),
        ({"discriminator_optimizer.head_lr_multiplier": 0.0}, "head_lr_multiplier=0.0 must be"),
        (dict(discriminator_warmup_steps=4), r"discriminator_warmup_steps=4 must be .* \[0, "),
    ],
)
def test_bad_configs_fail_before_compiling(teacher_dir, monkeypatch, overrides, message):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match=message):
        build_task(apt_config(teacher_dir, **overrides))
