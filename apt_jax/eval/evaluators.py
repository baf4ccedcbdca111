"""What a run's `Task.evaluate` and `Task.sample` do, by dataset.

- digits: `config.eval.num_samples` images, Frechet distance and classifier
  accuracy (`apt_jax.eval.metrics`), a PNG grid;
- moving digits: the same clips scored per frame and for motion
  (`apt_jax.eval.video_metrics`), PNG strips and a GIF;
- latents (text): the held-out flow loss and samples from the held-out rows'
  embeddings, saved as an `.npz` of latents for the user's VAE.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from apt_jax.data import registry
from apt_jax.data.latents import latent_grid_images
from apt_jax.eval.generate import Generator, generate
from apt_jax.eval.grid import save_png_grid, save_video_gif, save_video_strips
from apt_jax.eval.metrics import evaluate_digits
from apt_jax.eval.video_metrics import evaluate_moving_digits
from apt_jax.models import TextConditionalMMDiT
from apt_jax.objectives.sft import flow_matching_loss
from apt_jax.paths import as_path


def evaluate_class_generator(
    gen: Generator,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int,
    out_dir: str | None,
    *,
    steps: int | None = None,
    tag: str = "",
) -> dict:
    """Samples `config.eval.num_samples` (labels `i mod 10`), writes the pictures, and
    returns `eval{tag}/<metric>`: FD and accuracy for digits; per-frame distance,
    per-frame accuracy and the motion measures for moving-digits clips `(N, F, S, S, 1)`."""
    video = config.data.name == "moving_digits"
    samples, labels = generate(
        gen,
        params,
        num=config.eval.num_samples,
        steps=steps or config.eval.steps,
        cfg_scale=config.eval.cfg_scale,
        shift=config.eval.shift,
        seed=config.eval.seed,
        image_shape=registry.sample_shape(config),
        chunk=100 if video else 500,
    )
    if video:
        metrics = evaluate_moving_digits(samples, labels, config.data.max_speed)
    else:
        metrics = evaluate_digits(samples, labels)
    if out_dir is not None and jax.process_index() == 0:
        out, rows = as_path(out_dir), config.eval.grid_rows
        if video:
            shown = samples[:rows]  # labels 0, 1, ... (i mod 10)
            save_video_strips(shown, out / f"samples{tag}_step{step}.png")
            if shown.shape[1] > 1:
                save_video_gif(shown, out / f"samples{tag}_step{step}.gif", nrow=len(shown))
        else:
            order = np.argsort(labels[: rows * gen.num_classes], kind="stable")
            grid = samples[: rows * gen.num_classes][order]
            save_png_grid(grid, out / f"samples{tag}_step{step}.png", nrow=rows)
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


def _eval_rows(config: ml_collections.ConfigDict, num: int):
    """`(records, rows)`: the eval split and its first `num` examples stacked."""
    records = registry.make_source(config, config.data.eval_split)
    return records, records.rows(min(num, len(records)))


def _text_samples(gen, params, config, rows: dict, num: int, steps: int, cfg_scale: float, seed):
    """`num` latents, sample i conditioned on row `i mod len(rows)`; CFG guides
    against the dataset's negative prompt (`registry.negative_condition`)."""
    count = len(rows["pooled"])
    return generate(
        gen,
        params,
        num=num,
        steps=steps,
        cfg_scale=cfg_scale,
        shift=config.eval.shift,
        seed=seed,
        image_shape=registry.sample_shape(config),
        labels=(np.arange(num) % count).astype(np.int32),
        cond_rows={"context": rows["context"], "pooled": rows["pooled"]},
        negative=registry.negative_condition(config),
        chunk=config.batch_size,
        clip=False,
    )


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
    records, rows = _eval_rows(config, config.eval.num_samples)
    n = len(rows["pooled"])
    cond = {"context": rows["context"], "pooled": rows["pooled"]}
    key, b, total = jax.random.key(config.eval.seed), config.batch_size, 0.0
    for i in range(0, n, b):
        x0 = rows["latent"][i : i + b]
        chunk_cond = jax.tree.map(lambda c: c[i : i + b], cond)  # noqa: B023
        total += float(_held_out_loss(gen)(params, x0, chunk_cond, key)["loss"]) * len(x0)
    metrics = {"flow_loss": total / n}
    latents, _ = _text_samples(
        gen, params, config, rows, n, config.eval.steps, config.eval.cfg_scale, config.eval.seed
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


def evaluate_and_sample(
    gen: Generator, config: ml_collections.ConfigDict, served_params: Callable
) -> tuple[Callable, Callable]:
    """The `evaluate` and `sample` of a Task whose generator is `served_params(state)`.

    Text-conditioned runs sample with the embeddings of the eval split's rows, or
    of `sample(..., cond_rows={"context": (R, L, D), "pooled": (R, P)})` (encoded
    prompts), sample i from row `i mod R`; the returned labels are those row
    indices.
    """
    if isinstance(gen, TextConditionalMMDiT):

        def evaluate(state, step, out_dir):
            return evaluate_text_generator(gen, served_params(state), config, step, out_dir)

        def sample(state, num, steps, cfg_scale, seed, cond_rows=None):
            rows = _eval_rows(config, num)[1] if cond_rows is None else cond_rows
            params = served_params(state)
            return _text_samples(gen, params, config, rows, num, steps, cfg_scale, seed)

        return evaluate, sample

    def evaluate(state, step, out_dir):
        return evaluate_class_generator(gen, served_params(state), config, step, out_dir)

    def sample(state, num, steps, cfg_scale, seed):
        return generate(
            gen,
            served_params(state),
            num=num,
            steps=steps,
            cfg_scale=cfg_scale,
            shift=config.eval.shift,
            seed=seed,
            image_shape=registry.sample_shape(config),
        )

    return evaluate, sample
