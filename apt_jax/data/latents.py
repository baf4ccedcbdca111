"""Real-scale data: precomputed latents and text embeddings, packed by a tfds builder.

Users encode their images / videos with the VAE and their captions with the
text encoders elsewhere, once, and keep the results as files. This module
checks those files, packs them into a tfds dataset in ArrayRecord format (no
TensorFlow needed) and reads it back, random-access, with `tfds.data_source`
for grain.

Input (what `launch/prepare_latents.py` reads): a folder and a metadata CSV
with one row per example and the columns

    caption   the text (kept in the dataset; never sent to the device)
    latent    path, relative to the folder, of the latent: `(H, W, C)` image or
              `(F, H, W, C)` video, channels-last, already scaled the way the
              model expects (SD3: `(vae(x) - shift_factor) * scaling_factor`)
    context   path of the context tokens `(L, joint_attention_dim)`
    pooled    path of the pooled vector `(pooled_projection_dim,)`
    file      instead of the three above: one `.safetensors` holding tensors
              named `latent`, `context` and `pooled`
    id        optional; default the latent file's stem
    split     optional, `train` or `validation`; default: the last
              `eval_rows` rows are `validation`, the others `train`

A path is a `.npy` file (the array) or a `.safetensors` file (the tensor named
like the column, or its only tensor), any float dtype (bfloat16 included).
Every example must have the same shapes.

Output: `<data_dir>/latents/<name>/1.0.0/`, features

    latent   float32 (or float16) Tensor, the latent shape
    context  Tensor `(L, joint_attention_dim)`
    pooled   Tensor `(pooled_projection_dim,)`
    caption  Text (bytes when read back)
    id       Text

with splits `train` and (when any row is held out) `validation`, in CSV order,
and beside them `negative.npz`: the negative prompt's `context` and `pooled`
(the encoded empty prompt by default, as `StableDiffusion3Pipeline` guides
with), and the `prompt` text. Classifier-free guidance in sampling, evaluation
and distillation targets guides against it; a dataset without it falls back to
zeros, with a warning.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from apt_jax.errors import UserError

BUILDER_NAME = "latents"
VERSION = "1.0.0"
FIELDS = ("latent", "context", "pooled")
NEGATIVE_FILE = "negative.npz"
# The ranks each field may have: latents are images (H, W, C) or videos (F, H, W, C).
FIELD_RANKS = {"latent": (3, 4), "context": (2,), "pooled": (1,)}
SPLITS = ("train", "validation")
STORAGE_DTYPES = ("float32", "float16")
# How many bad files a validation error lists.
_MAX_LISTED = 20


# ------------------------------------------------------------ input rows
@dataclasses.dataclass(frozen=True)
class Row:
    """One example of the metadata CSV: where its three arrays live."""

    index: int  # 0-based data row of the CSV
    id: str
    caption: str
    split: str
    paths: dict[str, str]  # field -> absolute file path


def read_metadata(src_dir: str, metadata_csv: str, eval_rows: int = 0) -> list[Row]:
    """Parses the metadata CSV (see the module docstring) into `Row`s.

    Raises:
      ValueError: missing columns, a bad `split` value, or `eval_rows` with a
        `split` column or not smaller than the row count.
    """
    with open(metadata_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        records = list(reader)
    if "caption" not in columns:
        raise UserError(f"{metadata_csv} has no 'caption' column (columns: {sorted(columns)}).")
    per_field = all(k in columns for k in FIELDS)
    if not per_field and "file" not in columns:
        raise UserError(
            f"{metadata_csv} needs the columns 'latent', 'context' and 'pooled' (a file each) "
            f"or a 'file' column (one .safetensors holding all three); it has {sorted(columns)}."
        )
    if not records:
        raise UserError(f"{metadata_csv} has no rows.")
    if "split" in columns and eval_rows:
        raise UserError(f"{metadata_csv} has a 'split' column; do not also pass eval_rows.")
    if eval_rows < 0 or eval_rows >= len(records):
        raise UserError(
            f"eval_rows={eval_rows} must be in [0, {len(records)}) (the CSV has "
            f"{len(records)} rows and training needs at least one)."
        )
    rows = []
    for i, r in enumerate(records):
        paths = {
            k: (r.get(k) or "").strip() if per_field else (r.get("file") or "").strip()
            for k in FIELDS
        }
        paths = {k: os.path.join(src_dir, p) if p else "" for k, p in paths.items()}
        if "split" in columns:
            split = (r.get("split") or "").strip()
            if split not in SPLITS:
                raise UserError(
                    f"{metadata_csv} row {i + 1}: split={split!r}; use one of {SPLITS}."
                )
        else:
            split = "validation" if i >= len(records) - eval_rows else "train"
        ident = (r.get("id") or "").strip() or os.path.splitext(
            os.path.basename(paths["latent"] or f"row{i}")
        )[0]
        rows.append(Row(i, ident, r.get("caption") or "", split, paths))
    return rows


def load_array(path: str, field: str) -> np.ndarray:
    """The array of `field` in `path` (`.npy`, or `.safetensors`: the tensor named
    `field`, or its only tensor).

    Raises:
      ValueError: a missing file, a missing tensor, or an unknown file type.
    """
    if not path:
        raise UserError(f"no {field} file given")
    if not os.path.isfile(path):
        raise UserError(f"{field} file {path} does not exist")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            if field in keys:
                return f.get_tensor(field)
            if len(keys) == 1 and not set(keys) & set(FIELDS):
                return f.get_tensor(keys[0])
        raise UserError(f"{path} holds no tensor named {field!r} (it has {keys})")
    raise UserError(f"{path}: unknown file type; use .npy or .safetensors")


def _row_arrays(row: Row) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays, problems = {}, []
    for field in FIELDS:
        try:
            arrays[field] = load_array(row.paths[field], field)
        except Exception as e:  # any unreadable file is reported, not raised one by one
            problems.append(f"missing or unreadable {field}: {e}")
    return arrays, problems


def _is_float(dtype) -> bool:
    """numpy floats and ml_dtypes' (bfloat16: safetensors gives those too)."""
    import ml_dtypes

    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The per-example shapes every row must have."""

    latent: tuple[int, ...]
    context: tuple[int, int]
    pooled: tuple[int]

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"latent": self.latent, "context": self.context, "pooled": self.pooled}


def validate_rows(rows: Sequence[Row], shapes: Shapes | None = None) -> Shapes:
    """Reads every row and checks it: files present, shapes equal, values finite.

    Args:
      rows: from `read_metadata`.
      shapes: the expected shapes; None takes them from the first readable row.

    Returns:
      The shapes of the examples.

    Raises:
      ValueError: listing every bad row by its file name and what is wrong
        (missing file or embedding, wrong rank or shape, NaN / Inf, non-float).
    """
    problems: list[str] = []
    expected = shapes.as_dict() if shapes is not None else None
    for row in rows:
        arrays, row_problems = _row_arrays(row)
        for field, a in arrays.items():
            if a.ndim not in FIELD_RANKS[field]:
                ranks = " or ".join(map(str, FIELD_RANKS[field]))
                row_problems.append(f"{field} has shape {a.shape}; want rank {ranks}")
            elif not _is_float(a.dtype):
                row_problems.append(f"{field} has dtype {a.dtype}; want a float array")
            elif not np.all(np.isfinite(a)):
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                row_problems.append(f"{field} has {bad} NaN/Inf value(s)")
        if expected is None and not row_problems:
            expected = {k: tuple(a.shape) for k, a in arrays.items()}
        if expected is not None:
            for field, a in arrays.items():
                if a.ndim in FIELD_RANKS[field] and tuple(a.shape) != expected[field]:
                    row_problems.append(
                        f"{field} has shape {tuple(a.shape)}; the other rows have {expected[field]}"
                    )
        name = os.path.basename(row.paths["latent"]) or f"row {row.index + 1}"
        problems += [f"{name} (CSV row {row.index + 1}, id {row.id!r}): {p}" for p in row_problems]
    if problems:
        shown = "\n  ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        raise UserError(
            f"{len(problems)} problem(s) in the latent files; fix or drop these rows:\n  {shown}"
            + (f"\n  ... ({more} more)" if more > 0 else "")
        )
    if expected is None:
        raise UserError("No rows to validate.")
    return Shapes(expected["latent"], expected["context"], expected["pooled"])


# ------------------------------------------------------------- the builder
def _builder_class():
    """The tfds builder class (tfds is imported lazily: digits runs never need it)."""
    import tensorflow_datasets as tfds

    # skip_registration: read back from its files by name, never from a
    # registered class (the class needs the user's rows to exist).
    class Latents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Precomputed latents + text embeddings + captions (module docstring)."""

        VERSION = tfds.core.Version(VERSION)
        # No source folder with checksums or metadata files: tfds would look
        # for one next to this module (and needs importlib_resources to).
        code_path = None

        def __init__(self, *, rows=(), shapes: Shapes, dtype: str = "float32", **kwargs):
            self._rows = list(rows)
            self._shapes = shapes
            self._dtype = np.dtype(dtype)
            super().__init__(file_format="array_record", **kwargs)

        def _info(self):
            tensor = lambda shape: tfds.features.Tensor(shape=shape, dtype=self._dtype)  # noqa: E731
            return tfds.core.DatasetInfo(
                builder=self,
                description="Precomputed latents with their text embeddings and captions.",
                # Keep CSV order: the first validation rows are the evaluation's grid.
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {
                        "latent": tensor(self._shapes.latent),
                        "context": tensor(self._shapes.context),
                        "pooled": tensor(self._shapes.pooled),
                        "caption": tfds.features.Text(),
                        "id": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                s: self._generate_examples([r for r in self._rows if r.split == s])
                for s in SPLITS
                if any(r.split == s for r in self._rows)
            }

        def _generate_examples(self, rows):
            for row in rows:
                arrays, problems = _row_arrays(row)
                if problems:  # changed on disk since validation
                    raise UserError(f"{row.paths['latent']}: {'; '.join(problems)}")
                example = {k: np.asarray(a, self._dtype) for k, a in arrays.items()}
                yield f"{row.index:09d}", {**example, "caption": row.caption, "id": row.id}

    return Latents


def dataset_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, BUILDER_NAME, name, VERSION)


