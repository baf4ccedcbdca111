"""Real latent data: the tfds builder, its checks, text-conditioned SFT / APT, `init_from`,
and the SD3 configs."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from safetensors.numpy import save_file

from apt_jax.convert.params_checkpoint import CONFIG_NAME, load_params, save_params
from apt_jax.data import latents
from apt_jax.models import TextConditionalMMDiT, abstract_params, get_variant
from apt_jax.tasks import apt, build_task, sft
from apt_jax.tasks.networks import make_generator
from apt_jax.train import sharding
from apt_jax.train.loop import train
from apt_jax.train.lora_state import lora_for
from configs import digits_distill, sd3_apt, sd3_apt_lora, sd3_sft, sd3_sft_lora

# The "test" model: 4 latent channels, context width 24, pooled width 20.
LATENT, CONTEXT, POOLED = (8, 8, 4), (6, 24), (20,)
SHAPES = {"latent": LATENT, "context": CONTEXT, "pooled": POOLED}


def write_npy_rows(folder, n, shapes=None, seed=0):
    """n rows of .npy files and metadata.csv; returns the arrays by row."""
    shapes = shapes or SHAPES
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows, arrays = [], []
    for i in range(n):
        a = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        for k, v in a.items():
            np.save(os.path.join(folder, f"r{i}.{k}.npy"), v)
        rows.append({k: f"r{i}.{k}.npy" for k in shapes} | {"caption": f"caption, {i}"})
        arrays.append(a)
    write_csv(os.path.join(folder, "metadata.csv"), rows)
    return arrays


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """12 rows of test-model shapes, the last 4 held out: `(data_dir, arrays)`."""
    root = tmp_path_factory.mktemp("latents")
    arrays = write_npy_rows(str(root / "src"), 12)
    rows = latents.read_metadata(str(root / "src"), str(root / "src" / "metadata.csv"), 4)
    latents.build_dataset(rows, str(root / "data"), "tiny")
    return str(root / "data"), arrays


def random_params(config, seed=0):
    """Random weights in the MMDiT's tree, from shapes alone (no init compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract_params(config)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted-format checkpoint of the "test" MMDiT with random weights."""
    path = str(tmp_path_factory.mktemp("ckpt") / "test")
    save_params(path, get_variant("test"), random_params(get_variant("test"), 7))
    return path


def sft_config(data_dir, **overrides):
    c = sd3_sft.get_config("test")
    c.data.data_dir, c.data.dataset = data_dir, "tiny"
    c.update_from_flattened_dict(overrides)
    return c


def leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------- the builder
def test_builds_and_reads_back_in_csv_order(tiny_data):
    data_dir, arrays = tiny_data
    spec = latents.read_spec(data_dir, "tiny")
    assert spec.shapes.as_dict() == SHAPES and spec.splits == {"train": 8, "validation": 4}
    train_rows = latents.LatentRecords(data_dir, "tiny", "train")
    held_out = latents.LatentRecords(data_dir, "tiny", "validation")
    for i in range(8):
        assert set(train_rows[i]) == {"latent", "context", "pooled"}  # no text for the device
        for k in SHAPES:
            np.testing.assert_array_equal(train_rows[i][k], arrays[i][k])
    np.testing.assert_array_equal(held_out[0]["pooled"], arrays[8]["pooled"])
    assert held_out.text(3) == ("r11.latent", "caption, 11")
    # What grain reads is tfds.data_source itself: captions come back as bytes.
    source = tfds.data_source("latents/tiny", data_dir=data_dir, split="validation")
    assert source[1]["caption"] == b"caption, 9"


def test_safetensors_file_column_and_float16(tmp_path):
    rng = np.random.default_rng(1)
    rows, arrays = [], []
    for i in range(3):
        arrays.append({k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()})
        # Row 1 in bfloat16, as text encoders often write it.
        dtype = ml_dtypes.bfloat16 if i == 1 else np.float32
        save_file(
            {k: v.astype(dtype) for k, v in arrays[-1].items()}, str(tmp_path / f"x{i}.safetensors")
        )
        rows.append({"file": f"x{i}.safetensors", "caption": f"c{i}", "split": "train"})
    rows[2]["split"] = "validation"
    write_csv(tmp_path / "m.csv", rows)
    parsed = latents.read_metadata(str(tmp_path), str(tmp_path / "m.csv"))
    latents.build_dataset(parsed, str(tmp_path / "data"), "st", dtype="float16")
    back = latents.LatentRecords(str(tmp_path / "data"), "st", "validation")[0]
    assert back["latent"].dtype == np.float32
    want = arrays[2]["context"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back["context"], want)
    row1 = latents.LatentRecords(str(tmp_path / "data"), "st", "train")[1]["pooled"]
    want = arrays[1]["pooled"].astype(ml_dtypes.bfloat16).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(row1, want)


