"""The video recipes on moving digits: the image-then-video schedule end to end,
each stage starting from the right weights, and one sharded step of SFT,
deterministic distillation and APT on 8 devices equal to the single-device step.

One tiny run of the video demo's stages (`apt_jax.stages.moving_digits_demo`,
every stage on one device: the sharded-step tests below cover the 8-device
mesh) serves all tests.
"""

import importlib
import os

import jax
import numpy as np
import pytest
from PIL import Image

from apt_jax import stages
from apt_jax.tasks import build_task
from apt_jax.tasks.runs import load_run
from apt_jax.train import sharding


def load_config(name, variant):
    return importlib.import_module(f"configs.{name}").get_config(variant)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("video_demo"))

    def one_device(name, variant):
        config = load_config(name, f"{variant},tiny")
        config.mesh.update({"data": 1})
        return config

    pipeline = stages.moving_digits_demo(
        sft_image=one_device("moving_digits_sft", "image"),
        sft_video=one_device("moving_digits_sft", "video"),
        deterministic=one_device("moving_digits_distill", "deterministic"),
        apt_image=one_device("moving_digits_apt", "image"),
        apt_video=one_device("moving_digits_apt", "video"),
        num_targets=32,
        num_samples=20,
    )
    return workdir, stages.run(pipeline, workdir)


def run(demo, stage):
    return os.path.join(demo[0], stage)


def tiny(name, variant, **settings):
    config = load_config(name, f"{variant},tiny")
    config.update_from_flattened_dict(settings)
    return config


@pytest.mark.slow  # `demo` runs the tiny video demo, every stage
def test_video_demo_pipeline(demo):
    workdir, table = demo
    for row in ("teacher_25_steps", "deterministic_1_step", "apt_image_stage_1_step"):
        assert row in table
    import json

    with open(os.path.join(workdir, "results.json")) as f:
        rows = json.load(f)
    assert len(rows) == 4
    for row in rows:
        for key in ("frame_frechet_distance", "frame_accuracy", "motion_error", "mean_speed"):
            assert np.isfinite(row[key]), (row["name"], key)
    with Image.open(os.path.join(workdir, "comparison.gif")) as gif:
        assert gif.n_frames == 4  # the clips' frames
    # comparison.png: each row's first three clips, a clip a line, 4 frames of 12x12, x4.
    with Image.open(os.path.join(workdir, "comparison.png")) as png:
        assert png.size == (4 * 49 + 1, 12 * 49 + 1)
    for row in rows:
        assert os.path.exists(os.path.join(workdir, f"{row['name']}.gif"))
        assert row["num_samples"] == 20
    # Each stage trained on its own data: one-frame clips, then 4-frame clips.
    frames = {s: load_run(run(demo, s))[0].config.data.num_frames for s in ("sft_image", "apt")}
    assert frames == {"sft_image": 1, "apt": 4}
    # The one-device mesh of the configs reached every stage.
    for stage in ("sft_image", "sft_video", "deterministic", "apt_image", "apt"):
        assert load_run(run(demo, stage))[0].mesh.size == 1, stage


def _served(stage_dir):
    task, state, _ = load_run(stage_dir)
    return jax.tree.map(np.asarray, task.served_params(state))


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_video_stages_start_from_the_image_stages(demo):
    # SFT: the video stage's first state is the image stage's served (EMA) weights.
    config = tiny("moving_digits_sft", "video", init_workdir=run(demo, "sft_image"))
    state = build_task(config).init_state(jax.random.key(0))
    _assert_tree_equal(state.params, _served(run(demo, "sft_image")))
    # APT: G from the image stage's EMA generator, D's backbone re-initialised from
    # the video teacher (the paper's video stage).
    config = tiny(
        "moving_digits_apt",
        "video",
        teacher_workdir=run(demo, "sft_video"),
        generator_workdir=run(demo, "apt_image"),
    )
    state = build_task(config).init_state(jax.random.key(0))
    _assert_tree_equal(state["generator"].params, _served(run(demo, "apt_image")))
    _assert_tree_equal(
        state["discriminator"].params["mmdit"], _served(run(demo, "sft_video"))["mmdit"]
    )


def _video_configs(demo):
    return {
        # 3D patches: two frames per token.
        "sft_patch_t2": tiny("moving_digits_sft", "video", **{"model.patch_size_t": 2}),
        "deterministic": tiny(
            "moving_digits_distill", "deterministic", teacher_workdir=run(demo, "sft_video")
        ),
        "apt": tiny(
            "moving_digits_apt",
            "video",
            teacher_workdir=run(demo, "sft_video"),
            generator_workdir=run(demo, "apt_image"),
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft_patch_t2", "deterministic", "apt"])
def test_video_step_sharded_equals_single_device(demo, recipe):
    config = _video_configs(demo)[recipe]
    one = build_task(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    many = build_task(config, sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    batch = next(one.make_iterator())
    assert batch["video"].shape == (16, 4, 12, 12, 1)
    rng = jax.random.key(3)
    finals = []
    for task in (one, many):
        state = task.init_state(jax.random.key(0))
        before = jax.tree.map(np.asarray, state)
        state, metrics = task.train_step(state, sharding.make_global_batch(batch, task.mesh), rng)
        assert all(np.isfinite(float(v)) for v in metrics.values())
        finals.append(state)
    a, b = finals
    # fsdp splits the weights over the 8 devices.
    assert any(
        x.addressable_shards[0].data.shape != x.shape
        for x in jax.tree.leaves(b)
        if getattr(x, "ndim", 0) >= 2
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    moved = [
        float(np.abs(np.asarray(x) - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(before), strict=True)
        if np.asarray(x).dtype.kind == "f"
    ]
    assert max(moved) > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.patch_size_t": None}, "image-only: set --config.model.patch_size_t=1"),
        (
            {"model.patch_size_t": 2, "data.num_frames": 1},
            "num_frames=1 is not a multiple of config.model.patch_size_t=2",
        ),
        ({"data.canvas": 13}, "Latent size 13x13 is not divisible by patch_size=2"),
    ],
)
def test_bad_video_configs_fail_before_compiling(overrides, message):
    config = tiny("moving_digits_sft", "image")
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        build_task(config)


@pytest.mark.slow
def test_sample_and_evaluate_clips(demo, tmp_path):
    """launch/sample.py writes the clips of a video run and launch/evaluate.py
    scores them with the video metrics (what the demo's table holds)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def launch(script, *args):
        cmd = [sys.executable, os.path.join(repo, "launch", script), *map(str, args)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    out, grid = tmp_path / "apt.npz", tmp_path / "apt.png"
    launch("sample.py", "--workdir", run(demo, "apt"), "--num", 30, "--out", out, "--grid", grid)
    with np.load(out) as f:
        assert f["images"].shape == (30, 4, 12, 12, 1)
        np.testing.assert_array_equal(f["labels"], np.arange(30) % 10)
    assert Image.open(grid).size == (4 * 49 + 1, 10 * 49 + 1)  # 10 clips of 4 frames, x4
    launch("evaluate.py", "--samples", out)
    with open(tmp_path / "results.json") as f:
        (row,) = json.load(f)
    assert set(row) >= {"frame_frechet_distance", "frame_accuracy", "motion_error", "mean_speed"}
