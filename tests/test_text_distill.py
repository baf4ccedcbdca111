"""Text-conditioned distillation on a latents dataset, and the negative prompt as data."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax import sampling
from apt_jax.convert.params_checkpoint import save_params
from apt_jax.data import latents, registry
from apt_jax.models import get_variant
from apt_jax.models.mmdit import abstract_params
from apt_jax.objectives.distill import noise_from_seeds
from apt_jax.tasks import build_task, load_run
from apt_jax.tasks.distill import make_targets, teacher_targets
from apt_jax.tasks.runs import resolve_model
from apt_jax.train import sharding
from apt_jax.train.loop import train
from configs import sd3_distill, sd3_sft

# The "test" model: 4 latent channels, context width 24, pooled width 20.
SHAPES = {"latent": (8, 8, 4), "context": (6, 24), "pooled": (20,)}


def _rows(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = ["latent,context,pooled,caption"]
    for i in range(n):
        for k, s in SHAPES.items():
            np.save(os.path.join(folder, f"r{i}.{k}.npy"), rng.standard_normal(s).astype("f4"))
        lines.append(f"r{i}.latent.npy,r{i}.context.npy,r{i}.pooled.npy,caption {i}")
    with open(os.path.join(folder, "metadata.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return latents.read_metadata(folder, os.path.join(folder, "metadata.csv"), eval_rows=4)


def _negative(seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(SHAPES[k]).astype("f4") for k in ("context", "pooled")}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """`(data_dir, negative)`: 12 rows (4 held out) and a negative prompt embedding."""
    root = tmp_path_factory.mktemp("text_distill")
    negative = _negative()
    rows = _rows(str(root / "src"), 12)
    latents.build_dataset(rows, str(root / "data"), "tiny", negative=negative, negative_prompt="")
    return str(root / "data"), negative


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A converted checkpoint of the "test" MMDiT with random weights."""
    rng = np.random.default_rng(7)
    params = jax.tree.map(
        lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
        abstract_params(get_variant("test")),
    )
    path = str(tmp_path_factory.mktemp("ckpt") / "test")
    save_params(path, get_variant("test"), params)
    return path


def distill_config(data_dir, arg="test,deterministic", **overrides):
    c = sd3_distill.get_config(arg)
    c.data.data_dir, c.data.dataset = data_dir, "tiny"
    c.update_from_flattened_dict(overrides)
    return c


# -------------------------------------------------------- negative as data
def test_negative_prompt_is_stored_and_read_back(text_data):
    data_dir, negative = text_data
    got = latents.read_negative(data_dir, "tiny")
    for k in ("context", "pooled"):
        np.testing.assert_array_equal(got[k], negative[k])
    config = distill_config(data_dir)
    assert registry.negative_condition(config)["pooled"].shape == (20,)


def test_dataset_without_negative_warns_and_guides_against_zeros(tmp_path, caplog):
    latents.build_dataset(_rows(str(tmp_path / "src"), 6), str(tmp_path / "data"), "bare")
    with caplog.at_level("WARNING"):
        assert latents.read_negative(str(tmp_path / "data"), "bare") is None
    assert "has no negative prompt embedding" in caplog.text


def test_negative_of_another_shape_is_refused_before_writing(tmp_path):
    bad = {"context": np.zeros((5, 24), "f4"), "pooled": np.zeros((20,), "f4")}
    with pytest.raises(ValueError, match=r"context has shape \(5, 24\); the rows' is \(6, 24\)"):
        latents.build_dataset(
            _rows(str(tmp_path / "src"), 6), str(tmp_path / "data"), "x", negative=bad
        )
    assert not os.path.exists(latents.dataset_dir(str(tmp_path / "data"), "x"))


def test_text_null_condition_is_the_negative_for_every_sample(text_data):
    _, negative = text_data
    gen = build_task(
        distill_config(text_data[0], init_from="unused"), check_sources=False
    ).generator
    cond = {"context": jnp.ones((3, 6, 24)), "pooled": jnp.ones((3, 20))}
    out = gen.null_condition(cond, negative)
    np.testing.assert_array_equal(np.asarray(out["context"][2]), negative["context"])
    assert not np.any(np.asarray(gen.null_condition(cond)["pooled"]))


