"""Pieces every recipe shares: the sharded state init, the jitted step, data,
starting from a converted checkpoint (`config.init_from`), and sampling /
evaluation of the generator.

Conditioning follows from the data (`config.data.name`): the digits carry
class labels (`ClassConditionalMMDiT`, batches `{"image", "label"}`), a latents
dataset carries text embeddings (`TextConditionalMMDiT`, batches `{"latent",
"context", "pooled"}`). Recipes see a batch as `(x, cond)` through
`split_batch`, so one loss serves both.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apt_jax import sampling
from apt_jax.data import digits
from apt_jax.data.moving_digits import MovingDigitsSource
from apt_jax.data.pipeline import make_train_iterator
from apt_jax.models import ClassConditionalMMDiT, TextConditionalMMDiT
from apt_jax.models.partitioning import logical_shardings, unbox
from apt_jax.objectives.sft import drop_labels, flow_matching_loss
from apt_jax.paths import as_path
from apt_jax.train import sharding
from apt_jax.train.config import mmdit_config


@dataclasses.dataclass
class Task:
    """What the training loop needs from a recipe.

    Attributes:
      config: the run's ConfigDict.
      mesh: the device mesh.
      init_state: `rng -> state`, jitted, creating the state already sharded.
      abstract_state: `jax.ShapeDtypeStruct` tree with the state's shardings
        (checkpoint restore target).
      train_step: `(state, batch, rng) -> (state, metrics)`, jitted once with
        explicit shardings and the state donated.
      make_iterator: `() -> grain iterator` of this process's batches.
      evaluate: `(state, step, out_dir) -> metrics dict`; samples, writes a
        grid and returns scalar metrics.
      sample: `(state, num, steps, cfg_scale, seed) -> (images, labels)` with
        the generator the run serves (EMA weights where kept).
      served_params: `state -> params` of that generator (what later stages
        start from: distillation's teacher, APT's generator and discriminator).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    init_state: Callable
    abstract_state: Any
    train_step: Callable
    make_iterator: Callable
    evaluate: Callable
    sample: Callable
    served_params: Callable


def sharded_init(init_boxed: Callable, mesh: Mesh, rules) -> tuple[Callable, Any, Any]:
    """Jits `init_boxed` so the state is created directly in its shardings.

    Args:
      init_boxed: `rng -> state` whose parameter leaves are logically boxed.

    Returns:
      (init_fn, abstract_state, shardings): `init_fn(rng)` returns the unboxed,
      sharded state; `abstract_state` holds ShapeDtypeStructs with shardings.
    """
    abstract, shardings = abstract_state(init_boxed, mesh, rules)
    init_fn = jax.jit(lambda r: unbox(init_boxed(r)), out_shardings=shardings)
    return init_fn, abstract, shardings


def abstract_state(init_boxed: Callable, mesh: Mesh, rules) -> tuple[Any, Any]:
    """`(ShapeDtypeStructs with shardings, NamedShardings)` of `unbox(init_boxed(rng))`,
    from shapes alone (nothing is computed)."""
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )
    return abstract, shardings


# ---------------------------------------------------------- source runs
def run_config(workdir: str, key: str = "teacher_workdir") -> ml_collections.ConfigDict:
    """The stored config of the run in `workdir`, named by `config.<key>`; errors say how to fix."""
    from apt_jax.train.checkpoint import read_config

    if not workdir:
        raise ValueError(f"config.{key} is empty: pass --config.{key}=DIR.")
    if not (as_path(workdir) / "checkpoints").is_dir():
        raise ValueError(
            f"config.{key}={workdir!r} holds no checkpoints; train that run first "
            "(see the README's recipes) or fix the path."
        )
    return ml_collections.ConfigDict(read_config(workdir))


def check_same_model(config, source_config, what: str = "teacher") -> None:
    """`config`'s model must have the architecture of the run it starts from (`what`:
    "teacher", "generator"), whose stored config is `source_config`."""
    fields = ("model", "num_classes", "context_tokens")
    diffs = []
    for f in fields:
        a, b = config.get(f), source_config.get(f)
        a = a.to_dict() if hasattr(a, "to_dict") else a
        b = b.to_dict() if hasattr(b, "to_dict") else b
        if isinstance(a, dict):
            shape_keys = [
                k
                for k in a
                if k not in ("scan_layers", "remat_policy", "attention_implementation", "dtype")
            ]
            diffs += [
                f"{f}.{k}: {b.get(k)!r} ({what}) vs {a[k]!r}"
                for k in shape_keys
                if _norm(a[k]) != _norm(b.get(k))
            ]
        elif a != b:
            diffs.append(f"{f}: {b!r} ({what}) vs {a!r}")
    if diffs:
        raise ValueError(
            f"The {what} run holds a model of another shape than config.model: "
            + "; ".join(diffs[:10])
            + f". Set the student's config to the {what}'s (e.g. --config.model.num_layers=...)."
        )