def test_bad_files_are_listed_by_name_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    write_npy_rows(str(src), 6)
    np.save(src / "r1.latent.npy", np.zeros((8, 8, 3), np.float32))  # wrong channels
    bad = np.zeros(CONTEXT, np.float32)
    bad[2, 5] = np.nan
    np.save(src / "r2.context.npy", bad)  # NaN
    os.remove(src / "r3.pooled.npy")  # missing embedding
    np.save(src / "r4.latent.npy", np.zeros((8, 8), np.float32))  # wrong rank
    rows = latents.read_metadata(str(src), str(src / "metadata.csv"))
    with pytest.raises(ValueError, match=r"^4 problem\(s\)") as e:
        latents.build_dataset(rows, str(tmp_path / "data"), "bad")
    msg = str(e.value)
    assert msg.startswith("4 problem(s)")
    assert "r1.latent.npy (CSV row 2, id 'r1.latent'): latent has shape (8, 8, 3)" in msg
    assert "r2.latent.npy (CSV row 3" in msg and "context has 1 NaN/Inf" in msg
    assert "r3.latent.npy (CSV row 4" in msg and "r3.pooled.npy does not exist" in msg
    assert "r4.latent.npy (CSV row 5" in msg and "want rank 3 or 4" in msg
    assert "r0.latent" not in msg and "r5.latent" not in msg
    assert not os.path.exists(tmp_path / "data" / "latents" / "bad")


def test_metadata_errors(tmp_path):
    write_csv(tmp_path / "a.csv", [{"latent": "x.npy", "caption": "c"}])
    with pytest.raises(ValueError, match="'latent', 'context' and 'pooled'"):
        latents.read_metadata(str(tmp_path), str(tmp_path / "a.csv"))
    write_csv(tmp_path / "b.csv", [{"file": "x.safetensors", "caption": "c", "split": "dev"}])
    with pytest.raises(ValueError, match="row 1: split='dev'; use one of"):
        latents.read_metadata(str(tmp_path), str(tmp_path / "b.csv"))
    write_csv(tmp_path / "c.csv", [{"file": "x.safetensors", "caption": "c"}])
    with pytest.raises(ValueError, match=r"eval_rows=1 must be in \[0, 1\)"):
        latents.read_metadata(str(tmp_path), str(tmp_path / "c.csv"), eval_rows=1)


# --------------------------------------------------------- conditioning
def test_text_dropout_zeroes_whole_rows():
    gen = TextConditionalMMDiT(get_variant("test"))
    cond = {"context": jnp.ones((400, 3, 24)), "pooled": jnp.ones((400, 20))}
    out = gen.drop_condition(cond, jax.random.key(0), 0.25)
    ctx_kept = np.asarray(out["context"]).reshape(400, -1).max(axis=1)
    pooled_kept = np.asarray(out["pooled"]).max(axis=1)
    np.testing.assert_array_equal(ctx_kept, pooled_kept)  # both dropped together
    assert set(np.unique(np.asarray(out["context"]))) == {0.0, 1.0}
    assert 0.18 < 1.0 - ctx_kept.mean() < 0.32  # 100 of 400 expected
    assert gen.drop_condition(cond, jax.random.key(0), 0.0) is cond
    assert not np.any(np.asarray(gen.null_condition(cond)["context"]))


def test_dataset_must_fit_the_model(tiny_data):
    config = sft_config(tiny_data[0], **{"model.joint_attention_dim": 32})
    with pytest.raises(
        ValueError, match=r"context width 24 .* config.model.joint_attention_dim=32"
    ):
        build_task(config)
    with pytest.raises(ValueError, match="no 'test' split"):
        build_task(sft_config(tiny_data[0], **{"data.eval_split": "test"}))
    with pytest.raises(ValueError, match="No latents dataset 'nope'"):
        build_task(sft_config(tiny_data[0], **{"data.dataset": "nope"}))
    distill = digits_distill.get_config("deterministic")
    distill.data = sft_config(tiny_data[0]).data
    with pytest.raises(ValueError, match="A distillation run needs a teacher"):
        build_task(distill)
    distill = digits_distill.get_config("deterministic")
    distill.init_from = "ckpt"
    with pytest.raises(ValueError, match="can be the teacher of text-conditioned runs only"):
        build_task(distill)


# ------------------------------------------------ SFT on latents, init_from
@pytest.fixture(scope="module")
def sft_run(tiny_data, checkpoint, tmp_path_factory):
    """SFT of the test model from `checkpoint`, FSDP over 8 devices, 2 steps."""
    config = sft_config(tiny_data[0], init_from=checkpoint)
    config.mesh.data, config.mesh.fsdp = 1, 8
    task = build_task(config)
    state0 = task.init_state(jax.random.key(0))
    workdir = str(tmp_path_factory.mktemp("sft_latents"))
    results = train(task, workdir)
    return task, state0, workdir, results