# ------------------------------------------------------------- the targets
@pytest.mark.slow  # reads a checkpoint and runs the teacher's ODE
def test_targets_guide_against_the_datasets_negative(text_data, teacher_ckpt):
    """The step's targets are the teacher sampler's Euler ODE with CFG against the
    stored negative, built here by hand; not the zero-negative ones."""
    data_dir, negative = text_data
    config = distill_config(data_dir, init_from=teacher_ckpt)
    task = build_task(config)
    teacher = task.init_state(jax.random.key(0))["teacher"]
    rows = registry.make_source(config).rows(4)
    cond = {"context": jnp.asarray(rows["context"]), "pooled": jnp.asarray(rows["pooled"])}
    seeds = jnp.arange(4, dtype=jnp.int32)
    sigmas = sampling.shifted_linear_sigmas(config.teacher_steps, config.teacher_shift)
    z, target = teacher_targets(
        task.generator,
        teacher,
        cond,
        seeds,
        (8, 8, 4),
        sigmas,
        config.teacher_cfg,
        registry.negative_condition(config),
    )
    uncond = {k: jnp.broadcast_to(negative[k], cond[k].shape) for k in cond}
    expected = sampling.euler_sample(
        task.generator.velocity_fn(teacher),
        noise_from_seeds(seeds, (8, 8, 4)),
        sigmas,
        cond,
        uncond=uncond,
        cfg_scale=config.teacher_cfg,
    )
    np.testing.assert_allclose(np.asarray(target), np.asarray(expected), atol=1e-5)
    zero_neg = teacher_targets(
        task.generator, teacher, cond, seeds, (8, 8, 4), sigmas, config.teacher_cfg, None
    )[1]
    assert np.abs(np.asarray(zero_neg) - np.asarray(target)).max() > 1e-3


@pytest.fixture(scope="module")
def text_teacher_run(text_data, teacher_ckpt, tmp_path_factory):
    """A 2-step text SFT run from the checkpoint: a teacher run for precomputed targets."""
    c = sd3_sft.get_config("test")
    c.data.data_dir, c.data.dataset, c.init_from = text_data[0], "tiny", teacher_ckpt
    workdir = str(tmp_path_factory.mktemp("text_sft"))
    train(build_task(c), workdir)
    return workdir


@pytest.mark.slow  # trains the teacher run
def test_precomputed_text_targets_equal_on_the_fly(text_data, text_teacher_run, tmp_path):
    path = str(tmp_path / "t.npz")
    rows = make_targets(text_teacher_run, path, num=10, steps=3, cfg_scale=2.0, shift=3.0)
    assert rows["row"].tolist() == [i % 8 for i in range(10)]  # the 8 train rows, cycled
    task, state, _ = load_run(text_teacher_run)
    records = registry.make_source(task.config)
    examples = [records[int(r)] for r in rows["row"]]
    cond = {k: jnp.stack([e[k] for e in examples]) for k in ("context", "pooled")}
    _, target = teacher_targets(
        task.generator,
        task.served_params(state),
        cond,
        jnp.asarray(rows["seed"]),
        (8, 8, 4),
        sampling.shifted_linear_sigmas(3, 3.0),
        2.0,
        text_data[1],
    )
    np.testing.assert_allclose(rows["target"], np.asarray(target), atol=1e-5)
    # And a run trains on them, the rows joined with the dataset's embeddings.
    config = distill_config(
        text_data[0],
        teacher_workdir=text_teacher_run,
        targets="precomputed",
        targets_path=path,
        teacher_steps=3,
        teacher_cfg=2.0,
        teacher_shift=3.0,
        teacher_schedule="linear",
    )
    assert train(build_task(config), str(tmp_path / "run"))["step"] == 2


