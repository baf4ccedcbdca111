"""Sampling a generator in chunks: the one sampler every evaluator and script uses.

A generator here is a `ClassConditionalMMDiT` or `TextConditionalMMDiT`
(`apt_jax.models`): both give `velocity_fn(params)` and `null_condition(cond)`,
so CFG guides against the null class or the null text condition alike.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from apt_jax import sampling
from apt_jax.models import ClassConditionalMMDiT, TextConditionalMMDiT

Generator = ClassConditionalMMDiT | TextConditionalMMDiT


def sample_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels `i mod num_classes` (the sample.py contract)."""
    return (np.arange(num) % num_classes).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _sampler(gen: Generator, steps: int, cfg_scale: float, shift: float):
    sigmas = sampling.shifted_linear_sigmas(steps, shift)

    @jax.jit
    def run(params, noise, cond, negative):
        uncond = gen.null_condition(cond, negative) if cfg_scale != 1.0 else None
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
    negative: Any = None,
    chunk: int = 500,
    clip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Euler-samples `num` images with `steps` steps; 1 step is `z - v(z, 1)`.

    Class conditioning: `labels` (default `i mod num_classes`). Text
    conditioning: `cond_rows` `{"context": (R, L, D), "pooled": (R, P)}` and
    `labels` `(num,)` the row each sample takes its embeddings from (gathered
    a chunk at a time). CFG (`cfg_scale != 1`) guides against
    `gen.null_condition(cond, negative)`: the null class or text condition, or
    the `negative` class / prompt embedding `{"context": (L, D), "pooled": (P,)}`.

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
        out.append(np.asarray(run(params, noise[i : i + chunk], cond, negative)))
    images = np.concatenate(out).astype(np.float32)
    return (np.clip(images, -1.0, 1.0) if clip else images), labels
