"""LoRA adapters <-> diffusers / PEFT LoRA files for `SD3Transformer2DModel`.

    save_adapters(config, lora, adapters, "out/pytorch_lora_weights.safetensors")
    pipe.load_lora_weights("out")                       # diffusers StableDiffusion3Pipeline
    lora, adapters = load_adapters(config, "out/pytorch_lora_weights.safetensors")
    save_merged(config, lora, params, adapters, "out/transformer")   # plain SD3 folder

Key names are diffusers' PEFT ones, from the same renaming as the weight
converter (`apt_jax.convert.diffusers_sd3`), per layer also for scanned runs:

    apt_jax adapter leaf (layout)
        safetensors key (layout)
    mmdit/transformer_blocks_0/attn/to_q/lora_A (in, r)
        transformer.transformer_blocks.0.attn.to_q.lora_A.weight (r, in)
    mmdit/transformer_blocks_0/attn/to_q/lora_B (r, out)
        transformer.transformer_blocks.0.attn.to_q.lora_B.weight (out, r)
    mmdit/transformer_blocks_0_23/attn/to_q/lora_A (L, in, r)
        one key per layer of the run, as above

Scale: PEFT applies `W + (lora_alpha / r) B A`; the factors are written
unscaled and `r`, `lora_alpha` and the module list go into the file's
`__metadata__["lora_adapter_metadata"]` under the "transformer." prefix, the
way diffusers' own `save_lora_weights` writes them, so `load_lora_weights`
builds the same `LoraConfig`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from apt_jax.convert import diffusers_sd3
from apt_jax.lora import _SCANNED, LORA_A, LORA_B, LoRA, LoRASettings
from apt_jax.models.config import MMDiTConfig

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer"

Path = tuple[str, ...]


def _module_keys(config: MMDiTConfig) -> dict[Path, list[str]]:
    """apt_jax dense-module path (in `config`'s layout) -> diffusers module name per layer."""
    entries, _ = diffusers_sd3._plan(config)
    out = {}
    for e in entries:
        if e.target[-1] == "kernel" and len(e.shape) in (2, 3) and e.target[0] != "pos_embed":
            out[e.target[:-1]] = [k.removesuffix(".weight") for k in e.keys]
    return out


def _host(x: Any) -> np.ndarray:
    return diffusers_sd3._host(x).astype(np.float32)


def to_diffusers_lora_state_dict(
    config: MMDiTConfig, lora: LoRA, adapters: Mapping, root: str = "mmdit"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict of float32 numpy arrays, adapter metadata) in diffusers' PEFT format.

    Args:
      config: the MMDiT architecture, in the layout of the params (scanned or not).
      lora: the adapters' description; every target must lie under `root`.
      adapters: the adapter tree (`lora.init` / a LoRA train state's params or EMA).
      root: the subtree of the MMDiT in the adapted tree ("mmdit" for the
        class-conditional generator; "" when the tree is the MMDiT itself).
    """
    lora.check_adapters(adapters)
    keys = _module_keys(config)
    lead = (root,) if root else ()
    state, modules = {}, []
    for path, _ in lora.targets:
        sub = path[len(lead) :]
        if path[: len(lead)] != lead or sub not in keys:
            raise ValueError(
                f"LoRA module {'/'.join(path)} has no diffusers name: only dense layers of the "
                f"MMDiT (under {root!r}) export to an SD3 LoRA file."
            )
        node = adapters
        for name in path:
            node = node[name]
        a, b = _host(node[LORA_A]), _host(node[LORA_B])
        names = keys[sub]
        for i, name in enumerate(names):
            ai, bi = (a[i], b[i]) if len(names) > 1 or a.ndim == 3 else (a, b)
            state[f"{PREFIX}.{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            state[f"{PREFIX}.{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
            modules.append(name)
    s = lora.settings
    metadata = {
        f"{PREFIX}.r": s.rank,
        f"{PREFIX}.lora_alpha": s.alpha,
        f"{PREFIX}.target_modules": sorted(modules),
    }
    return state, metadata


def save_adapters(
    config: MMDiTConfig, lora: LoRA, adapters: Mapping, path: str | os.PathLike, root: str = "mmdit"
) -> str:
    """Writes the adapters as a diffusers LoRA safetensors file; returns its path.

    `path` is a file (`*.safetensors`) or a folder (gets `pytorch_lora_weights.safetensors`,
    what `load_lora_weights(folder)` looks for). Process 0 writes.
    """
    state, metadata = to_diffusers_lora_state_dict(config, lora, adapters, root)
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path = os.path.join(path, WEIGHT_NAME)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(
            state, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2)}
        )
    return path


def load_adapters(
    config: MMDiTConfig, path: str | os.PathLike, root: str = "mmdit"
) -> tuple[LoRA, dict]:
    """Reads a diffusers SD3 LoRA file (PEFT keys) into `(LoRA, adapters)` for `config`.

    The adapters sit under `root` like the generator's MMDiT; `lora.merge(params,
    adapters)` applies them. Without adapter metadata, alpha = rank (PEFT's scale 1).

    Raises:
      ValueError: keys that are not LoRA factors of this config's dense layers,
        mixed ranks, or a scanned run whose layers are only partly adapted.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    with safe_open(path, framework="numpy") as f:
        raw_meta = (f.metadata() or {}).get(METADATA_KEY)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw_meta) if raw_meta else {}
    by_name: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(f"{PREFIX}.")
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                by_name.setdefault(name.removesuffix(suffix), {})[part] = value.astype(np.float32)
                break
        else:
            raise ValueError(f"{path}: key {key!r} is not a LoRA factor (lora_A / lora_B weight).")
    ranks = {v[LORA_A].shape[0] for v in by_name.values() if LORA_A in v}
    if len(ranks) != 1:
        raise ValueError(f"{path}: LoRA ranks {sorted(ranks)}; apt_jax takes one rank per file.")
    rank = ranks.pop()
    alpha = float(meta.get(f"{PREFIX}.lora_alpha", rank))
    lead = (root,) if root else ()
    adapters: dict = {}
    targets = []
    used = set()
    for sub, names in _module_keys(config).items():
        present = [n in by_name for n in names]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(
                f"{path} adapts only some layers of the scanned run {sub[0]}; load it with "
                "scan_layers=False (or adapt every layer of the run)."
            )
        a = [by_name[n][LORA_A].T for n in names]
        b = [by_name[n][LORA_B].T for n in names]
        stacked = _SCANNED.fullmatch(sub[0]) is not None
        a, b = (np.stack(a), np.stack(b)) if stacked else (a[0], b[0])
        node = adapters
        for name in lead + sub:
            node = node.setdefault(name, {})
        node[LORA_A], node[LORA_B] = jnp.asarray(a), jnp.asarray(b)
        kernel_shape = (*a.shape[:-1], b.shape[-1])
        targets.append((lead + sub, kernel_shape))
        used.update(names)
    unknown = sorted(set(by_name) - used)
    if unknown:
        raise ValueError(
            f"{path} has LoRA modules this MMDiTConfig lacks: {unknown[:10]} "
            f"({len(unknown)} in all)."
        )
    names = tuple("/".join(p) for p, _ in sorted(targets))
    settings = LoRASettings(rank=rank, alpha=alpha, target_modules=names)
    lora = LoRA(settings, tuple(sorted(targets)))
    return lora, adapters


def save_merged(
    config: MMDiTConfig,
    lora: LoRA,
    params: Mapping,
    adapters: Mapping,
    path: str | os.PathLike,
    root: str = "mmdit",
    **save_kwargs: Any,
) -> None:
    """Merges the adapters into the base weights and writes an SD3 transformer folder
    (`apt_jax.convert.diffusers_sd3.save`; `save_kwargs`: dtype, max_shard_size)."""
    merged = lora.merge(params, adapters)
    mmdit = merged[root] if root else merged
    # The merged kernels are float32 (see `LoRA.merge`); store them in the config's dtype.
    mmdit = jax.tree.map(lambda x: x.astype(config.storage_dtype), mmdit)
    diffusers_sd3.save(config, mmdit, path, **save_kwargs)
