"""The MMDiT (SD3 / SD3.5 multimodal diffusion transformer) for images and video.

Call contract (docs/design.md#public-contracts):
  `MMDiT(config).apply({"params": p}, x, t, context, pooled) -> v`
  x       `(B, H, W, C)` image or `(B, F, H, W, C)` video latents, channels-last
  t       `(B,)` flow time in [0, 1], 1 = pure noise
  context `(B, L, joint_attention_dim)` text-encoder states
  pooled  `(B, pooled_projection_dim)` pooled text vector
  v       the predicted velocity `eps - x0`, shaped like x, float32.

Ein-notation: B batch, N image tokens, L context tokens, D width, p / pt the
spatial / temporal patch, f h w the latent grid in patches.

Parameter layout. Unrolled (`scan_layers=False`) blocks are
`transformer_blocks_{i}`, as in diffusers. With `scan_layers=True`, each run
of consecutive identical blocks (same dual-attention flag) is one `nn.scan`
named `transformer_blocks_{start}_{stop}` whose parameters carry a leading
"layers" axis; the last (context-pre-only) block differs from the others and
always stays `transformer_blocks_{L-1}`. `apt_jax.models.layout` converts
between the two layouts.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apt_jax.models import axes
from apt_jax.models.blocks import JointTransformerBlock
from apt_jax.models.config import MMDiTConfig
from apt_jax.models.embeddings import (
    TIMESTEP_CHANNELS,
    spatial_positions,
    temporal_positions,
    timestep_embedding,
)
from apt_jax.models.layers import AdaLNModulation, dense, layer_norm, modulate, zeros

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Blocks `[start, stop)` that share one structure (one `nn.scan` when scanning)."""

    start: int
    stop: int
    dual: bool
    context_pre_only: bool

    @property
    def scanned_name(self) -> str:
        return f"transformer_blocks_{self.start}_{self.stop}"

    def block_name(self, i: int) -> str:
        return f"transformer_blocks_{i}"

    @property
    def is_scanned_in(self) -> bool:
        """Whether `scan_layers=True` stacks this run (the final block never is)."""
        return not self.context_pre_only


def layer_runs(config: MMDiTConfig) -> tuple[LayerRun, ...]:
    """Splits the blocks into maximal runs of identical structure."""
    dual = set(config.dual_attention_layers)
    last = config.num_layers - 1
    runs, i = [], 0
    while i < last:
        j = i
        while j < last and ((j in dual) == (i in dual)):
            j += 1
        runs.append(LayerRun(i, j, i in dual, False))
        i = j
    runs.append(LayerRun(last, last + 1, last in dual, True))
    return tuple(runs)