# --------------------------------------------------------------- training
@pytest.mark.slow  # trains
@pytest.mark.parametrize("arg", ["test,deterministic", "test,direct"])
def test_text_distillation_trains_from_a_converted_teacher(text_data, teacher_ckpt, arg, tmp_path):
    config = distill_config(text_data[0], arg, init_from=teacher_ckpt, **{"lora.rank": 0})
    results = train(build_task(config), str(tmp_path / "run"))
    assert results["step"] == 2
    assert np.isfinite(results["eval/flow_loss"])


@pytest.mark.slow  # trains
def test_text_distillation_with_lora(text_data, teacher_ckpt, tmp_path):
    config = distill_config(text_data[0], init_from=teacher_ckpt, **{"lora.rank": 4})
    task = build_task(config)
    train(task, str(tmp_path / "run"))
    _, state, _ = load_run(str(tmp_path / "run"))
    weights = task.generator_weights(state, ema=False)
    assert weights.lora is not None and weights.base is state["teacher"]


@pytest.mark.slow  # compiles the step twice
def test_sharded_text_distill_step_equals_single_device(text_data, teacher_ckpt):
    config = distill_config(text_data[0], init_from=teacher_ckpt)
    results = {}
    for name, mesh in (
        ("one", sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])),
        ("eight", sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})),
    ):
        task = build_task(config, mesh)
        state = task.init_state(jax.random.key(0))
        batch = next(task.make_iterator())
        batch = sharding.make_global_batch(batch, mesh)
        state, metrics = task.train_step(state, batch, jax.random.key(1))
        results[name] = (jax.device_get(state["student"].params), jax.device_get(metrics))
    for a, b in zip(
        jax.tree.leaves(results["one"]), jax.tree.leaves(results["eight"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ errors
def test_distillation_without_teacher_is_refused(text_data):
    with pytest.raises(ValueError, match="needs a teacher: pass --config.teacher_workdir"):
        build_task(distill_config(text_data[0]))


def test_converted_teacher_of_class_runs_is_refused(tmp_path):
    from configs import digits_distill

    c = digits_distill.get_config("deterministic,tiny")
    c.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="teacher of text-conditioned runs only"):
        build_task(c)


def test_dataset_channels_must_match_the_teacher(text_data, teacher_ckpt):
    config = distill_config(text_data[0], init_from=teacher_ckpt, **{"model.in_channels": 8})
    with pytest.raises(ValueError, match=r"latent channels 4 .* != config.model.in_channels=8"):
        build_task(config)


def test_custom_variant_takes_the_checkpoints_architecture(text_data, tmp_path):
    """`:custom` reads the architecture from init_from: here a 3-layer, 40-wide
    transformer no variant describes; the run's runtime fields stay its own."""
    arch = get_variant(
        "test",
        num_layers=3,
        caption_projection_dim=40,
        num_attention_heads=2,
        attention_head_dim=20,
    )
    save_params(
        str(tmp_path / "ckpt"),
        arch,
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(arch)),
    )
    config = distill_config(text_data[0], "custom,deterministic", init_from=str(tmp_path / "ckpt"))
    resolved = resolve_model(config)
    assert resolved.model.num_layers == 3 and resolved.model.attention_head_dim == 20
    assert resolved.model.remat_policy == "full" and resolved.model_from == ""
    task = build_task(config, check_sources=False)
    assert task.config.model.num_layers == 3
    with pytest.raises(ValueError, match="model_from='init_from' takes the architecture"):
        resolve_model(distill_config(text_data[0], "custom,deterministic"))


def test_sd3_teacher_uses_the_pipelines_schedule(text_data):
    """`configs/sd3_distill.py` solves the teacher ODE on diffusers' sigmas, so targets
    are the SD3 pipeline's many-step output; an unknown schedule is refused."""
    from apt_jax.tasks.distill import teacher_sigmas

    config = distill_config(text_data[0])
    assert config.teacher_schedule == "diffusers"
    np.testing.assert_array_equal(
        teacher_sigmas(config), sampling.diffusers_sigmas(config.teacher_steps, 3.0)
    )
    config.teacher_schedule = "cosine"
    with pytest.raises(ValueError, match="teacher_schedule='cosine' is unknown"):
        build_task(config, check_sources=False)