@pytest.mark.slow  # sft_run trains
def test_sft_starts_from_init_from_in_the_state_shardings(sft_run, checkpoint):
    task, state0, _, _ = sft_run
    _, saved = load_params(checkpoint)
    assert leaves_equal(state0.params["mmdit"], saved)
    assert leaves_equal(state0.ema_params["mmdit"], saved)
    want = jax.tree.map(lambda a: a.sharding, task.abstract_state.params["mmdit"])
    got = jax.tree.map(lambda a: a.sharding, state0.params["mmdit"])
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    # FSDP really splits them: some leaf is not replicated.
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(got))


@pytest.mark.slow  # sft_run trains
def test_sft_trains_two_steps_on_latents(sft_run, checkpoint, tiny_data):
    task, state0, workdir, results = sft_run
    assert results["step"] == 2 and np.isfinite(results["eval/flow_loss"])
    assert 0.0 < results["eval/flow_loss"] < 10.0
    with np.load(os.path.join(workdir, "eval", "samples_step2.npz")) as f:
        assert f["latents"].shape == (4, *LATENT) and np.all(np.isfinite(f["latents"]))
        assert list(f["captions"]) == [f"caption, {i}" for i in range(8, 12)]
    assert os.path.isfile(os.path.join(workdir, "eval", "samples_step2.png"))
    # Resume state is there, and the training moved the weights off the checkpoint.
    from apt_jax.tasks.runs import load_run

    _, state, step = load_run(workdir, mesh=task.mesh)
    assert step == 2 and not leaves_equal(state.params["mmdit"], state0.params["mmdit"])
    # sample.py's contract: labels are the eval rows the embeddings came from.
    images, labels = task.sample(state, 4, 2, 2.0, 0)  # eval's shapes: compiled already
    assert images.shape == (4, *LATENT) and list(labels) == [0, 1, 2, 3]