def build_dataset(
    rows: Sequence[Row],
    data_dir: str,
    name: str,
    *,
    dtype: str = "float32",
    shapes: Shapes | None = None,
    overwrite: bool = False,
    negative: dict[str, np.ndarray] | None = None,
    negative_prompt: str = "",
) -> str:
    """Validates `rows` (every file, before writing anything) and packs them.

    Args:
      rows: from `read_metadata`.
      data_dir: tfds data dir; the dataset lands in `<data_dir>/latents/<name>/1.0.0`.
      name: the dataset's name (`config.data.dataset`).
      dtype: storage dtype, "float32" or "float16" (read back as float32).
      shapes: expected shapes; None takes them from the first row.
      overwrite: replace an existing dataset of that name.
      negative: the negative prompt's `{"context": (L, D), "pooled": (P,)}`
        (the rows' shapes), stored as `negative.npz`; None stores none.
      negative_prompt: its text, kept with it.

    Returns:
      The dataset's folder.

    Raises:
      ValueError: bad rows (every one listed by file name), a bad name or dtype.
      FileExistsError: the dataset exists and not `overwrite`.
    """
    import tensorflow_datasets as tfds

    if dtype not in STORAGE_DTYPES:
        raise UserError(f"dtype={dtype!r} must be one of {STORAGE_DTYPES}.")
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise UserError(f"Dataset name {name!r} must be letters, digits and '_', from a letter.")
    shapes = validate_rows(rows, shapes)
    if negative is not None:
        negative = check_negative(negative, shapes)
    out = dataset_dir(data_dir, name)
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(out)
    builder = _builder_class()(
        rows=rows,
        shapes=shapes,
        dtype=dtype,
        config=tfds.core.BuilderConfig(name=name, description=f"latents from {len(rows)} rows"),
        data_dir=data_dir,
    )
    builder.download_and_prepare()
    if negative is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **negative, prompt=np.array(negative_prompt))
        with open(os.path.join(out, NEGATIVE_FILE), "wb") as f:
            f.write(buffer.getvalue())
    return out


