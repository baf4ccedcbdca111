"""A folder of images and captions -> the latents dataset, with an SD3 pipeline's encoders.

`launch/encode.py` is this module's entry point. The input is DiffSynth's
layout: a folder of images and a `metadata.csv` with the columns `image` (a
path relative to the folder) and `prompt`. Each image is resized (bicubic) so
that its shorter side is `R` and centre-cropped to `R x R` (never upscaled);
`apt_jax.sd3.pipeline` says what the latents and embeddings are.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
from collections.abc import Sequence

import numpy as np

from apt_jax.data import latents
from apt_jax.errors import UserError
from apt_jax.sd3 import pipeline as sd3

# StableDiffusion3Pipeline.check_inputs refuses longer T5 sequences.
MAX_SEQUENCE_LENGTH = 512
# How many bad rows an error lists.
_MAX_LISTED = 20


# ---------------------------------------------------------------- the images
@dataclasses.dataclass(frozen=True)
class ImageRow:
    """One row of the images' metadata CSV."""

    index: int  # 0-based data row
    image: str  # absolute path
    prompt: str
    id: str
    split: str | None  # the CSV's split column, if it has one


def read_image_metadata(images_dir: str, metadata_csv: str) -> list[ImageRow]:
    """Parses DiffSynth's metadata CSV: columns `image` (a path relative to
    `images_dir`) and `prompt`; optional `id` (default: the image's path without
    its extension) and `split` (`train` / `validation`).

    Raises:
      UserError: no such file, a missing column, no rows, or rows with an
        empty image path or prompt (every such row listed).
    """
    if not os.path.isfile(metadata_csv):
        raise UserError(
            f"No metadata CSV {metadata_csv}: write one with the columns image,prompt "
            "(one row per image, paths relative to --images), or pass --metadata."
        )
    with open(metadata_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or ()]
        records = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    missing = [c for c in ("image", "prompt") if c not in columns]
    if missing:
        raise UserError(
            f"{metadata_csv} has no {' or '.join(repr(c) for c in missing)} column (it has "
            f"{columns}): the header must name the columns image,prompt."
        )
    if not records:
        raise UserError(f"{metadata_csv} has a header but no rows: add one row per image.")
    rows, problems = [], []
    for i, r in enumerate(records):
        image, prompt = (r.get("image") or "").strip(), (r.get("prompt") or "").strip()
        if not image:
            problems.append(f"row {i + 1}: empty image path")
        if not prompt:
            problems.append(f"row {i + 1} ({image or 'no image'}): empty prompt")
        ident = (r.get("id") or "").strip() or os.path.splitext(image)[0] or f"row{i}"
        split = (r.get("split") or "").strip() if "split" in columns else None
        rows.append(ImageRow(i, os.path.join(images_dir, image), prompt, ident, split))
    if problems:
        raise UserError(
            f"{metadata_csv}: {len(problems)} row(s) without an image path or a prompt; write "
            "a caption in every row's prompt column (or drop the rows): " + _listed(problems)
        )
    return rows