def init_from_run(
    workdir: str, make_state: Callable, gen: ClassConditionalMMDiT, mesh: Mesh, rules, shardings
) -> Callable:
    """`init_state` whose state is `make_state(params)` of the served params of `workdir`'s run.

    `shardings` are the state's; the params arrive in the generator's shardings.
    """
    boxed = jax.eval_shape(gen.init_boxed, jax.random.key(0))
    assemble = jax.jit(
        make_state, in_shardings=(logical_shardings(boxed, mesh, rules),), out_shardings=shardings
    )

    def init_state(rng):
        del rng  # the weights come from the run
        from apt_jax.tasks.runs import load_run

        task, state, _ = load_run(workdir, mesh=mesh)
        return assemble(task.served_params(state))

    return init_state


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """`jax.jit` with explicit in/out shardings: batch over (data, fsdp), state donated."""
    repl = sharding.replicated(mesh)
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )


# ------------------------------------------------------- data and conditioning
# What each dataset conditions on.
DATA_CONDITIONING = {"digits": "class", "moving_digits": "class", "latents": "text"}

Generator = ClassConditionalMMDiT | TextConditionalMMDiT


def conditioning(config: ml_collections.ConfigDict) -> str:
    """ "class" or "text", from `config.data.name`."""
    if config.data.name not in DATA_CONDITIONING:
        raise ValueError(
            f"config.data.name={config.data.name!r} is unknown; use one of "
            f"{sorted(DATA_CONDITIONING)}."
        )
    return DATA_CONDITIONING[config.data.name]


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    """The data source named by `config.data.name` and its example shape."""
    if config.data.name == "digits":
        return digits.DigitsSource(), digits.IMAGE_SHAPE
    if config.data.name == "moving_digits":
        source = moving_digits_source(config.data)
        return source, source.video_shape
    if config.data.name == "latents":
        from apt_jax.data.latents import LatentRecords

        records = LatentRecords(config.data.data_dir, config.data.dataset, split)
        return records, records.spec.shapes.latent
    raise ValueError(
        f"config.data.name={config.data.name!r} is unknown; use one of {sorted(DATA_CONDITIONING)}."
    )


def moving_digits_source(data: ml_collections.ConfigDict) -> MovingDigitsSource:
    """The clips `config.data` describes (`train.config.moving_digits_data_config`)."""
    return MovingDigitsSource(
        num_frames=data.num_frames,
        canvas=data.canvas,
        max_speed=data.max_speed,
        num_clips=data.num_clips,
        seed=data.seed,
    )


def validate_data(config: ml_collections.ConfigDict) -> None:
    """A latents dataset must exist, hold the eval split and fit `config.model`
    (checked from its metadata, before anything compiles)."""
    if config.data.name != "latents":
        return
    from apt_jax.data import latents

    spec = latents.read_spec(config.data.data_dir, config.data.dataset)
    latents.check_matches_model(spec, mmdit_config(config), f" {config.data.dataset!r}")
    for split in ("train", config.data.eval_split):
        if split not in spec.splits:
            raise ValueError(
                f"The latents dataset {config.data.dataset!r} has no {split!r} split (it has "
                f"{sorted(spec.splits)}); hold out rows with prepare_latents.py --eval_rows N "
                "or a 'split' column, or set --config.data.eval_split=train."
            )


def split_batch(batch: dict) -> tuple[jax.Array, Any]:
    """`(x, cond)` of a batch: `(image, label)`, `(video, label)`, or
    `(latent, {"context", "pooled"})`."""
    if "latent" in batch:
        return batch["latent"], {"context": batch["context"], "pooled": batch["pooled"]}
    if "video" in batch:
        return batch["video"], batch["label"]
    return batch["image"], batch["label"]