def check_negative(negative: dict[str, Any], shapes: Shapes) -> dict[str, np.ndarray]:
    """The negative embedding as float32 arrays of the rows' context / pooled shapes.

    Raises:
      ValueError: a field missing, of another shape, or not finite.
    """
    out, problems = {}, []
    for field in ("context", "pooled"):
        if field not in negative:
            problems.append(f"no {field!r}")
            continue
        a = np.asarray(negative[field], np.float32)
        want = getattr(shapes, field)
        if a.shape != tuple(want):
            problems.append(f"{field} has shape {a.shape}; the rows' is {tuple(want)}")
        elif not np.all(np.isfinite(a)):
            problems.append(f"{field} has NaN/Inf values")
        out[field] = a
    if problems:
        raise UserError(
            "The negative prompt's embedding does not fit the rows: "
            + "; ".join(problems)
            + ". Encode the negative prompt with the same text encoders (and "
            "max_sequence_length) as the captions."
        )
    return out


def read_negative(data_dir: str, name: str) -> dict[str, np.ndarray] | None:
    """`{"context": (L, D), "pooled": (P,)}` of the dataset's negative prompt, or
    None (with a warning) when it was built without one."""
    path = os.path.join(dataset_dir(data_dir, name), NEGATIVE_FILE)
    if not os.path.isfile(path):
        logging.warning(
            "The latents dataset %r has no negative prompt embedding (%s): CFG guides against "
            "zero context and pooled vectors, which is not how SD3 pipelines guide. Rebuild it "
            "with launch/encode.py, or prepare_latents.py --negative_context/--negative_pooled.",
            name,
            path,
        )
        return None
    with np.load(path) as f:
        return {
            "context": f["context"].astype(np.float32),
            "pooled": f["pooled"].astype(np.float32),
        }