def _listed(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; ... ({more} more)" if more > 0 else "")


def _open_rgb(path: str):
    """The decoded image as RGB (EXIF rotation applied); raises on an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # decode every byte now: a truncated file fails here, not mid-run
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def check_images(rows: Sequence[ImageRow], resolution: int) -> None:
    """Opens and decodes every image: present, readable, shorter side >= `resolution`.

    Raises:
      UserError: listing every bad image by its file name and what is wrong.
    """
    problems = []
    for row in rows:
        name = f"{row.image} (row {row.index + 1})"
        if not os.path.isfile(row.image):
            problems.append(f"{name}: no such file")
            continue
        try:
            w, h = _open_rgb(row.image).size
        except Exception as e:  # noqa: BLE001 - Pillow raises many types; each is reported
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
            continue
        if min(w, h) < resolution:
            problems.append(f"{name}: {w}x{h} is smaller than --resolution={resolution}")
    if problems:
        raise UserError(
            f"{len(problems)} bad image(s); fix or drop their rows from the metadata CSV, or lower "
            "--resolution for small ones (images are never upscaled): " + _listed(problems)
        )


def load_image(path: str, resolution: int) -> np.ndarray:
    """The image resized (bicubic) so that its shorter side is `resolution`, then
    centre-cropped to `(resolution, resolution, 3)` uint8."""
    from PIL import Image

    img = _open_rgb(path)
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.uint8)


# ------------------------------------------------------ images -> the dataset
@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """Everything `encode_folder` takes besides the folders (the flags of launch/encode.py)."""

    resolution: int
    negative_prompt: str = ""
    eval_rows: int = 0
    max_sequence_length: int = 256
    device: str = "cpu"
    batch_size: int = 4
    dtype: str = "float32"  # storage dtype of the dataset
    torch_dtype: str = "float32"  # the networks' dtype
    overwrite: bool = False
    keep_encoded: bool = False


def _check_options(o: EncodeOptions, rows: Sequence[ImageRow], metadata_csv: str) -> None:
    problems = []
    if o.batch_size < 1:
        problems.append(f"--batch_size={o.batch_size} must be at least 1")
    if not 1 <= o.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        problems.append(
            f"--max_sequence_length={o.max_sequence_length} must be in [1, {MAX_SEQUENCE_LENGTH}] "
            "(T5's tokens; SD3 pipelines use 256 by default)"
        )
    if o.dtype not in ("float32", "float16"):
        problems.append(f"--dtype={o.dtype!r} must be float32 or float16")
    if o.torch_dtype not in sd3.TORCH_DTYPES:
        problems.append(f"--torch_dtype={o.torch_dtype!r} must be one of {sd3.TORCH_DTYPES}")
    if rows[0].split is not None:
        bad = [f"row {r.index + 1}: {r.split!r}" for r in rows if r.split not in latents.SPLITS]
        if bad:
            problems.append(f"{metadata_csv}: split must be train or validation ({_listed(bad)})")
        if o.eval_rows:
            problems.append(f"{metadata_csv} has a split column; do not also pass --eval_rows")
    if not 0 <= o.eval_rows < len(rows):
        problems.append(
            f"--eval_rows={o.eval_rows} must be in [0, {len(rows)}) ({metadata_csv} has "
            f"{len(rows)} rows and training needs at least one)"
        )
    if problems:
        raise UserError("; ".join(problems) + ".")


def encoded_dir(data_dir: str, name: str) -> str:
    """Where `encode_folder` stages the per-row arrays: `<data_dir>/encoded/<name>`."""
    return os.path.join(data_dir, "encoded", name)


def encode_folder(
    pipeline: str,
    images_dir: str,
    metadata_csv: str,
    data_dir: str,
    name: str,
    options: EncodeOptions,
) -> str:
    """Images and captions -> the latents dataset `<data_dir>/latents/<name>` (see
    `apt_jax.data.latents`), with the pipeline's VAE and text encoders.

    Order: every check (pipeline configs, the CSV, every image decoded, the
    flags, the output names) before a network is loaded; then the captions
    with the three text encoders (the negative prompt once), then the images
    with the VAE, each in batches with a progress bar and only its own
    networks in memory; then `prepare_latents.py`'s path: `read_metadata` and
    `build_dataset` over the per-row `.npy` files staged under
    `encoded_dir(data_dir, name)`. That folder also holds
    `negative_context.npy` `(L, D)` and `negative_pooled.npy` `(P,)`; it is
    removed after the build unless `options.keep_encoded`, and on any error.

    Returns:
      The dataset's folder.

    Raises:
      UserError: a bad input (the message names the file and the fix); nothing
        is written then.
    """
    o = options
    spec = sd3.read_pipeline(pipeline, text=True)
    sd3.check_resolution(spec, o.resolution)
    rows = read_image_metadata(images_dir, metadata_csv)
    _check_options(o, rows, metadata_csv)
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
        # build_dataset's rule, checked before hours of encoding rather than after.
        raise UserError(f"--name={name!r}: use letters, digits and '_', starting with a letter.")
    out, stage = latents.dataset_dir(data_dir, name), encoded_dir(data_dir, name)
    for folder in (out, stage):
        if os.path.exists(folder) and not o.overwrite:
            raise UserError(f"{folder} exists; pass --overwrite to replace it, or another --name.")
    check_images(rows, o.resolution)
    device = sd3.torch_device(o.device)
    dtype = sd3.torch_dtype(o.torch_dtype)

    partial = stage + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "rows"))
    try:
        table = _stage_metadata(partial, rows)
        staged = latents.read_metadata(partial, table, eval_rows=o.eval_rows)
        negative = _encode_captions(pipeline, rows, partial, o, device, dtype)
        _encode_images(pipeline, rows, partial, o, device, dtype)
        result = latents.build_dataset(
            staged,
            data_dir,
            name,
            dtype=o.dtype,
            overwrite=o.overwrite,
            negative=negative,
            negative_prompt=o.negative_prompt,
        )
    except BaseException:
        _remove(partial)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    if o.keep_encoded:  # the staged CSV's paths are relative: the folder moves whole
        os.replace(partial, stage)
    else:
        _remove(partial)
    return result


def _remove(partial: str) -> None:
    """Removes the staging folder, and `<data_dir>/encoded/` if that leaves it empty."""
    shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: other datasets' kept arrays
        os.rmdir(os.path.dirname(partial))


def _row_file(folder: str, row: ImageRow, field: str) -> str:
    return os.path.join(folder, "rows", f"{row.index:07d}_{field}.npy")


def _stage_metadata(folder: str, rows: Sequence[ImageRow]) -> str:
    """prepare_latents.py's CSV for the staged rows (paths relative to `folder`)."""
    path = os.path.join(folder, "metadata.csv")
    split = rows[0].split is not None
    with open(path, "w", newline="", encoding="utf-8") as f:
        columns = ["caption", *latents.FIELDS, "id"] + (["split"] if split else [])
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            record = {"caption": row.prompt, "id": row.id}
            record |= {
                k: os.path.relpath(_row_file(folder, row, k), folder) for k in latents.FIELDS
            }
            if split:
                record["split"] = row.split
            writer.writerow(record)
    return path


def _save(path: str, array: np.ndarray, o: EncodeOptions, source: str) -> None:
    """Writes `array` in the storage dtype; a NaN / Inf (a float16 overflow) stops the run."""
    array = np.asarray(array, dtype=o.dtype)
    if not np.all(np.isfinite(array)):
        raise UserError(
            f"Encoding {source} gave NaN/Inf values (with --torch_dtype={o.torch_dtype}, "
            f"--dtype={o.dtype}): use --torch_dtype float32 (or bfloat16) and --dtype float32."
        )
    np.save(path, array, allow_pickle=False)


def _encode_captions(
    pipeline: str, rows: Sequence[ImageRow], folder: str, o: EncodeOptions, device, dtype
) -> dict[str, np.ndarray]:
    """Every row's context / pooled, and the negative prompt's (returned, and saved
    as negative_context.npy / negative_pooled.npy)."""
    from tqdm import tqdm

    pipe = sd3.load_text_encoders(pipeline, device, dtype)
    context, pooled = sd3.encode_prompts(pipe, [o.negative_prompt], o.max_sequence_length, device)
    negative = {"context": context[0], "pooled": pooled[0]}
    source = f"the negative prompt {o.negative_prompt!r}"
    _save(os.path.join(folder, "negative_context.npy"), context[0], o, source)
    _save(os.path.join(folder, "negative_pooled.npy"), pooled[0], o, source)
    with tqdm(total=len(rows), desc="captions", unit="row") as bar:
        for s in sd3.batches(len(rows), o.batch_size):
            batch = rows[s]
            context, pooled = sd3.encode_prompts(
                pipe, [r.prompt for r in batch], o.max_sequence_length, device
            )
            for row, c, p in zip(batch, context, pooled, strict=True):
                _save(_row_file(folder, row, "context"), c, o, f"the prompt of row {row.index + 1}")
                _save(_row_file(folder, row, "pooled"), p, o, f"the prompt of row {row.index + 1}")
            bar.update(len(batch))
    del pipe
    sd3.free_memory(device)
    return negative


def _encode_images(
    pipeline: str, rows: Sequence[ImageRow], folder: str, o: EncodeOptions, device, dtype
) -> None:
    from tqdm import tqdm

    vae = sd3.load_vae(pipeline, device, dtype)
    with tqdm(total=len(rows), desc="images", unit="img") as bar:
        for s in sd3.batches(len(rows), o.batch_size):
            batch = rows[s]
            pixels = np.stack([load_image(r.image, o.resolution) for r in batch])
            for row, z in zip(batch, sd3.encode_images(vae, pixels, device), strict=True):
                _save(_row_file(folder, row, "latent"), z, o, row.image)
            bar.update(len(batch))
    del vae
    sd3.free_memory(device)