def drop_condition(gen: Generator, cond: Any, rng: jax.Array, prob: float) -> Any:
    """CFG dropout: labels -> the null class; text -> zero context and pooled (SD3)."""
    if isinstance(gen, TextConditionalMMDiT):
        return gen.drop_condition(cond, rng, prob)
    return drop_labels(cond, rng, prob, gen.null_label)


def null_condition(gen: Generator, cond: Any) -> Any:
    """The unconditional input matching `cond` (CFG's negative)."""
    if isinstance(gen, TextConditionalMMDiT):
        return gen.null_condition(cond)
    return jnp.full_like(cond, gen.null_label)


def make_generator(config: ml_collections.ConfigDict) -> Generator:
    """The generator the data asks for (`conditioning(config)`)."""
    if conditioning(config) == "text":
        return TextConditionalMMDiT(mmdit_config(config))
    return class_conditional_generator(config)


# ------------------------------------------------- converted checkpoints
# MMDiTConfig fields that only say how the network runs or is stored; a
# checkpoint may differ in them (dtypes are cast on restore).
_EXECUTION_FIELDS = ("remat_policy", "attention_implementation", "dtype", "param_dtype")


def check_pretrained(config: ml_collections.ConfigDict, key: str = "init_from") -> None:
    """The converted checkpoint in `config.<key>` must hold `config.model`'s architecture.

    Reads the checkpoint's `mmdit_config.json` only (no arrays).

    Raises:
      ValueError: no checkpoint there, or the fields that differ, named.
    """
    from apt_jax.convert.params_checkpoint import read_config

    path = config.get(key)
    try:
        theirs = read_config(path).to_dict()
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"config.{key}={path!r}: {e}") from e
    mine = mmdit_config(config).to_dict()
    diffs = [
        f"config.model.{k}={mine[k]!r} but the checkpoint has {theirs.get(k)!r}"
        for k in mine
        if k not in _EXECUTION_FIELDS and _norm(mine[k]) != _norm(theirs.get(k))
    ]
    if diffs:
        raise ValueError(
            f"config.{key}={path!r} holds another architecture than config.model: "
            + "; ".join(diffs)
            + ". Pick the config variant of the checkpoint's model (configs/sd3_sft.py:"
            "sd3-medium, ...) or override the field; for scan_layers, convert again with "
            "or without `launch/convert.py --scan_layers`."
        )


def load_pretrained_mmdit(path: str, abstract_mmdit: Any, key: str = "init_from") -> Any:
    """The MMDiT params of a converted checkpoint, restored straight into the
    shardings and dtypes of `abstract_mmdit` (each host reads its shards only).

    Raises:
      ValueError: the saved tree does not fit (key paths and shapes listed).
    """
    from apt_jax.convert.params_checkpoint import load_params

    try:
        _, params = load_params(path, abstract_params=abstract_mmdit)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"config.{key}={path!r}: {e}") from e
    return params


def iterator_factory(config: ml_collections.ConfigDict) -> Callable:
    source, _ = make_source(config)
    return functools.partial(
        make_train_iterator,
        source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        shuffle=config.data.shuffle,
        worker_count=config.data.worker_count,
    )


def class_conditional_generator(config: ml_collections.ConfigDict) -> ClassConditionalMMDiT:
    return ClassConditionalMMDiT(mmdit_config(config), config.num_classes, config.context_tokens)


def sample_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels `i mod num_classes` (the sample.py contract)."""
    return (np.arange(num) % num_classes).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _sampler(gen: Generator, steps: int, cfg_scale: float, shift: float):
    sigmas = sampling.shifted_linear_sigmas(steps, shift)

    @jax.jit
    def run(params, noise, cond):
        uncond = null_condition(gen, cond) if cfg_scale != 1.0 else None
        return sampling.euler_sample(
            gen.velocity_fn(params), noise, sigmas, cond, uncond=uncond, cfg_scale=cfg_scale
        )

    return run


def generate(
    gen: Generator,
    params: Any,
    *,
    num: int,
    steps: int,
    cfg_scale: float,
    shift: float,
    seed: int,
    image_shape: tuple[int, ...],
    labels: np.ndarray | None = None,
    cond_rows: dict | None = None,
    chunk: int = 500,
    clip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Euler-samples `num` images with `steps` steps; 1 step is `z - v(z, 1)`.

    Class conditioning: `labels` (default `i mod num_classes`). Text
    conditioning: `cond_rows` `{"context": (R, L, D), "pooled": (R, P)}` and
    `labels` `(num,)` the row each sample takes its embeddings from (gathered
    a chunk at a time).

    Returns float32 images `(num, *image_shape)`, clipped to [-1, 1] with
    `clip` (latents are not: they are unbounded), and labels. The noise depends
    only on `seed` and `num` (not on `chunk`).
    """
    if labels is None:
        labels = sample_labels(num, gen.num_classes)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (num, *image_shape)))
    run = _sampler(gen, int(steps), float(cfg_scale), float(shift))
    out = []
    for i in range(0, num, chunk):
        rows = labels[i : i + chunk]
        cond = rows if cond_rows is None else {k: v[rows] for k, v in cond_rows.items()}
        out.append(np.asarray(run(params, noise[i : i + chunk], cond)))
    images = np.concatenate(out).astype(np.float32)
    return (np.clip(images, -1.0, 1.0) if clip else images), labels


