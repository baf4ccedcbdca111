"""The APT discriminator (Seaweed-APT, docs/method.md), as plain functions.

`D_hat(x_t, t, c)` runs the class-conditional MMDiT backbone on noised input,
keeps the image / video tokens after the blocks in `head_layers`, and turns
them into one logit per sample with `APTHeads`. `D(x, c) := E_t D_hat(x_t, t, c)`
is estimated with one t per sample, `t ~ shift(U(0, 1), s)`, the input noised
inside D (`noised_logits`); t = 0 (no noise) collapses training (paper).

Parameters are `{"mmdit": <MMDiT tree>, "labels": <LabelEmbedder tree>,
"heads": <APTHeads tree>}`. "mmdit" and "labels" have exactly the tree of
`ClassConditionalMMDiT.init_boxed` for the same config, so the discriminator
is initialised from the diffusion teacher by copying those two subtrees
(`init_boxed(rng, teacher_params)`). With `conditioning="text"` the backbone is
a `TextConditionalMMDiT` (no "labels"; the condition is `{"context",
"pooled"}` text embeddings) and only "mmdit" is copied. The backbone's output layer (`norm_out`,
`proj_out`) is part of that tree but unused by D: it gets zero gradient.

Every logit depends on its own sample only (no batch statistics anywhere), which
`apt_jax.objectives.adversarial.r1_exact` relies on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apt_jax import flow
from apt_jax.models.class_conditional import ClassConditionalMMDiT
from apt_jax.models.config import MMDiTConfig
from apt_jax.models.discriminator import APTHeads, check_head_layers, default_head_layers
from apt_jax.models.text_conditional import TextConditionalMMDiT


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


@dataclasses.dataclass(frozen=True)
class APTDiscriminator:
    """Backbone + heads discriminator over a class-conditional MMDiT.

    Attributes:
      config: the backbone's architecture (the teacher's).
      num_classes: real classes; label `num_classes` is the null class.
      context_tokens: context tokens per label (the teacher's).
      head_layers: 0-based blocks whose outputs the heads read; None (default)
        means `default_head_layers(config.num_layers)` (16/36, 26/36, 36/36).
      conditioning: "class" (labels through a label embedder) or "text" (the
        condition is `{"context", "pooled"}`; num_classes and context_tokens
        are unused).
    """

    config: MMDiTConfig
    num_classes: int
    context_tokens: int = 1
    head_layers: tuple[int, ...] | None = None
    conditioning: str = "class"

    def __post_init__(self):
        if self.conditioning not in ("class", "text"):
            raise ValueError(f"conditioning={self.conditioning!r} must be 'class' or 'text'.")
        layers = self.head_layers
        if layers is None:
            layers = default_head_layers(self.config.num_layers)
        object.__setattr__(self, "head_layers", check_head_layers(layers, self.config.num_layers))

    @property
    def backbone(self) -> ClassConditionalMMDiT | TextConditionalMMDiT:
        """The generator-shaped backbone (its params are `{"mmdit", "labels"}`, or
        `{"mmdit"}` for text conditioning)."""
        if self.conditioning == "text":
            return TextConditionalMMDiT(self.config)
        return ClassConditionalMMDiT(self.config, self.num_classes, self.context_tokens)

    def heads(self, attention_implementation: str | None = None) -> APTHeads:
        """The heads module, running `attention_implementation` (None: the config's)."""
        impl = attention_implementation or self.config.attention_implementation
        return APTHeads(self.config, self.head_layers, attention_implementation=impl)

    def init_boxed(self, rng: jax.Array, teacher_params: dict | None = None) -> dict:
        """Parameters `{"mmdit", "labels", "heads"}`, boxed with logical axis names.

        Args:
          rng: PRNG key.
          teacher_params: optional `{"mmdit", "labels", ...}` of the diffusion
            teacher (boxed or not, same config and layer layout); its "mmdit"
            and "labels" ("mmdit" alone for text conditioning) replace the fresh
            backbone's values (boxes kept). None leaves the backbone freshly
            initialised, for recipes that overwrite it later (e.g. after
            restoring the teacher onto the mesh).

        Returns:
          The boxed tree (unbox with `flax.linen.meta.unbox`).
        """
        r_backbone, r_heads = jax.random.split(rng)
        params = dict(self.backbone.init_boxed(r_backbone))
        cfg = self.config
        # Any token count works for init: the heads' parameters do not depend on N.
        hidden = [jnp.zeros((1, 1, cfg.inner_dim), jnp.float32)] * cfg.num_layers
        params["heads"] = self.heads("xla").init(r_heads, hidden)["params"]
        if teacher_params is not None:
            for name in [k for k in params if k != "heads"]:
                params[name] = _replace_boxed(params[name], teacher_params[name], name)
        return params

    def logits(
        self,
        params: dict,
        x_t: jax.Array,
        t: jax.Array,
        cond: Any,
        *,
        attention_implementation: str | None = None,
    ) -> jax.Array:
        """`D_hat(x_t, t, c)`: one logit per sample.

        Args:
          params: `{"mmdit", "labels", "heads"}` (unboxed).
          x_t: noised latents `(B, H, W, C)` or `(B, F, H, W, C)`.
          t: flow times `(B,)` in [0, 1] of x_t.
          cond: class labels, int `(B,)` in [0, num_classes], or the text
            condition `{"context", "pooled"}`.
          attention_implementation: an entry of `ATTENTION_IMPLEMENTATIONS`,
            the one kernel of backbone and heads alike; None means
            `config.attention_implementation`. A second derivative (exact R1)
            needs "xla" or "xla_autodiff"; "cudnn" has none.

        Returns:
          `(B,)` float32 logits (real: large).
        """
        _, hidden = self.backbone.velocity(
            {k: v for k, v in params.items() if k != "heads"},
            x_t,
            t,
            cond,
            attention_implementation=attention_implementation,
            return_hidden_states=True,
        )
        heads = self.heads(attention_implementation)
        return heads.apply({"params": params["heads"]}, hidden)

    def noise_input(
        self, x: jax.Array, rng: jax.Array, *, shift: float = 1.0
    ) -> tuple[jax.Array, jax.Array]:
        """Noises clean input inside D: `x_t = (1 - t) x + t eps`, `t ~ shift(U(0, 1), s)`.

        Args:
          x: clean (real or generated) latents `(B, ...)`.
          rng: PRNG key; the same key gives the same t and eps.
          shift: time shift s (paper: 1 for images, 12 for video).

        Returns:
          `(x_t, t)`: `x_t` shaped like x, `t` `(B,)` float32, one t per sample.
        """
        r_t, r_eps = jax.random.split(rng)
        t = flow.shift(jax.random.uniform(r_t, (x.shape[0],), jnp.float32), shift)
        eps = jax.random.normal(r_eps, x.shape, x.dtype)
        return flow.interpolate(x, eps, t.astype(x.dtype)), t

    def noised_logits(
        self,
        params: dict,
        x: jax.Array,
        cond: Any,
        rng: jax.Array,
        *,
        shift: float = 1.0,
        attention_implementation: str | None = None,
    ) -> jax.Array:
        """`D(x, c) := E_t D_hat(x_t, t, c)`, single-sample estimate: logits `(B,)` float32.

        With `rng` fixed this is a deterministic, per-sample function of x, the
        form `r1_exact` / `r1_approx` need (the same t and eps on both sides
        of the approximate penalty).

        Args:
          params: `{"mmdit", "labels", "heads"}`.
          x: clean latents `(B, ...)`.
          cond: as in `logits`.
          rng: PRNG key of the noising (see `noise_input`).
          shift: time shift s of the noising density.
          attention_implementation: as in `logits`.
        """
        x_t, t = self.noise_input(x, rng, shift=shift)
        return self.logits(params, x_t, t, cond, attention_implementation=attention_implementation)

    def logits_fn(
        self,
        params: dict,
        cond: Any,
        rng: jax.Array,
        *,
        shift: float = 1.0,
        attention_implementation: str | None = None,
    ) -> Callable[[jax.Array], jax.Array]:
        """`x -> noised_logits(params, x, cond, rng, ...)`: the R1 interface."""
        return lambda x: self.noised_logits(
            params,
            x,
            cond,
            rng,
            shift=shift,
            attention_implementation=attention_implementation,
        )


def _replace_boxed(boxed: dict, values: dict, name: str) -> dict:
    """`boxed` with each box's value replaced by the matching leaf of `values`."""
    values = nn.meta.unbox(values)
    want = jax.tree_util.tree_structure(nn.meta.unbox(boxed))
    got = jax.tree_util.tree_structure(values)
    if want != got:
        raise ValueError(
            f"teacher_params[{name!r}] does not have the discriminator backbone's tree: the "
            "teacher must use the same MMDiTConfig (including scan_layers), num_classes and "
            f"context_tokens.\nExpected {want}\ngot {got}."
        )

    def put(box, value):
        if jnp.shape(box.value) != jnp.shape(value):
            raise ValueError(
                f"teacher_params[{name!r}] has a leaf of shape {jnp.shape(value)} where the "
                f"discriminator expects {jnp.shape(box.value)}."
            )
        return box.replace_boxed(jnp.asarray(value, box.value.dtype))

    return jax.tree_util.tree_map(put, boxed, values, is_leaf=_is_box)