# ------------------------------------------------------------- reading back
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a built dataset holds: shapes per example and rows per split."""

    shapes: Shapes
    splits: dict[str, int]


def read_spec(data_dir: str, name: str) -> DatasetSpec:
    """Shapes and split sizes of a built dataset, from its metadata alone.

    Raises:
      ValueError: no such dataset (the message says how to build it).
    """
    import tensorflow_datasets as tfds

    folder = dataset_dir(data_dir, name)
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        raise UserError(
            f"No latents dataset {name!r} under {data_dir!r} ({folder} has no "
            "dataset_info.json). Build it with `python launch/prepare_latents.py --src DIR "
            f"--metadata CSV --data_dir {data_dir} --name {name}`, or fix "
            "--config.data.data_dir / --config.data.dataset."
        )
    info = tfds.builder_from_directory(folder).info
    f = info.features
    shapes = Shapes(tuple(f["latent"].shape), tuple(f["context"].shape), tuple(f["pooled"].shape))
    return DatasetSpec(shapes, {k: v.num_examples for k, v in info.splits.items()})


class LatentRecords:
    """Random-access view of one split, as grain reads it: only the arrays.

    `records[i]` is `{"latent", "context", "pooled"}` as float32 numpy arrays;
    the caption and id stay behind (they are not sent to the device; see
    `text(i)`).
    """

    def __init__(self, data_dir: str, name: str, split: str = "train"):
        import tensorflow_datasets as tfds

        spec = read_spec(data_dir, name)
        if split not in spec.splits:
            raise UserError(
                f"The latents dataset {name!r} has no {split!r} split (it has "
                f"{sorted(spec.splits)}); hold out rows with prepare_latents.py --eval_rows N "
                "or a 'split' column, or set --config.data.eval_split=train."
            )
        self.spec = spec
        self.split = split
        self._source = tfds.data_source(f"{BUILDER_NAME}/{name}", data_dir=data_dir, split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        r = self._source[int(index)]
        return {k: np.asarray(r[k], np.float32) for k in FIELDS}

    def text(self, index: int) -> tuple[str, str]:
        """`(id, caption)` of example `index`."""
        r = self._source[int(index)]
        return _str(r["id"]), _str(r["caption"])

    def rows(self, count: int) -> dict[str, np.ndarray]:
        """The first `count` examples stacked: `{"latent": (count, ...), ...}`."""
        items = [self[i] for i in range(count)]
        return {k: np.stack([x[k] for x in items]) for k in FIELDS}


def _str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ------------------------------------------------------- model compatibility
def check_matches_model(spec: DatasetSpec, model: Any, where: str = "") -> None:
    """The dataset's shapes must fit the MMDiT `model` (an `MMDiTConfig`).

    Raises:
      ValueError: naming the config field and the dataset shape that disagree.
    """
    s = spec.shapes
    problems = []
    latent = s.latent
    video = len(latent) == 4
    if video and model.patch_size_t is None:
        problems.append(
            f"the latents are video {latent} but config.model.patch_size_t is None "
            "(set it, e.g. --config.model.patch_size_t=1)"
        )
    if latent[-1] != model.in_channels:
        problems.append(
            f"latent channels {latent[-1]} (latent shape {latent}) != config.model.in_channels="
            f"{model.in_channels}"
        )
    h, w = latent[-3], latent[-2]
    p = model.patch_size
    if h % p or w % p:
        problems.append(f"latent side {h}x{w} is not divisible by config.model.patch_size={p}")
    elif model.pos_embed_max_size is not None and max(h, w) // p > model.pos_embed_max_size:
        problems.append(
            f"latent side {h}x{w} is {max(h, w) // p} patches, past "
            f"config.model.pos_embed_max_size={model.pos_embed_max_size}"
        )
    if video and model.patch_size_t and latent[0] % model.patch_size_t:
        problems.append(
            f"{latent[0]} latent frames are not divisible by config.model.patch_size_t="
            f"{model.patch_size_t}"
        )
    if s.context[-1] != model.joint_attention_dim:
        problems.append(
            f"context width {s.context[-1]} (context shape {s.context}) != "
            f"config.model.joint_attention_dim={model.joint_attention_dim}"
        )
    if s.pooled[-1] != model.pooled_projection_dim:
        problems.append(
            f"pooled width {s.pooled[-1]} != config.model.pooled_projection_dim="
            f"{model.pooled_projection_dim}"
        )
    if problems:
        raise UserError(
            f"The latents dataset{where} does not fit the model: " + "; ".join(problems) + "."
        )


def latent_grid_images(latents: np.ndarray) -> np.ndarray:
    """A rough look at latents without the VAE: `(N, H, W, 3|1)` in [-1, 1].

    The first three channels (one if fewer than three), the first frame of a
    video, each image scaled by 3 standard deviations of its own values.
    """
    x = np.asarray(latents, np.float32)
    if x.ndim == 5:
        x = x[:, 0]
    x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
    scale = 3.0 * x.reshape(len(x), -1).std(axis=1) + 1e-6
    return np.clip(x / scale[:, None, None, None], -1.0, 1.0)


__all__ = [
    "Row",
    "Shapes",
    "DatasetSpec",
    "LatentRecords",
    "read_metadata",
    "load_array",
    "validate_rows",
    "build_dataset",
    "read_spec",
    "check_matches_model",
    "latent_grid_images",
    "dataset_dir",
]