def evaluate_digits_generator(
    gen: ClassConditionalMMDiT,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int,
    out_dir: str | None,
    *,
    steps: int | None = None,
    tag: str = "",
) -> dict:
    """Samples `config.eval.num_samples`, writes a PNG grid, returns FD and accuracy.

    Moving digits: per-frame distance, per-frame accuracy and the motion
    measures (`apt_jax.eval.video_metrics`), and the clips as PNG strips and a GIF.
    """
    from apt_jax.eval.grid import save_png_grid
    from apt_jax.eval.metrics import evaluate_digits

    if config.data.name == "moving_digits":
        return evaluate_video_generator(gen, params, config, step, out_dir, steps=steps, tag=tag)
    _, image_shape = make_source(config)
    steps = steps or config.eval.steps
    images, labels = generate(
        gen,
        params,
        num=config.eval.num_samples,
        steps=steps,
        cfg_scale=config.eval.cfg_scale,
        shift=config.eval.shift,
        seed=config.eval.seed,
        image_shape=image_shape,
    )
    metrics = evaluate_digits(images, labels)
    if out_dir is not None and jax.process_index() == 0:
        rows = config.eval.grid_rows
        order = np.argsort(labels[: rows * gen.num_classes], kind="stable")
        grid = images[: rows * gen.num_classes][order]
        save_png_grid(grid, as_path(out_dir) / f"samples{tag}_step{step}.png", nrow=rows)
    return {f"eval{tag}/{k}": v for k, v in metrics.items() if v is not None}


def evaluate_video_generator(
    gen: ClassConditionalMMDiT,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int,
    out_dir: str | None,
    *,
    steps: int | None = None,
    tag: str = "",
) -> dict:
    """`evaluate_digits_generator` for moving-digits clips `(N, F, S, S, 1)`."""
    from apt_jax.eval.grid import save_video_gif, save_video_strips
    from apt_jax.eval.video_metrics import evaluate_moving_digits

    _, video_shape = make_source(config)
    videos, labels = generate(
        gen,
        params,
        num=config.eval.num_samples,
        steps=steps or config.eval.steps,
        cfg_scale=config.eval.cfg_scale,
        shift=config.eval.shift,
        seed=config.eval.seed,
        image_shape=video_shape,
        chunk=100,
    )
    metrics = evaluate_moving_digits(videos, labels, config.data.max_speed)
    if out_dir is not None and jax.process_index() == 0:
        shown = videos[: config.eval.grid_rows]  # labels 0, 1, ... (i mod 10)
        out = as_path(out_dir)
        save_video_strips(shown, out / f"samples{tag}_step{step}.png")
        if shown.shape[1] > 1:
            save_video_gif(shown, out / f"samples{tag}_step{step}.gif", nrow=len(shown))
    return {f"eval{tag}/{k}": v for k, v in metrics.items() if v is not None}


# A fixed yardstick for held-out loss, the same for every recipe: stratified
# uniform times, no weighting, fixed noise.
_EVAL_FLOW = {"density": "uniform", "shift": 1.0, "stratified": True, "weighting": "none"}


@functools.lru_cache(maxsize=8)
def _held_out_loss(gen: TextConditionalMMDiT):
    @jax.jit
    def run(params, x0, cond, rng):
        return flow_matching_loss(gen.velocity_fn(params), x0, cond, rng, _EVAL_FLOW)[1]

    return run


