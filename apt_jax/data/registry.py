"""The datasets a run trains on: what each conditions on, its example shape, its source.

`config.data.name` picks one entry of `DATASETS`. The digits and moving digits
carry class labels (batches `{"image" | "video", "label"}`); a latents dataset
(`apt_jax.data.latents`, built by `launch/prepare_latents.py`) carries text
embeddings (batches `{"latent", "context", "pooled"}`). Recipes see a batch as
`(x, cond)` through `split_batch`, so one loss serves both.

Everything here but `make_source`, `iterator_factory` and `check_on_disk`
works from the config alone: `example_spec(config)` gives the shapes of a
batch without opening the dataset, which is what an ahead-of-time compile
(`Task.abstract_batch`) needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from apt_jax.data import digits, latents
from apt_jax.data.moving_digits import MovingDigitsSource
from apt_jax.data.pipeline import make_train_iterator
from apt_jax.errors import UserError
from apt_jax.models import MMDiTConfig


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One entry of the registry.

    Attributes:
      conditioning: "class" (labels) or "text" (context and pooled embeddings).
      x_key: the batch field holding the samples.
    """

    conditioning: str
    x_key: str


DATASETS = {
    "digits": Dataset(conditioning="class", x_key="image"),
    "moving_digits": Dataset(conditioning="class", x_key="video"),
    "latents": Dataset(conditioning="text", x_key="latent"),
}


def dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The registry entry of `config.data.name`; a clear error for an unknown name."""
    name = config.data.name
    if name not in DATASETS:
        raise UserError(f"config.data.name={name!r} is unknown; use one of {sorted(DATASETS)}.")
    return DATASETS[name]


def conditioning(config: ml_collections.ConfigDict) -> str:
    """ "class" or "text", from `config.data.name`."""
    return dataset(config).conditioning


# ---------------------------------------------------------------- config keys
def latents_data_config() -> ml_collections.ConfigDict:
    """`config.data` of a text-conditioned run on a dataset `launch/prepare_latents.py`
    built: pass `--config.data.data_dir=DIR --config.data.dataset=NAME`.

    `latent_size`, `latent_frames` (0: image latents) and `context_length`
    (0: read from the dataset's metadata) fix the batch shapes without the
    dataset, for an ahead-of-time compile of the step (`launch/compile.py`);
    with the dataset on disk they must match it.
    """
    return ml_collections.ConfigDict(
        dict(
            name="latents",
            data_dir="",
            dataset="",
            eval_split="validation",  # or "train" when no rows are held out
            latent_size=0,
            latent_frames=0,
            context_length=0,
            worker_count=0,
            shuffle=True,
        )
    )


def moving_digits_data_config(num_frames: int = 4) -> ml_collections.ConfigDict:
    """`config.data` of a run on `apt_jax.data.moving_digits` clips; `num_frames=1`
    is the image stage (digits at random positions, as one-frame videos)."""
    return ml_collections.ConfigDict(
        dict(
            name="moving_digits",
            num_frames=num_frames,
            canvas=12,
            max_speed=2,
            num_clips=16384,
            seed=0,  # the set's own seed (config.seed drives the shuffle and noise)
            worker_count=0,
            shuffle=True,
        )
    )


def validate_keys(config: ml_collections.ConfigDict, model: MMDiTConfig) -> None:
    """`config.data` names a known dataset with the keys it needs and fits `model`
    where that can be told from the config alone (no files are read)."""
    data = config.data
    dataset(config)
    if data.name == "moving_digits":
        if not model.is_video:
            raise UserError(
                "config.data.name='moving_digits' gives (B, F, H, W, C) clips but config.model "
                "is image-only: set --config.model.patch_size_t=1 (or use a digits-video model)."
            )
        if data.num_frames % model.patch_size_t:
            raise UserError(
                f"config.data.num_frames={data.num_frames} is not a multiple of "
                f"config.model.patch_size_t={model.patch_size_t}; the image stage "
                "(num_frames=1) needs patch_size_t=1."
            )
        # Shapes, channels, patch divisibility and the position table, before tracing.
        model.check_inputs((1, data.num_frames, data.canvas, data.canvas, 1))
    if data.name == "latents":
        for key in ("data_dir", "dataset", "eval_split"):
            if not data.get(key):
                raise UserError(
                    f"config.data.{key} is empty: a latents run needs --config.data.data_dir=DIR "
                    "--config.data.dataset=NAME (built by launch/prepare_latents.py) and "
                    "config.data.eval_split (validation or train)."
                )


def check_on_disk(config: ml_collections.ConfigDict, model: MMDiTConfig) -> None:
    """A latents dataset must exist, hold the eval split, fit `model` and agree with
    `config.data.latent_size` / `latent_frames` / `context_length` where set (from its metadata,
    before anything compiles). The embedded datasets need nothing on disk."""
    if config.data.name != "latents":
        return
    data = config.data
    spec = latents.read_spec(data.data_dir, data.dataset)
    latents.check_matches_model(spec, model, f" {data.dataset!r}")
    for split in ("train", data.eval_split):
        if split not in spec.splits:
            raise UserError(
                f"The latents dataset {data.dataset!r} has no {split!r} split (it has "
                f"{sorted(spec.splits)}); hold out rows with prepare_latents.py --eval_rows N "
                "or a 'split' column, or set --config.data.eval_split=train."
            )
    video = len(spec.shapes.latent) == 4
    found_sizes = {
        "latent_size": spec.shapes.latent[-3],
        "latent_frames": spec.shapes.latent[0] if video else 0,
        "context_length": spec.shapes.context[0],
    }
    for key, found in found_sizes.items():
        # latent_frames = 0 is a claim (image latents) once latent_size is set.
        given = data.get("latent_size", 0) if key == "latent_frames" else data.get(key, 0)
        if given and data.get(key, 0) != found:
            raise UserError(
                f"config.data.{key}={data[key]} but the dataset {data.dataset!r} has {found}; "
                f"leave it at 0 (read from the dataset) or fix it."
            )


# --------------------------------------------------------------------- shapes
def example_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """`{field: (shape, dtype)}` of one training example, from the config alone
    (a latents dataset's metadata is read only when `config.data.latent_size` /
    `context_length` are 0)."""
    data, model = config.data, MMDiTConfig(**config.model.to_dict())
    if data.name == "digits":
        return {"image": (digits.IMAGE_SHAPE, np.float32), "label": ((), np.int32)}
    if data.name == "moving_digits":
        shape = (data.num_frames, data.canvas, data.canvas, 1)
        return {"video": (shape, np.float32), "label": ((), np.int32)}
    dataset(config)
    size, frames = data.get("latent_size", 0), data.get("latent_frames", 0)
    length = data.get("context_length", 0)
    if size and length:
        latent = ((frames,) if frames else ()) + (size, size, model.in_channels)
    else:
        shapes = latents.read_spec(data.data_dir, data.dataset).shapes
        latent, length = shapes.latent, shapes.context[0]
    return {
        "latent": (tuple(latent), np.float32),
        "context": ((length, model.joint_attention_dim), np.float32),
        "pooled": ((model.pooled_projection_dim,), np.float32),
    }


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one sample the generator makes: `(H, W, C)` or `(F, H, W, C)`."""
    shape, _ = example_spec(config)[dataset(config).x_key]
    return tuple(shape)


# ---------------------------------------------------------------- sources
def moving_digits_source(data: ml_collections.ConfigDict) -> MovingDigitsSource:
    """The clips `config.data` describes (`moving_digits_data_config`)."""
    return MovingDigitsSource(
        num_frames=data.num_frames,
        canvas=data.canvas,
        max_speed=data.max_speed,
        num_clips=data.num_clips,
        seed=data.seed,
    )


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    """The random-access data source of `config.data` (a latents `split` is opened)."""
    dataset(config)
    if config.data.name == "digits":
        return digits.DigitsSource()
    if config.data.name == "moving_digits":
        return moving_digits_source(config.data)
    return latents.LatentRecords(config.data.data_dir, config.data.dataset, split)


def iterator_factory(
    config: ml_collections.ConfigDict, open_source: Callable[[], Any] | None = None
) -> Callable:
    """`() -> grain iterator` of this process's training batches, from the source
    `open_source()` returns (default `make_source(config)`), opened only then."""

    def make():
        source = make_source(config) if open_source is None else open_source()
        return make_train_iterator(
            source,
            global_batch_size=config.batch_size,
            seed=config.seed,
            shuffle=config.data.get("shuffle", True),
            worker_count=config.data.worker_count,
        )

    return make


def negative_condition(config: ml_collections.ConfigDict) -> dict[str, np.ndarray] | None:
    """What CFG guides against besides the null condition: a latents dataset's
    negative prompt embedding `{"context": (L, D), "pooled": (P,)}` (None, with a
    warning, if it has none: zeros then); None for class-conditional data."""
    if conditioning(config) != "text":
        return None
    return _read_negative(config.data.data_dir, config.data.dataset)


@functools.lru_cache(maxsize=8)
def _read_negative(data_dir: str, name: str):
    # Once per dataset: evaluations ask every time, the warning should say it once.
    return latents.read_negative(data_dir, name)


def split_batch(batch: dict) -> tuple[jax.Array, Any]:
    """`(x, cond)` of a batch: `(image, label)`, `(video, label)`, or
    `(latent, {"context", "pooled"})`."""
    if "latent" in batch:
        return batch["latent"], {"context": batch["context"], "pooled": batch["pooled"]}
    if "video" in batch:
        return batch["video"], batch["label"]
    return batch["image"], batch["label"]
