"""SD3 end to end on a tiny random SD3 stack (tests/tiny_sd3.py, built and saved here,
nothing downloaded): images + captions -> `launch/encode.py`'s library function (negative
prompt "") -> the transformer converted -> deterministic distillation -> APT with exact
R1 -> `launch/convert.py --to-diffusers` -> `StableDiffusion3Pipeline` generates in one step.

Two checks:
  * the exported APT generator, run by diffusers with `num_inference_steps=1,
    guidance_scale=1.0`, gives apt_jax's `G(z, c) = z - v(z, 1, c)` for the same noise and
    prompts (1e-4). In diffusers 0.42.1 the SD3 pipeline's one step with the shift-3
    scheduler is `t = 1000` (sigma 1; the shift maps 1 to 1) then sigma 0, and
    `FlowMatchEulerDiscreteScheduler.step` is `x + (0 - 1) v`: exactly `z - v(z, 1, c)`;
    with guidance 1.0 the pipeline skips CFG and never encodes a negative prompt.
  * the distilled student's 1-step output, measured in diffusers, is closer to the
    teacher's many-step CFG output (the original transformer, `teacher_steps` steps,
    `guidance_scale=teacher_cfg`, negative prompt "") than the teacher's own 1-step output.

Both train and spawn `launch/convert.py`, so both are slow (a quick third test checks the
scheduler's one step). Their APT runs compile the same step (same shapes and settings),
so in one session the second compile is a cache read (tests/conftest.py). Run with `-s`
to see the distances (docs/sd3_walkthrough.md#what-the-end-to-end-test-measured).
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import tiny_sd3  # noqa: E402
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from apt_jax import sampling  # noqa: E402
from apt_jax.convert import diffusers_sd3  # noqa: E402
from apt_jax.convert.params_checkpoint import save_params  # noqa: E402
from apt_jax.sd3 import encode  # noqa: E402
from apt_jax.tasks import build_task, load_run  # noqa: E402
from apt_jax.train.config import mmdit_config  # noqa: E402
from apt_jax.train.loop import train  # noqa: E402
from configs import sd3_apt, sd3_distill  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
R = 16  # --resolution: latents (8, 8, 4), 16 image tokens at patch 2
MAX_LEN = 8  # --max_sequence_length: context (77 + 8, 16)
# Captions of the 8 rows; the last 2 are held out (--eval_rows 2).
PROMPTS = (
    "a red circle",
    "a blue square",
    "a green circle on white",
    "a photo of a black square",
    "red on blue",
    "a white circle",
    "a square of green",
    "blue",
)
TRAIN_PROMPTS = PROMPTS[:6]
TEACHER_STEPS = 8
TEACHER_CFG = 3.0
DISTILL_STEPS = 64
# One device: the tiny networks gain nothing from 8 simulated ones on a shared machine.
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
TOL = 1e-4


# torch on one thread (conftest's single_torch_thread); conftest also gives pipeline_dir.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    """The teacher as diffusers runs it: the saved pipeline, its own transformer."""
    return StableDiffusion3Pipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def data_dir(pipeline_dir, tmp_path_factory):
    """The latents dataset `tiny` of 8 random R x R images and PROMPTS, encoded with the
    pipeline's VAE and text encoders, the empty prompt as the negative."""
    images = str(tmp_path_factory.mktemp("images"))
    rng = np.random.default_rng(0)
    with open(os.path.join(images, "metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        for i, prompt in enumerate(PROMPTS):
            pixels = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(images, f"{i}.png"))
            writer.writerow([f"{i}.png", prompt])
    out = str(tmp_path_factory.mktemp("data"))
    options = encode.EncodeOptions(
        resolution=R, negative_prompt="", eval_rows=2, max_sequence_length=MAX_LEN, batch_size=8
    )
    encode.encode_folder(
        pipeline_dir, images, os.path.join(images, "metadata.csv"), out, "tiny", options
    )
    return out


@pytest.fixture(scope="module")
def teacher_ckpt(pipeline_dir, tmp_path_factory):
    """The pipeline's transformer converted (`launch/convert.py --diffusers ... --scan_layers`)."""
    config, params = diffusers_sd3.load(os.path.join(pipeline_dir, "transformer"), scan_layers=True)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_sd3")
    save_params(path, config, params)
    return path


def _small(config, data_dir, total_steps):
    """A recipe config shrunk to this test: the tiny dataset, float32 compute (the
    export is compared with float32 diffusers), no remat, one device, no mid-run eval."""
    config.data.data_dir, config.data.dataset = data_dir, "tiny"
    config.model.dtype, config.model.remat_policy = "float32", "none"
    config.mesh.update(ONE_DEVICE)
    config.total_steps, config.checkpoint_every, config.eval_every = total_steps, total_steps, 0
    config.log_every = max(1, total_steps // 4)
    config.eval.num_samples = 2
    config.eval.grid_rows = 1
    config.progress_bar = False
    return config


def distill_config(data_dir, teacher_ckpt):
    c = _small(sd3_distill.get_config("custom,deterministic"), data_dir, DISTILL_STEPS)
    c.init_from = teacher_ckpt
    c.teacher_steps, c.teacher_cfg = TEACHER_STEPS, TEACHER_CFG
    c.batch_size = 8
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 4
    return c


def apt_config(data_dir, teacher_ckpt, generator_workdir=""):
    """`sd3_apt.py:custom`, exact R1, 2 steps at the recipe's RMSProp rates: D's backbone
    from the converted teacher, G from `generator_workdir` (or the teacher too)."""
    c = _small(sd3_apt.get_config("custom"), data_dir, 2)
    c.init_from, c.generator_workdir = teacher_ckpt, generator_workdir
    c.r1_mode = "exact"
    c.batch_size = 4
    return c


def export(workdir, out):
    """`launch/convert.py --to-diffusers --workdir RUN --out DIR/transformer`, as a user runs it."""
    cmd = [sys.executable, "launch/convert.py", "--to-diffusers", "--workdir", workdir]
    proc = subprocess.run(
        [*cmd, "--out", out], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def export_in_process(workdir, out):
    """What `launch/convert.py --to-diffusers` does, without a new process: the run's
    served generator (EMA) -> `diffusers_sd3.save`."""
    task, state, _ = load_run(workdir)
    mmdit = task.generator_weights(state, ema=True).full()["mmdit"]
    diffusers_sd3.save(mmdit_config(task.config), mmdit, out)
    return out


def with_transformer(pipeline_dir, transformer_dir):
    transformer = SD3Transformer2DModel.from_pretrained(transformer_dir)
    return StableDiffusion3Pipeline.from_pretrained(pipeline_dir, transformer=transformer)


def noise(n, seed):
    """The pipeline's `latents` argument: `(n, C, H, W)` noise, NCHW as diffusers takes it."""
    shape = (n, tiny_sd3.LATENT_CHANNELS, R // tiny_sd3.VAE_SCALE, R // tiny_sd3.VAE_SCALE)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generate(pipeline, prompts, z, steps, cfg):
    """The pipeline's latents `(B, C, H, W)` (no VAE decode) from the noise `z`."""
    with torch.no_grad():
        out = pipeline(
            list(prompts),
            height=R,
            width=R,
            latents=z.clone(),
            num_inference_steps=steps,
            guidance_scale=cfg,
            negative_prompt="",
            max_sequence_length=MAX_LEN,
            output_type="latent",
        )
    return out.images.numpy()


def apt_jax_one_step(workdir, pipeline, prompts, z):
    """apt_jax's `G(z, c) = z - v(z, 1, c)` with the run's served (EMA) generator, `c` the
    pipeline's `encode_prompt` of `prompts`; NCHW in and out (apt_jax is channels-last)."""
    task, state, _ = load_run(workdir)
    with torch.no_grad():
        context, _, pooled, _ = pipeline.encode_prompt(
            list(prompts),
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_LEN,
        )
    cond = {"context": context.numpy(), "pooled": pooled.numpy()}
    one_step = jax.jit(
        lambda p, x, c: sampling.one_step_generate(task.generator.velocity_fn(p), x, c)
    )
    x = one_step(task.served_params(state), z.numpy().transpose(0, 2, 3, 1), cond)
    return np.asarray(x).transpose(0, 3, 1, 2)


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# -------------------------------------------------------------- the one-step export
def test_pipelines_one_step_is_z_minus_v_at_one(pipe):
    """What the export check rests on: diffusers' 1-step schedule under shift 3."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), [1000.0])
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(sampling.diffusers_sigmas(1, 3.0), [1.0, 0.0])
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step = scheduler.step(v, scheduler.timesteps[0], z, return_dict=False)[0]
    torch.testing.assert_close(step, z - v, rtol=0, atol=1e-6)


@pytest.mark.slow  # trains and spawns launch/convert.py
def test_exported_apt_generator_runs_in_diffusers_as_g(
    pipeline_dir, data_dir, teacher_ckpt, tmp_path
):
    """`launch/convert.py --to-diffusers --workdir APT_RUN` gives a transformer that
    `StableDiffusion3Pipeline(num_inference_steps=1, guidance_scale=1.0)` runs as the
    run's generator: the same latents as apt_jax's G for the same noise and prompts."""
    run = str(tmp_path / "apt")
    results = train(build_task(apt_config(data_dir, teacher_ckpt)), run)
    assert results["step"] == 2
    out = export(run, str(tmp_path / "export" / "transformer"))
    student = with_transformer(pipeline_dir, out)
    prompts = (*PROMPTS[:3], "a zebra")  # and one caption the run never saw
    z = noise(len(prompts), seed=3)
    got = generate(student, prompts, z, steps=1, cfg=1.0)
    want = apt_jax_one_step(run, student, prompts, z)
    assert got.shape == want.shape == (4, 4, R // 2, R // 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # The export is the trained generator, not the pipeline's transformer.
    teacher = StableDiffusion3Pipeline.from_pretrained(pipeline_dir)
    moved = np.abs(generate(teacher, prompts, z, steps=1, cfg=1.0) - got).max()
    print(f"\nexport vs apt_jax G: {np.abs(got - want).max():.2e}; vs the teacher: {moved:.2e}")
    assert moved > 10 * TOL

    # launch/sample.py --prompts --pipeline: the same prompts, encoded by the CLI.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    npz = tmp_path / "prompted.npz"
    cmd = [sys.executable, "launch/sample.py", "--workdir", run, "--num", "6", "--steps", "1"]
    cmd += ["--cfg", "1", "--prompts", str(prompts_file), "--pipeline", pipeline_dir]
    proc = subprocess.run(
        [*cmd, "--out", str(npz)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    assert labels.tolist() == [0, 1, 2, 3, 0, 1]  # sample i takes prompt i mod 4
    task, state, _ = load_run(run)
    with torch.no_grad():
        context, _, pooled, _ = student.encode_prompt(
            list(prompts),
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_LEN,
        )
    rows = {"context": context.numpy(), "pooled": pooled.numpy()}
    expected, _ = task.sample(state, 6, 1, 1.0, 0, cond_rows=rows)
    np.testing.assert_allclose(images, expected, rtol=0, atol=TOL)


# ------------------------------------------------------------------ the whole path
@pytest.mark.slow  # trains two runs and spawns launch/convert.py
def test_images_to_a_one_step_sd3_that_diffusers_runs(
    pipeline_dir, pipe, data_dir, teacher_ckpt, tmp_path
):
    """encode -> convert -> deterministic distillation -> APT (exact R1) -> export ->
    diffusers: the student's 1 step is closer to the teacher's 8-step CFG 3 output
    than the teacher's own 1 step is (RMS over the latents, measured in diffusers)."""
    distill_run, apt_run = str(tmp_path / "distill"), str(tmp_path / "apt")
    config = distill_config(data_dir, teacher_ckpt)
    assert config.teacher_shift == pipe.scheduler.config.shift == 3.0
    results = train(build_task(config), distill_run)
    assert results["step"] == DISTILL_STEPS and np.isfinite(results["eval/flow_loss"])
    results = train(build_task(apt_config(data_dir, teacher_ckpt, distill_run)), apt_run)
    assert results["step"] == 2 and np.isfinite(results["eval/flow_loss"])
    distilled = export_in_process(distill_run, str(tmp_path / "distilled" / "transformer"))
    final = export(apt_run, str(tmp_path / "export" / "transformer"))

    # Held-out noise (training drew its own from jax keys), the prompts it trained on.
    z = noise(len(TRAIN_PROMPTS), seed=1)
    target = generate(pipe, TRAIN_PROMPTS, z, TEACHER_STEPS, TEACHER_CFG)
    teacher_one = generate(pipe, TRAIN_PROMPTS, z, 1, 1.0)
    distill_one = generate(with_transformer(pipeline_dir, distilled), TRAIN_PROMPTS, z, 1, 1.0)
    student = with_transformer(pipeline_dir, final)
    apt_one = generate(student, TRAIN_PROMPTS, z, 1, 1.0)
    # The recipe's targets solve the teacher ODE on diffusers' own sigmas
    # (teacher_schedule="diffusers"); for comparison, the same 8 steps on the shifted
    # linspace(1, 0, N + 1) grid that teacher_schedule="linear" would distil. `sigmas=` is
    # shifted by the scheduler, so pass the unshifted grid.
    assert config.teacher_schedule == "diffusers"
    with torch.no_grad():
        linear_grid = pipe(
            list(TRAIN_PROMPTS),
            height=R,
            width=R,
            latents=z.clone(),
            sigmas=list(np.linspace(1.0, 0.0, TEACHER_STEPS + 1)[:-1]),
            guidance_scale=TEACHER_CFG,
            negative_prompt="",
            max_sequence_length=MAX_LEN,
            output_type="latent",
        ).images.numpy()
    np.testing.assert_allclose(
        pipe.scheduler.sigmas.numpy(),
        sampling.shifted_linear_sigmas(TEACHER_STEPS, config.teacher_shift),
        atol=1e-6,
    )
    before, after_distill = rms(teacher_one, target), rms(distill_one, target)
    after_apt = rms(apt_one, target)
    print(
        f"\nRMS to the teacher's {TEACHER_STEPS}-step CFG {TEACHER_CFG} latents in diffusers "
        f"(their RMS {rms(target, 0):.4f}): teacher 1 step {before:.4f}; after "
        f"{DISTILL_STEPS} distillation steps {after_distill:.4f}; after APT {after_apt:.4f}."
        f"\nThe teacher's {TEACHER_STEPS} steps on the linear grid vs diffusers' grid: "
        f"{rms(linear_grid, target):.4f}; to the linear grid's: teacher 1 step "
        f"{rms(teacher_one, linear_grid):.4f}, distilled {rms(distill_one, linear_grid):.4f}, "
        f"APT {rms(apt_one, linear_grid):.4f}"
    )
    assert np.all(np.isfinite(apt_one))
    # The distillation stage learned: much closer than where it started (the teacher).
    assert after_distill < 0.8 * before
    # The exported one-step generator is closer than the teacher's own one step.
    assert after_apt < before
    # And diffusers runs it as apt_jax's G.
    np.testing.assert_allclose(
        apt_one, apt_jax_one_step(apt_run, student, TRAIN_PROMPTS, z), rtol=0, atol=TOL
    )