def evaluate_text_generator(
    gen: TextConditionalMMDiT,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int,
    out_dir: str | None,
    *,
    tag: str = "",
) -> dict:
    """Held-out flow loss and samples from the held-out rows' embeddings.

    Takes the first `config.eval.num_samples` rows of `config.data.eval_split`;
    returns `eval/flow_loss` (velocity MSE at stratified uniform times with
    fixed noise: comparable across steps and recipes) and writes, under
    `out_dir`, `samples_step{N}.npz` (`latents`, `ids`, `captions`: decode them
    with your VAE) and a PNG grid of their first channels (`latent_grid_images`).
    """
    from apt_jax.data.latents import latent_grid_images
    from apt_jax.eval.grid import save_png_grid

    records, shape = make_source(config, config.data.eval_split)
    n = min(config.eval.num_samples, len(records))
    rows = records.rows(n)
    cond = {"context": rows["context"], "pooled": rows["pooled"]}
    key, b, total = jax.random.key(config.eval.seed), config.batch_size, 0.0
    for i in range(0, n, b):
        x0 = rows["latent"][i : i + b]
        chunk_cond = jax.tree.map(lambda c: c[i : i + b], cond)  # noqa: B023
        total += float(_held_out_loss(gen)(params, x0, chunk_cond, key)["loss"]) * len(x0)
    metrics = {"flow_loss": total / n}
    latents, _ = generate(
        gen,
        params,
        num=n,
        steps=config.eval.steps,
        cfg_scale=config.eval.cfg_scale,
        shift=config.eval.shift,
        seed=config.eval.seed,
        image_shape=shape,
        labels=np.arange(n),
        cond_rows=cond,
        chunk=config.batch_size,
        clip=False,
    )
    metrics["sample_std"] = float(np.std(latents))
    if out_dir is not None and jax.process_index() == 0:
        out = as_path(out_dir)  # local or gs://: the .npz is built in memory, written whole
        out.mkdir(parents=True, exist_ok=True)
        texts = [records.text(i) for i in range(n)]
        buffer = io.BytesIO()
        np.savez(
            buffer,
            latents=latents,
            ids=np.array([t[0] for t in texts]),
            captions=np.array([t[1] for t in texts]),
        )
        (out / f"samples{tag}_step{step}.npz").write_bytes(buffer.getvalue())
        save_png_grid(
            latent_grid_images(latents),
            out / f"samples{tag}_step{step}.png",
            nrow=config.eval.grid_rows,
        )
    return {f"eval{tag}/{k}": v for k, v in metrics.items()}


def generator_functions(
    gen: Generator, config: ml_collections.ConfigDict, served_params: Callable
) -> tuple[Callable, Callable]:
    """The `evaluate` and `sample` of a Task whose generator is `served_params(state)`.

    Text-conditioned runs sample with the embeddings of the eval split's rows,
    sample i from row `i mod rows`; the returned labels are those row indices.
    """
    if isinstance(gen, TextConditionalMMDiT):
        return _text_generator_functions(gen, config, served_params)
    _, image_shape = make_source(config)

    def evaluate(state, step, out_dir):
        return evaluate_digits_generator(gen, served_params(state), config, step, out_dir)

    def sample(state, num, steps, cfg_scale, seed):
        return generate(
            gen,
            served_params(state),
            num=num,
            steps=steps,
            cfg_scale=cfg_scale,
            shift=config.eval.shift,
            seed=seed,
            image_shape=image_shape,
        )

    return evaluate, sample


def _text_generator_functions(
    gen: TextConditionalMMDiT, config: ml_collections.ConfigDict, served_params: Callable
) -> tuple[Callable, Callable]:
    def evaluate(state, step, out_dir):
        return evaluate_text_generator(gen, served_params(state), config, step, out_dir)

    def sample(state, num, steps, cfg_scale, seed):
        records, shape = make_source(config, config.data.eval_split)
        rows = records.rows(min(num, len(records)))
        return generate(
            gen,
            served_params(state),
            num=num,
            steps=steps,
            cfg_scale=cfg_scale,
            shift=config.eval.shift,
            seed=seed,
            image_shape=shape,
            labels=(np.arange(num) % len(rows["pooled"])).astype(np.int32),
            cond_rows={"context": rows["context"], "pooled": rows["pooled"]},
            chunk=config.batch_size,
            clip=False,
        )

    return evaluate, sample
