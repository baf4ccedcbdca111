"""launch/encode.py and launch/decode.py (apt_jax.sd3) on a tiny random SD3 pipeline that
tests/tiny_sd3.py builds and saves offline: the dataset's rows are the pipeline's own VAE
and encode_prompt outputs, the negative prompt is encoded once, decoding undoes the
encoding, and every bad input stops the run with its file named and nothing written."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusion3Pipeline  # noqa: E402

from apt_jax.data import latents  # noqa: E402
from apt_jax.errors import UserError  # noqa: E402
from apt_jax.sd3 import decode, encode  # noqa: E402
from apt_jax.sd3 import pipeline as sd3  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
R = 32  # --resolution: latents (16, 16, 4), the tiny VAE halves each side
MAX_LEN = 8  # --max_sequence_length: context (77 + 8, 16)
TOL = 1e-5
# (name, size (w, h), PIL mode, prompt): other shapes and modes than R x R RGB, and a
# prompt a CSV must quote.
IMAGES = [
    ("square.png", (32, 32), "RGB", "a red circle"),
    ("wide.png", (48, 32), "RGB", 'a blue square, "on" white'),
    ("tall.png", (40, 64), "RGB", "a green circle on black"),
    ("big.png", (64, 64), "RGBA", "a photo of a red square"),
    ("odd.png", (33, 35), "L", "blue"),
]


# torch on one thread (conftest's single_torch_thread); conftest also gives pipeline_dir.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    """The reference: the saved pipeline as diffusers loads it."""
    return StableDiffusion3Pipeline.from_pretrained(pipeline_dir)


def write_images(folder, images=IMAGES, seed=0):
    """Random images and their metadata.csv (DiffSynth's image,prompt columns)."""
    import csv

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (w, h), mode, _ in images:
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(
            os.path.join(folder, name)
        )
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        writer.writerows([(name, prompt) for name, _, _, prompt in images])
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")))


def options(**overrides):
    return encode.EncodeOptions(
        **{"resolution": R, "max_sequence_length": MAX_LEN, "batch_size": 2, **overrides}
    )


@pytest.fixture(scope="module")
def encoded(pipeline_dir, image_dir, tmp_path_factory):
    """The dataset of IMAGES: the last 2 rows held out, batches of 2, arrays kept."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    csv_path = os.path.join(image_dir, "metadata.csv")
    out = encode.encode_folder(
        pipeline_dir, image_dir, csv_path, data_dir, "tiny", options(eval_rows=2, keep_encoded=True)
    )
    return data_dir, out


def reference_pixels(path, resolution):
    """Shorter side resized to `resolution` (bicubic), centre crop: (R, R, 3) uint8."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    size = (round(w * s), round(h * s))
    img = img.resize(size, Image.Resampling.BICUBIC) if size != (w, h) else img
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    return np.asarray(img)[top : top + resolution, left : left + resolution]


def to_vae(pixels):
    return torch.from_numpy(np.asarray(pixels, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def reference_latent(pipe, pixels):
    """StableDiffusion3Pipeline's scaling of the VAE posterior mean, channels-last."""
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(to_vae(pixels)).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return z[0].permute(1, 2, 0).numpy()


def reference_prompt(pipe, prompt, negative=""):
    with torch.no_grad():
        context, neg_context, pooled, neg_pooled = pipe.encode_prompt(
            prompt, None, None, negative_prompt=negative, max_sequence_length=MAX_LEN
        )
    return context[0].numpy(), pooled[0].numpy(), neg_context[0].numpy(), neg_pooled[0].numpy()


def dataset_rows(data_dir, name="tiny"):
    """Every row of both splits in CSV order: (arrays, id, caption)."""
    out = []
    for split in ("train", "validation"):
        records = latents.LatentRecords(data_dir, name, split)
        out += [(records[i], *records.text(i)) for i in range(len(records))]
    return out


# ------------------------------------------------------------------ the tiny pipeline
def test_tiny_pipeline_is_an_sd3_pipeline(pipeline_dir, pipe):
    """What the encode tests and the end-to-end export test rely on: the saved folder
    loads offline and generates; its widths are SD3's relations; weights are random."""
    assert sorted(os.listdir(pipeline_dir)) == sorted(
        ["model_index.json", "scheduler", "transformer", "vae"]
        + [f"text_encoder{s}" for s in ("", "_2", "_3")]
        + [f"tokenizer{s}" for s in ("", "_2", "_3")]
    )
    spec = sd3.read_pipeline(pipeline_dir)
    assert (spec.vae_scale, spec.latent_channels, spec.patch_size) == (2, 4, 2)
    assert (spec.shift_factor, spec.scaling_factor) == (0.0609, 1.5305)
    assert spec.joint_attention_dim == spec.t5_width == 16
    assert spec.pooled_projection_dim == sum(spec.clip_projections) == 16
    assert pipe.scheduler.config.shift == 3.0
    # Words outside the vocabulary fall back to letters, never to <unk>.
    ids = pipe.tokenizer("a zebra").input_ids
    assert pipe.tokenizer.unk_token_id not in ids[1:-1] and len(ids) == 2 + 1 + 5
    assert pipe.tokenizer_3.unk_token_id not in pipe.tokenizer_3("a zebra").input_ids
    out = pipe(
        ["a red circle", "blue"],
        height=R,
        width=R,
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=MAX_LEN,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 4, R // 2, R // 2) and torch.isfinite(out).all()
    assert float(out[0].std()) > 0.1 and not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------- images -> rows
def test_rows_are_the_pipelines_own_outputs(encoded, image_dir, pipe):
    data_dir, out = encoded
    assert out == latents.dataset_dir(data_dir, "tiny")
    spec = latents.read_spec(data_dir, "tiny")
    assert spec.splits == {"train": 3, "validation": 2}
    assert spec.shapes == latents.Shapes((R // 2, R // 2, 4), (77 + MAX_LEN, 16), (16,))
    rows = dataset_rows(data_dir)
    assert [(i, c) for _, i, c in rows] == [(n[:-4], p) for n, _, _, p in IMAGES]
    for (arrays, _, _), (name, _, _, prompt) in zip(rows, IMAGES, strict=True):
        pixels = reference_pixels(os.path.join(image_dir, name), R)
        np.testing.assert_allclose(arrays["latent"], reference_latent(pipe, pixels), atol=TOL)
        context, pooled, _, _ = reference_prompt(pipe, prompt)
        np.testing.assert_allclose(arrays["context"], context, atol=TOL)
        np.testing.assert_allclose(arrays["pooled"], pooled, atol=TOL)


def test_negative_prompt_is_encode_prompt_of_it(encoded, pipe):
    data_dir, _ = encoded
    _, _, context, pooled = reference_prompt(pipe, "a red circle", negative="")
    negative = latents.read_negative(data_dir, "tiny")
    np.testing.assert_allclose(negative["context"], context, atol=TOL)
    np.testing.assert_allclose(negative["pooled"], pooled, atol=TOL)
    # Kept beside the rows, as prepare_latents.py takes them.
    stage = encode.encoded_dir(data_dir, "tiny")
    np.testing.assert_array_equal(np.load(f"{stage}/negative_context.npy"), negative["context"])
    np.testing.assert_array_equal(np.load(f"{stage}/negative_pooled.npy"), negative["pooled"])
    # Not the empty prompt's zeros: CFG against it is not CFG against zeros.
    assert np.abs(negative["context"]).mean() > 0.1


def test_another_negative_prompt(pipeline_dir, image_dir, pipe, tmp_path):
    images = IMAGES[:2]
    folder = write_images(str(tmp_path / "images"), images)
    encode.encode_folder(
        pipeline_dir,
        folder,
        f"{folder}/metadata.csv",
        str(tmp_path / "data"),
        "neg",
        options(negative_prompt="blurry, black", dtype="float16"),
    )
    _, _, context, pooled = reference_prompt(pipe, "a", negative="blurry, black")
    negative = latents.read_negative(str(tmp_path / "data"), "neg")
    # Stored as float16: within its rounding of the float32 values.
    np.testing.assert_allclose(negative["context"], context, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(negative["pooled"], pooled, rtol=1e-3, atol=1e-3)
    # Without --keep_encoded nothing but the dataset stays.
    assert sorted(os.listdir(tmp_path / "data")) == ["downloads", "latents"]


def test_staged_rows_rebuild_with_prepare_latents_functions(encoded, tmp_path):
    """The kept folder is prepare_latents.py's input: the same dataset comes back."""
    data_dir, _ = encoded
    stage = encode.encoded_dir(data_dir, "tiny")
    rows = latents.read_metadata(stage, f"{stage}/metadata.csv", eval_rows=2)
    latents.build_dataset(rows, str(tmp_path), "again")
    for (a, ia, ca), (b, ib, cb) in zip(
        dataset_rows(data_dir), dataset_rows(str(tmp_path), "again"), strict=True
    ):
        assert (ia, ca) == (ib, cb)
        for k in latents.FIELDS:
            np.testing.assert_array_equal(a[k], b[k])


def test_resize_and_crop(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)  # tall: crop rows 8..40
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    np.testing.assert_array_equal(encode.load_image(str(tmp_path / "tall.png"), 32), pixels[8:40])
    big = np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)  # 96 x 64 -> 48 x 32, crop
    Image.fromarray(big).save(tmp_path / "big.png")
    out = encode.load_image(str(tmp_path / "big.png"), 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - pixels[8:40]).mean() < 20  # a resampled copy
    # A camera's EXIF orientation is applied (6: the stored pixels are rotated by 90).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    rotated = encode.load_image(str(tmp_path / "rotated.png"), 32)
    np.testing.assert_array_equal(rotated, np.rot90(pixels, k=-1)[:, 8:40])


# ------------------------------------------------------------------- latents -> images
def test_decode_undoes_encode(encoded, pipeline_dir, image_dir, pipe, tmp_path):
    """decode(encode(x)) is the VAE's own reconstruction of x (to PNG rounding)."""
    data_dir, _ = encoded
    rows = dataset_rows(data_dir)
    samples = tmp_path / "eval.npz"
    np.savez(
        samples,
        latents=np.stack([a["latent"] for a, _, _ in rows]),
        ids=np.array([i for _, i, _ in rows]),
        captions=np.array([c for _, _, c in rows]),
    )
    paths = decode.decode_samples(pipeline_dir, str(samples), str(tmp_path / "pngs"), nrow=2)
    assert [os.path.basename(p) for p in paths] == [f"{i:05d}.png" for i in range(5)] + ["grid.png"]
    for path, (name, _, _, _) in zip(paths, IMAGES, strict=False):
        pixels = reference_pixels(os.path.join(image_dir, name), R)
        with torch.no_grad():
            recon = pipe.vae.decode(pipe.vae.encode(to_vae(pixels)).latent_dist.mean).sample
        recon = (recon[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1.0) * 127.5
        png = np.asarray(Image.open(path), np.float32)
        assert png.shape == (R, R, 3)
        assert np.abs(png - recon).max() <= 1.0  # uint8 rounding, float32 reordering
    grid = np.asarray(Image.open(paths[-1]))
    assert grid.shape == (2 * (R + 1) + 1, 2 * (R + 1) + 1, 3)  # the first 2 x 2
    with open(tmp_path / "pngs" / "captions.txt") as f:
        assert f.read().splitlines() == [p for _, _, _, p in IMAGES]


# ------------------------------------------------------------------------ bad inputs
@pytest.fixture
def no_models(monkeypatch):
    """A bad input must be refused before any network loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(sd3, "load_text_encoders", refuse)
    monkeypatch.setattr(sd3, "load_vae", refuse)


def broken_pipeline(src, dst, change):
    shutil.copytree(src, dst)
    change(str(dst))
    return str(dst)


def _edit_json(path, **values):
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w") as f:
        json.dump(config, f)


PIPELINE_CASES = {
    "no vae": (
        lambda d: shutil.rmtree(f"{d}/vae"),
        r"/vae does not exist\. Give --pipeline a full StableDiffusion3Pipeline folder",
    ),
    "no vae weights": (
        lambda d: os.remove(f"{d}/vae/diffusion_pytorch_model.safetensors"),
        r"/vae holds no weights \(\*\.safetensors or \*\.bin; it has \['config\.json'\]\)",
    ),
    "no second CLIP": (
        lambda d: shutil.rmtree(f"{d}/text_encoder_2"),
        r"/text_encoder_2 does not exist\. Give --pipeline a full",
    ),
    "T5 left out": (
        lambda d: _edit_json(f"{d}/model_index.json", text_encoder_3=[None, None]),
        r"model_index\.json has no text_encoder_3 \(it lists text_encoder_3: \[None, None\]\)",
    ),
    "no tokenizer": (
        lambda d: shutil.rmtree(f"{d}/tokenizer_3"),
        r"/tokenizer_3 does not exist",
    ),
    "not a pipeline": (
        lambda d: os.remove(f"{d}/model_index.json"),
        r"model_index\.json does not exist: not a diffusers pipeline folder",
    ),
    "T5 width": (
        lambda d: _edit_json(f"{d}/transformer/config.json", joint_attention_dim=24),
        r"do not fit its transformer: text_encoder_3 \(T5\) has d_model=16 but "
        r".*transformer/config\.json has joint_attention_dim=24",
    ),
    "pooled width": (
        lambda d: _edit_json(f"{d}/transformer/config.json", pooled_projection_dim=12),
        r"the CLIPs' projection widths 8 \+ 8 = 16 != pooled_projection_dim=12",
    ),
    "CLIP wider than T5": (
        lambda d: _edit_json(f"{d}/text_encoder_2/config.json", hidden_size=12),
        r"the CLIPs' hidden widths 8 \+ 12 = 20 exceed joint_attention_dim=16",
    ),
    "VAE channels": (
        lambda d: _edit_json(f"{d}/vae/config.json", latent_channels=16),
        r"the VAE has latent_channels=16 but the transformer in_channels=4",
    ),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_bad_pipeline_folder(case, pipeline_dir, image_dir, tmp_path, no_models):
    change, message = PIPELINE_CASES[case]
    bad = broken_pipeline(pipeline_dir, tmp_path / "pipe", change)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match=message):
        encode.encode_folder(
            bad, image_dir, f"{image_dir}/metadata.csv", str(data_dir), "x", options()
        )
    assert not data_dir.exists()


def _garbage(folder):
    with open(f"{folder}/square.png", "wb") as f:
        f.write(b"not an image")


def _truncated(folder):
    with open(f"{folder}/big.png", "rb") as f:
        head = f.read(200)
    with open(f"{folder}/big.png", "wb") as f:
        f.write(head)


def _csv(text):
    def write(folder):
        with open(f"{folder}/metadata.csv", "w") as f:
            f.write(text)

    return write


INPUT_CASES = {
    "missing image": (
        lambda d: os.remove(f"{d}/tall.png"),
        {},
        r"1 bad image\(s\); fix or drop their rows .*/tall\.png \(row 3\): no such file",
    ),
    "garbage image": (
        _garbage,
        {},
        r"/square\.png \(row 1\): unreadable \(UnidentifiedImageError",
    ),
    "truncated image": (_truncated, {}, r"/big\.png \(row 4\): unreadable \(OSError"),
    "image too small": (
        lambda d: None,
        {"resolution": 36},
        r"3 bad image\(s\).*lower --resolution.*/square\.png \(row 1\): 32x32 is smaller than "
        r"--resolution=36; .*/wide\.png \(row 2\): 48x32 .*; .*/odd\.png \(row 5\): 33x35",
    ),
    "empty prompt": (
        _csv('image,prompt\nsquare.png,a red circle\nwide.png,"  "\n'),
        {},
        r"metadata\.csv: 1 row\(s\) without an image path or a prompt; write a caption in every "
        r"row's prompt column \(or drop the rows\): row 2 \(wide\.png\): empty prompt",
    ),
    "no prompt column": (
        _csv("image,caption\nsquare.png,a red circle\n"),
        {},
        r"metadata\.csv has no 'prompt' column \(it has \['image', 'caption'\]\): the header "
        r"must name the columns image,prompt",
    ),
    "no rows": (_csv("image,prompt\n"), {}, r"metadata\.csv has a header but no rows"),
    "no csv": (
        lambda d: os.remove(f"{d}/metadata.csv"),
        {},
        r"No metadata CSV .*metadata\.csv: write one with the columns image,prompt",
    ),
    "resolution": (
        lambda d: None,
        {"resolution": 30},
        r"--resolution=30 must be a positive multiple of 4 \(the VAE's 2 pixels per latent x "
        r"the transformer's patch_size 2\); use e.g. 28 or 32",
    ),
    "eval rows": (
        lambda d: None,
        {"eval_rows": 5},
        r"--eval_rows=5 must be in \[0, 5\) \(.*metadata\.csv has 5 rows",
    ),
    "sequence length": (
        lambda d: None,
        {"max_sequence_length": 600},
        r"--max_sequence_length=600 must be in \[1, 512\]",
    ),
    "bad split": (
        _csv("image,prompt,split\nsquare.png,a,train\nwide.png,b,test\n"),
        {},
        r"metadata\.csv: split must be train or validation \(row 2: 'test'\)",
    ),
}


@pytest.mark.parametrize("case", INPUT_CASES)
def test_bad_input(case, pipeline_dir, tmp_path, no_models):
    change, overrides, message = INPUT_CASES[case]
    folder = write_images(str(tmp_path / "images"))
    change(folder)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match=message):
        encode.encode_folder(
            pipeline_dir, folder, f"{folder}/metadata.csv", str(data_dir), "x", options(**overrides)
        )
    assert not data_dir.exists()


def test_existing_dataset_and_bad_name(encoded, pipeline_dir, image_dir, no_models):
    data_dir, _ = encoded
    before = sorted(os.listdir(latents.dataset_dir(data_dir, "tiny")))
    csv_path = f"{image_dir}/metadata.csv"
    with pytest.raises(UserError, match=r"latents/tiny/1\.0\.0 exists; pass --overwrite"):
        encode.encode_folder(pipeline_dir, image_dir, csv_path, data_dir, "tiny", options())
    with pytest.raises(UserError, match=r"--name='9x': use letters, digits and '_'"):
        encode.encode_folder(pipeline_dir, image_dir, csv_path, data_dir, "9x", options())
    assert sorted(os.listdir(latents.dataset_dir(data_dir, "tiny"))) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU")
def test_cuda_without_a_gpu(pipeline_dir, image_dir, tmp_path, no_models):
    with pytest.raises(UserError, match=r"--device=cuda but torch .* sees no GPU"):
        encode.encode_folder(
            pipeline_dir,
            image_dir,
            f"{image_dir}/metadata.csv",
            str(tmp_path / "data"),
            "x",
            options(device="cuda"),
        )
    assert not (tmp_path / "data").exists()


DECODE_CASES = {
    "no file": (None, r"--samples .*nope\.npz does not exist"),
    "no latents": ({"labels": np.zeros(3)}, r"holds neither 'latents' nor 'images' \(it has"),
    "channels": (
        {"images": np.zeros((2, 8, 8, 1), np.float32)},
        r"latents have 1 channels \(shape \(2, 8, 8, 1\)\) but .*/vae decodes 4",
    ),
    "video": (
        {"latents": np.zeros((2, 3, 8, 8, 4), np.float32)},
        r"latents has shape \(2, 3, 8, 8, 4\); decode\.py takes image latents",
    ),
    "nan": (
        {"latents": np.full((1, 8, 8, 4), np.nan, np.float32)},
        r"latents has 256 NaN/Inf value\(s\): the run that sampled them diverged",
    ),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_bad_input(case, pipeline_dir, tmp_path, no_models):
    arrays, message = DECODE_CASES[case]
    path = tmp_path / "nope.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        decode.decode_samples(pipeline_dir, str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_decode_needs_only_the_vae(pipeline_dir, tmp_path, no_models):
    bad = broken_pipeline(pipeline_dir, tmp_path / "pipe", lambda d: shutil.rmtree(f"{d}/vae"))
    np.savez(tmp_path / "s.npz", images=np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(UserError, match=r"/vae does not exist"):
        decode.decode_samples(bad, str(tmp_path / "s.npz"), str(tmp_path / "out"))
    # No text encoders, no transformer: decoding still reads the folder.
    vae_only = broken_pipeline(
        pipeline_dir,
        tmp_path / "vae_only",
        lambda d: [shutil.rmtree(f"{d}/{c}") for c in ("text_encoder", "transformer")],
    )
    assert sd3.read_pipeline(vae_only, text=False).latent_channels == 4


# ------------------------------------------------------------------- the scripts
def launch(script, *args):
    cmd = [sys.executable, os.path.join(REPO, "launch", script), *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_scripts_contract(pipeline_dir, image_dir, encoded, tmp_path):
    """The command lines the docs give, as a user types them."""
    data_dir = tmp_path / "data"
    out = launch(
        "encode.py",
        "--pipeline", pipeline_dir,
        "--images", image_dir,
        "--metadata", f"{image_dir}/metadata.csv",
        "--data_dir", data_dir,
        "--name", "cli",
        "--resolution", R,
        "--negative_prompt", "",
        "--eval_rows", 2,
        "--max_sequence_length", MAX_LEN,
        "--device", "cpu",
        "--batch_size", 3,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Wrote 5 examples {'train': 3, 'validation': 2}" in out.stdout
    assert "captions: 100%" in out.stderr and "images: 100%" in out.stderr
    # The same rows as the in-process run with other batches.
    for (a, ia, ca), (b, ib, cb) in zip(
        dataset_rows(encoded[0]), dataset_rows(str(data_dir), "cli"), strict=True
    ):
        assert (ia, ca) == (ib, cb)
        for k in latents.FIELDS:
            np.testing.assert_allclose(a[k], b[k], atol=TOL)
    records = latents.LatentRecords(str(data_dir), "cli", "validation")
    samples = tmp_path / "samples.npz"  # as launch/sample.py writes them
    np.savez(samples, images=records.rows(2)["latent"], labels=np.zeros(2, np.int32))
    out = launch("decode.py", "--pipeline", pipeline_dir, "--samples", samples, "--out", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Wrote 2 images and {tmp_path}/grid.png" in out.stdout
    assert Image.open(tmp_path / "00001.png").size == (R, R)

    # A bad input: one line naming the file and the fix, status 2, nothing written.
    bad = write_images(str(tmp_path / "bad"), IMAGES[:1])
    with open(f"{bad}/metadata.csv", "a") as f:
        f.write("missing.png,a photo\n")
    out = launch(
        "encode.py", "--pipeline", pipeline_dir, "--images", bad, "--data_dir",
        tmp_path / "bad_data", "--name", "bad", "--resolution", R,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "error: 1 bad image(s); fix or drop their rows from the metadata CSV" in out.stderr
    assert f"{bad}/missing.png (row 2): no such file" in out.stderr
    assert not (tmp_path / "bad_data").exists()