def test_init_from_must_match_the_model(tiny_data, checkpoint, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    fields = get_variant("test", num_layers=3, qk_norm="rms_norm").to_dict()
    (other / CONFIG_NAME).write_text(json.dumps(fields))
    config = sft_config(tiny_data[0], init_from=str(other))
    with pytest.raises(ValueError, match="holds another architecture than config.model") as e:
        build_task(config)
    assert "config.model.num_layers=2 but the checkpoint has 3" in str(e.value)
    assert "config.model.qk_norm=None but the checkpoint has 'rms_norm'" in str(e.value)
    with pytest.raises(ValueError, match=r"Params checkpoint \S*missing does not exist"):
        build_task(sft_config(tiny_data[0], init_from=str(tmp_path / "missing")))
    # Right JSON, wrong arrays: the restore names the key paths.
    narrow = get_variant("test", pooled_projection_dim=12)
    save_params(tmp_path / "wide", narrow, random_params(narrow))
    (tmp_path / "wide" / CONFIG_NAME).write_text(json.dumps(get_variant("test").to_dict()))
    task = build_task(sft_config(tiny_data[0], init_from=str(tmp_path / "wide")))
    with pytest.raises(ValueError, match=r"^config\.init_from='\S*wide': ") as e:
        task.init_state(jax.random.key(0))
    assert "time_text_embed/text_embedder/linear_1/kernel: (12, 32) vs (20, 32)" in str(e.value)


# ------------------------------------------------ APT on latents, init_from
@pytest.mark.slow  # heavy: compiles a whole APT step of the text model on 8 devices
def test_apt_generator_and_discriminator_from_one_checkpoint(tiny_data, checkpoint, tmp_path):
    config = sd3_apt.get_config("test")
    config.data.data_dir, config.data.dataset = tiny_data[0], "tiny"
    config.init_from = checkpoint
    config.mesh.data, config.mesh.fsdp = 1, 8
    task = build_task(config)
    state = task.init_state(jax.random.key(0))
    _, saved = load_params(checkpoint)
    g, d = state["generator"], state["discriminator"]
    assert set(g.params) == {"mmdit"} and set(d.params) == {"mmdit", "heads"}
    assert leaves_equal(g.params["mmdit"], saved) and leaves_equal(g.ema_params["mmdit"], saved)
    assert leaves_equal(d.params["mmdit"], saved)
    # One step on a text batch: both networks move, everything finite.
    batch = sharding.make_global_batch(next(task.make_iterator()), task.mesh)
    new, metrics = task.train_step(state, batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert not leaves_equal(new["generator"].params, saved)
    assert not leaves_equal(new["discriminator"].params["mmdit"], saved)
    config.teacher_workdir = "runs/sft"
    with pytest.raises(ValueError, match="both name D's backbone"):
        build_task(config)


# ------------------------------------------------------------ SD3 configs
@pytest.fixture(scope="module")
def sd3_data(tmp_path_factory):
    """Two rows with SD3's widths (16 channels, 4096 context, 2048 pooled), small
    latents and 4 context tokens; and JSON-only checkpoints of each variant."""
    root = tmp_path_factory.mktemp("sd3")
    shapes = {"latent": (16, 16, 16), "context": (4, 4096), "pooled": (2048,)}
    write_npy_rows(str(root / "src"), 2, shapes)
    rows = latents.read_metadata(str(root / "src"), str(root / "src" / "metadata.csv"), 1)
    latents.build_dataset(rows, str(root / "data"), "sd3")
    ckpts = {}
    for v in sd3_sft.SD3_VARIANTS:  # validation reads mmdit_config.json only
        ckpts[v] = root / v
        ckpts[v].mkdir()
        fields = get_variant(v, scan_layers=True).to_dict()
        (ckpts[v] / CONFIG_NAME).write_text(json.dumps(fields))
    return str(root / "data"), ckpts


@pytest.mark.parametrize("variant", sd3_sft.SD3_VARIANTS)
def test_sd3_configs_validate(sd3_data, variant):
    data_dir, ckpts = sd3_data
    for module, task in ((sd3_sft, sft), (sd3_apt, apt)):
        config = module.get_config(variant)
        assert config.model.to_dict() == {
            **get_variant(variant).to_dict(),
            "scan_layers": True,
            "remat_policy": "full",
            "dtype": "bfloat16",
            "param_dtype": "float32",
        }
        config.data.data_dir, config.data.dataset = data_dir, "sd3"
        config.init_from = str(ckpts[variant])
        task.validate(config)  # data, model and checkpoint agree; nothing compiled
        # Another variant's checkpoint is refused, naming a differing field.
        wrong = next(v for v in sd3_sft.SD3_VARIANTS if v != variant)
        config.init_from = str(ckpts[wrong])
        with pytest.raises(ValueError, match="holds another architecture than config.model"):
            task.validate(config)


def test_sd3_lora_configs_resolve_their_targets(sd3_data):
    """The SD3-medium LoRA recipes validate, and their target patterns resolve on the
    real SD3-medium parameter tree (shapes only: nothing is allocated)."""
    data_dir, ckpts = sd3_data
    for module, task in ((sd3_sft_lora, sft), (sd3_apt_lora, apt)):
        config = module.get_config("sd3-medium")
        config.data.data_dir, config.data.dataset = data_dir, "sd3"
        config.init_from = str(ckpts["sd3-medium"])
        task.validate(config)
        init = make_generator(config).init_boxed
        adapt = lora_for(config.lora, lambda init=init: jax.eval_shape(init, jax.random.key(0)))
        got = {(path[1], path[-1]): shape for path, shape in adapt.targets}
        attn = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out")
        # Blocks 0-22 are scanned (stacked on a leading axis of 23); block 23 is
        # context-pre-only (no to_add_out), as in SD3.
        want = {("transformer_blocks_0_23", m): (23, 1536, 1536) for m in (*attn, "to_add_out")}
        want.update({("transformer_blocks_23", m): (1536, 1536) for m in attn})
        assert got == want


@pytest.mark.slow
def test_prepare_latents_cli(tmp_path):
    """The launcher builds a dataset, and refuses bad files by name, writing nothing."""
    script = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "launch", "prepare_latents.py"
    )
    src = tmp_path / "src"
    write_npy_rows(str(src), 4)
    cmd = [sys.executable, script, f"--src={src}", f"--data_dir={tmp_path / 'data'}"]
    negative = {"context": np.ones(CONTEXT, np.float32), "pooled": np.full(POOLED, 2, np.float32)}
    for k, v in negative.items():
        np.save(tmp_path / f"neg.{k}.npy", v)
    neg_flags = [f"--negative_{k}={tmp_path / f'neg.{k}.npy'}" for k in negative]
    out = subprocess.run(
        [*cmd, "--name=ok", "--eval_rows=1", *neg_flags], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Wrote 4 examples {'train': 3, 'validation': 1}" in out.stdout
    stored = latents.read_negative(str(tmp_path / "data"), "ok")
    np.testing.assert_array_equal(stored["pooled"], negative["pooled"])
    np.save(src / "r2.pooled.npy", np.full(POOLED, np.inf, np.float32))
    out = subprocess.run([*cmd, "--name=bad"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "r2.latent.npy (CSV row 3, id 'r2.latent'): pooled has 20 NaN/Inf value(s)" in out.stderr
    assert not os.path.exists(tmp_path / "data" / "latents" / "bad")
