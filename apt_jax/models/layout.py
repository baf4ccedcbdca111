"""Convert MMDiT parameters between the unrolled and the scanned layouts.

Unrolled: `transformer_blocks_{i}` per block. Scanned: each run of identical
blocks (see `mmdit.layer_runs`) stacked along a new leading axis under
`transformer_blocks_{start}_{stop}`; the final block stays unrolled. These are
plain pytree functions, usable on arrays or on `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apt_jax.models.config import MMDiTConfig
from apt_jax.models.mmdit import layer_runs


def _stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # abstract params (eval_shape)
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    return jnp.stack(xs)


def _take(x, k: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[k]


def stack_layers(params: dict, config: MMDiTConfig) -> dict:
    """Unrolled -> scanned layout (what `config.replace(scan_layers=True)` expects)."""
    out = dict(params)
    for run in layer_runs(config):
        if not run.is_scanned_in:
            continue
        names = [run.block_name(i) for i in range(run.start, run.stop)]
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"stack_layers: params lack {missing}; are they already scanned?")
        blocks = [out.pop(n) for n in names]
        out[run.scanned_name] = jax.tree.map(_stack, *blocks)
    return out


def unstack_layers(params: dict, config: MMDiTConfig) -> dict:
    """Scanned -> unrolled layout (diffusers' `transformer_blocks.{i}` order)."""
    out = dict(params)
    for run in layer_runs(config):
        if not run.is_scanned_in:
            continue
        if run.scanned_name not in out:
            raise ValueError(
                f"unstack_layers: params lack {run.scanned_name!r}; are they already unrolled?"
            )
        stacked = out.pop(run.scanned_name)
        for k, i in enumerate(range(run.start, run.stop)):
            out[run.block_name(i)] = jax.tree.map(lambda x, k=k: _take(x, k), stacked)
    return out