class PatchEmbed(nn.Module):
    """Patchify (a strided conv written as a matmul) + fixed position codes.

    The kernel is stored like a conv kernel, `(p, p, C, D)` or `(pt, p, p, C, D)`
    (HWIO), so diffusers' `pos_embed.proj.weight` maps onto it by a transpose.
    """

    config: MMDiTConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, ...]]:
        """`(B, H, W, C)` / `(B, F, H, W, C)` -> tokens `(B, N, D)`, grid `(h, w)` / `(f, h, w)`."""
        cfg = self.config
        p, d = cfg.patch_size, cfg.inner_dim
        if x.ndim == 5:
            b, fr, hh, ww, c = x.shape
            pt = cfg.patch_size_t
            grid = (fr // pt, hh // p, ww // p)
            f, h, w = grid
            patches = x.reshape(b, f, pt, h, p, w, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            kernel_shape = (pt, p, p, c, d)
        else:
            b, hh, ww, c = x.shape
            grid = (hh // p, ww // p)
            h, w = grid
            patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
            kernel_shape = (p, p, c, d)
        patches = patches.reshape(b, int(np.prod(grid)), -1)
        init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=tuple(range(len(kernel_shape) - 1)), out_axis=-1
        )
        # One distinct name per dimension: flax rejects repeated logical names.
        taps = (axes.PATCH_T, axes.PATCH_H, axes.PATCH_W)[-(len(kernel_shape) - 2) :]
        kernel_names = (*taps, axes.PATCH, axes.EMBED)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, kernel_names),
            kernel_shape,
            cfg.storage_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(zeros, (axes.EMBED,)), (d,), cfg.storage_dtype
        )
        dtype = cfg.compute_dtype
        tokens = patches.astype(dtype) @ kernel.reshape(-1, d).astype(dtype) + bias.astype(dtype)

        pos = spatial_positions(
            d, h, w, sample_size=cfg.sample_size, patch_size=p, max_size=cfg.pos_embed_max_size
        )
        if x.ndim == 5:
            pos = pos[None] + temporal_positions(d, grid[0])[:, None, None]
        tokens = tokens + jnp.asarray(pos.reshape(-1, d), dtype)
        return tokens, grid


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `linear_1`, `linear_2`)."""

    config: MMDiTConfig
    in_axis: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        # The hidden width is EMBED on the way in and MLP on the way out (flax
        # rejects a name repeated within one kernel); both kernels shard on fsdp.
        h = dense(cfg, cfg.inner_dim, (self.in_axis, axes.EMBED), "linear_1", kernel_init=init)(x)
        return dense(cfg, cfg.inner_dim, (axes.MLP, axes.EMBED), "linear_2", kernel_init=init)(
            nn.silu(h)
        )


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(1000 t)) + MLP(pooled): the conditioning vector `(B, D)`."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, t: jnp.ndarray, pooled: jnp.ndarray) -> jnp.ndarray:
        dtype = self.config.compute_dtype
        t_emb = MLPEmbedder(self.config, axes.FREQ, name="timestep_embedder")(
            timestep_embedding(t, TIMESTEP_CHANNELS).astype(dtype)
        )
        p_emb = MLPEmbedder(self.config, axes.POOLED_IN, name="text_embedder")(pooled.astype(dtype))
        return t_emb + p_emb


def _block_class(config: MMDiTConfig):
    if config.remat_policy == "none":
        return JointTransformerBlock
    # Under scan, CSE across iterations cannot undo remat, so prevent_cse can go.
    return nn.remat(
        JointTransformerBlock,
        policy=_REMAT_POLICIES[config.remat_policy],
        prevent_cse=not config.scan_layers,
    )


def _unpatchify(out: jnp.ndarray, grid: tuple[int, ...], config: MMDiTConfig) -> jnp.ndarray:
    """`(B, N, [pt] p p c)` -> `(B, [F], H, W, c)`; channel order (p, q, c) as diffusers."""
    b = out.shape[0]
    p, c = config.patch_size, config.out_channels
    if len(grid) == 3:
        f, h, w = grid
        pt = config.patch_size_t
        out = out.reshape(b, f, h, w, pt, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, f * pt, h * p, w * p, c)
    h, w = grid
    out = out.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h * p, w * p, c)


class MMDiT(nn.Module):
    """SD3-style MMDiT velocity model. See the module docstring for the contract."""

    config: MMDiTConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        context: jnp.ndarray,
        pooled: jnp.ndarray,
        *,
        attention_implementation: str | None = None,
        return_hidden_states: bool = False,
    ):
        """Predicts the velocity.

        Args:
          x: `(B, H, W, C)` or `(B, F, H, W, C)` latents.
          t: `(B,)` flow times in [0, 1].
          context: `(B, L, joint_attention_dim)`.
          pooled: `(B, pooled_projection_dim)`.
          attention_implementation: overrides the config's kernel for this call
            (exact R1 passes "xla": only XLA attention has a second derivative).
          return_hidden_states: also return the image tokens `(B, N, D)` after
            every block, a tuple of length num_layers (discriminator heads).

        Returns:
          `v` shaped like x (float32), or `(v, hidden_states)`.
        """
        cfg = self.config
        cfg.check_inputs(x.shape, t.shape, context.shape, pooled.shape)
        # An unknown kernel name is refused by the one dispatch (layers.dot_product_attention).
        impl = attention_implementation or cfg.attention_implementation
        image_as_video = cfg.is_video and x.ndim == 4
        if image_as_video:  # a one-frame clip (check_inputs ensured patch_size_t == 1)
            x = x[:, None]
        dtype = cfg.compute_dtype

        tokens, grid = PatchEmbed(cfg, name="pos_embed")(x)
        tokens = nn.with_logical_constraint(tokens, (axes.BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        cond = TimeTextEmbed(cfg, name="time_text_embed")(t, pooled)
        ctx = dense(cfg, cfg.inner_dim, (axes.CONTEXT_IN, axes.EMBED), "context_embedder")(
            context.astype(dtype)
        )
        ctx = nn.with_logical_constraint(ctx, (axes.BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

        block_cls = _block_class(cfg)
        carry, hidden = (tokens, ctx), []
        for run in layer_runs(cfg):
            kwargs = dict(
                config=cfg,
                dual=run.dual,
                context_pre_only=run.context_pre_only,
                attention_implementation=impl,
                collect_hidden=return_hidden_states,
            )
            if cfg.scan_layers and run.is_scanned_in:
                scanned = nn.scan(
                    block_cls,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast,),
                    length=run.stop - run.start,
                    metadata_params={nn.PARTITION_NAME: axes.LAYERS},
                )
                carry, ys = scanned(**kwargs, name=run.scanned_name)(carry, cond)
                if return_hidden_states:
                    hidden.extend(ys[i] for i in range(run.stop - run.start))
            else:
                for i in range(run.start, run.stop):
                    carry, y = block_cls(**kwargs, name=run.block_name(i))(carry, cond)
                    hidden.append(y)
        x_tokens = carry[0]

        # Final adaLN (diffusers AdaLayerNormContinuous: chunk order scale, shift)
        # and a zero-initialised projection: the fresh model predicts v = 0.
        scale, shift = AdaLNModulation(cfg, 2, name="norm_out")(cond)
        x_tokens = modulate(layer_norm(cfg)(x_tokens), shift, scale)
        patch_volume = cfg.patch_size**2 * (cfg.patch_size_t or 1)
        out = dense(
            cfg,
            patch_volume * cfg.out_channels,
            (axes.EMBED, axes.PATCH),
            "proj_out",
            kernel_init=zeros,
        )(x_tokens)
        v = _unpatchify(out.astype(jnp.float32), grid, cfg)
        if image_as_video:
            v = v[:, 0]
        if return_hidden_states:
            return v, tuple(hidden)
        return v


def dummy_inputs(config: MMDiTConfig, batch: int = 1, context_len: int = 1, frames: int = 0):
    """Smallest valid inputs `(x, t, context, pooled)` for `init` / `eval_shape`."""
    p = config.patch_size
    if frames:
        x = jnp.zeros((batch, frames, p, p, config.in_channels), jnp.float32)
    else:
        x = jnp.zeros((batch, p, p, config.in_channels), jnp.float32)
    return (
        x,
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, context_len, config.joint_attention_dim), jnp.float32),
        jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
    )


def init_params(config: MMDiTConfig, rng: jax.Array) -> dict:
    """Initialises MMDiT parameters (unboxed) from the smallest valid inputs."""
    inputs = dummy_inputs(config, frames=config.patch_size_t or 0)
    # The parameters do not depend on the attention kernel; "xla" runs anywhere
    # (cuDNN needs a GPU and fp16/bf16 inputs, and init runs a dummy forward).
    variables = MMDiT(config).init(rng, *inputs, attention_implementation="xla")
    return nn.meta.unbox(variables["params"])


def param_count(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def abstract_params(config: MMDiTConfig) -> dict:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
