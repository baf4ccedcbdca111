"""Fixed (parameter-free) embeddings: sinusoidal timesteps and position tables.

All position tables are computed in numpy at trace time (they depend only on
static shapes), so they are constants in the compiled program.

Video position encoding. We use a factorised 3D sin-cos encoding: SD3's
centre-cropped 2D table for (h, w), plus a 1D sin-cos code of the latent frame
index, shifted so that frame 0 contributes exactly zero. We chose it over 3D
RoPE because (a) it keeps SD3's pretrained spatial encoding untouched, so image
weights (SD3, or our image stage) start video training with their image
behaviour, and (b) a one-frame video is bit-for-bit the image path, which is
what the paper's image-then-video schedule needs: the same generator serves
both stages without a change of attention.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0  # SD3 feeds the network 1000 * t.


def timestep_embedding(t: jnp.ndarray, channels: int = TIMESTEP_CHANNELS) -> jnp.ndarray:
    """diffusers `Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)`.

    Args:
      t: `(B,)` flow times in [0, 1] (1 = noise); embedded as `1000 * t`.
      channels: embedding width (even).

    Returns:
      `(B, channels)` float32, cosines first.
    """
    half = channels // 2
    exponent = -math.log(10000.0) * np.arange(half, dtype=np.float32) / half
    freqs = jnp.asarray(np.exp(exponent), dtype=jnp.float32)
    args = (TIMESTEP_SCALE * t.astype(jnp.float32))[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers `get_1d_sincos_pos_embed_from_grid`: (M,) -> (M, embed_dim), sines first."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _sincos_2d(embed_dim: int, pos_h: np.ndarray, pos_w: np.ndarray) -> np.ndarray:
    """2D sin-cos codes on the grid `pos_h x pos_w`, `(len(pos_h), len(pos_w), D)` float32.

    The first half of the channels encodes the column (w) coordinate and the
    second half the row (h), as diffusers' `get_2d_sincos_pos_embed_from_grid`.
    """
    if embed_dim % 4:
        raise ValueError(f"The 2D sin-cos table needs a width divisible by 4, got {embed_dim}.")
    ww, hh = np.meshgrid(pos_w, pos_h)  # (gh, gw) each; diffusers puts w first.
    emb = np.concatenate([_sincos_1d(embed_dim // 2, ww), _sincos_1d(embed_dim // 2, hh)], axis=1)
    table = emb.reshape(len(pos_h), len(pos_w), embed_dim).astype(np.float32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=16)
def sd3_pos_table(embed_dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
    """SD3's 2D sin-cos table (diffusers `get_2d_sincos_pos_embed`), as `(gh, gw, D)`.

    The first half of the channels encodes the column (w) coordinate and the
    second half the row (h), positions scaled by `base_size / grid`, exactly as
    diffusers computes the `pos_embed.pos_embed` buffer.
    """
    pos_h = np.arange(grid_h, dtype=np.float32) / (grid_h / base_size)
    pos_w = np.arange(grid_w, dtype=np.float32) / (grid_w / base_size)
    return _sincos_2d(embed_dim, pos_h, pos_w)


@functools.lru_cache(maxsize=64)
def spatial_positions(
    embed_dim: int, h: int, w: int, *, sample_size: int, patch_size: int, max_size: int | None
) -> np.ndarray:
    """Position codes for an `h x w` patch grid, `(h, w, D)` float32.

    With `max_size`, the centred `h x w` window of the `max_size^2` table
    (SD3's `cropped_pos_embed`), computed directly: the window's rows are
    bit-identical to the full table's, without building the full table
    (SD3.5-medium's 384^2 x 1536 table takes ~3.7 GB and seconds to compute).
    Without `max_size`, the table is computed for the exact grid.
    """
    base_size = sample_size // patch_size
    if max_size is None:
        return sd3_pos_table(embed_dim, h, w, base_size)
    top = (max_size - h) // 2
    left = (max_size - w) // 2
    # Same float32 arithmetic as the full table: arange(max) / (max / base), windowed.
    pos_h = np.arange(top, top + h, dtype=np.float32) / (max_size / base_size)
    pos_w = np.arange(left, left + w, dtype=np.float32) / (max_size / base_size)
    return _sincos_2d(embed_dim, pos_h, pos_w)


def temporal_positions(embed_dim: int, frames: int) -> np.ndarray:
    """1D sin-cos code of the latent frame index minus the code of frame 0.

    Returns `(frames, D)` float32; row 0 is all zeros so a one-frame video is
    encoded exactly like an image.
    """
    pos = np.arange(frames, dtype=np.float64)
    return (_sincos_1d(embed_dim, pos) - _sincos_1d(embed_dim, np.zeros(1))).astype(np.float32)
