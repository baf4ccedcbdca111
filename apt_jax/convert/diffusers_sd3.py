"""diffusers `SD3Transformer2DModel` <-> apt_jax MMDiT weights (safetensors only).

    config, params = load("sd3.5-medium/transformer", dtype="bfloat16",
                          shardings=param_shardings, scan_layers=True)
    save(config, params, "out/transformer", dtype="bfloat16", max_shard_size="5GB")

The apt_jax parameter tree mirrors diffusers' module names, so the mapping is a
renaming plus layout changes:

    apt_jax (unrolled)                      diffusers state dict
    pos_embed/kernel (p, p, C, D) HWIO      pos_embed.proj.weight (D, C, p, p) OIHW
    <module>/kernel (in, out)               <module>.weight (out, in)
    <module>/bias, .../norm_q/scale         <module>.bias, ....norm_q.weight
    transformer_blocks_{i}                  transformer_blocks.{i}
    .../to_out                              .../to_out.0
    ff/fc_in, ff/fc_out                     ff.net.0.proj, ff.net.2
    (recomputed from the config)            pos_embed.pos_embed (1, M*M, D) buffer

The adaLN chunk orders are diffusers' (six / nine chunks for `norm1`, and
(scale, shift) for `norm_out` and the last block's `norm1_context`), so no
chunk is permuted. A video config with `patch_size_t=1` reads and writes SD3
image checkpoints too (its kernel gains / loses a leading axis of 1).

Pickle (`.bin`, `.pt`, `.ckpt`) is never read: unpickling runs code.

Why one file of ~800 lines: `load` and `save` are the two directions of one
name-and-layout mapping (the table above); kept side by side, every rule has
its inverse a few lines away, and the parity tests hold them to each other.

Memory: `load` streams one tensor at a time from the memory-mapped files,
converts and casts it on the host and puts it on its devices before the next
one (with `scan_layers=True` one stacked leaf, i.e. one tensor of every layer of
a run, is the most held on the host at once). `save` fetches and writes one
tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from apt_jax.models.config import DTYPES, MMDiTConfig
from apt_jax.models.embeddings import sd3_pos_table
from apt_jax.models.mmdit import abstract_params, layer_runs

__all__ = [
    "load",
    "save",
    "to_diffusers_state_dict",
    "from_diffusers_state_dict",
    "config_from_diffusers",
    "config_to_diffusers",
]

log = logging.getLogger(__name__)

CLASS_NAME = "SD3Transformer2DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
POS_TABLE_KEY = "pos_embed.pos_embed"
# The diffusers version whose SD3 config carries every field below (SD3.5).
_MIN_DIFFUSERS_VERSION = "0.31.0"
# `SD3Transformer2DModel.__init__` arguments, all of them `MMDiTConfig` fields.
SD3_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_VARIANT_RE = re.compile(
    r"diffusion_pytorch_model(?:\.safetensors\.index)?\.(\w+)\.(?:safetensors|json)"
)
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "F8_E4M3": jnp.float8_e4m3fn,
    "F8_E5M2": jnp.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

Path = tuple[str, ...]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
def config_from_diffusers(diffusers_config: Mapping[str, Any], **overrides: Any) -> MMDiTConfig:
    """`MMDiTConfig` from a diffusers `config.json` dict (+ MMDiTConfig field overrides).

    Raises ValueError if the dict is not an `SD3Transformer2DModel` config; warns
    about (and ignores) keys apt_jax does not know, since they may change the
    architecture.
    """
    class_name = diffusers_config.get("_class_name")
    if class_name != CLASS_NAME:
        raise ValueError(
            f"config.json has _class_name={class_name!r}: not an SD3 transformer "
            f"(expected {CLASS_NAME!r}). For a pipeline folder pass its 'transformer' "
            "subfolder."
        )
    fields = {k: v for k, v in diffusers_config.items() if k in SD3_FIELDS}
    unknown = sorted(k for k in diffusers_config if k not in SD3_FIELDS and not k.startswith("_"))
    if unknown:
        warnings.warn(
            f"config.json keys {unknown} are not SD3Transformer2DModel fields apt_jax knows; "
            "they are ignored. If they change the architecture, the loaded model differs "
            "from diffusers'.",
            stacklevel=3,
        )
    return MMDiTConfig(**{**fields, **overrides})


def config_to_diffusers(config: MMDiTConfig) -> dict[str, Any]:
    """The diffusers `config.json` dict of `config` (apt_jax-only fields dropped)."""
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = _MIN_DIFFUSERS_VERSION
    out: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": version}
    for name in SD3_FIELDS:
        value = getattr(config, name)
        out[name] = list(value) if name == "dual_attention_layers" else value
    return out


# ----------------------------------------------------------------------------
# Key and layout mapping
# ----------------------------------------------------------------------------
_RENAMES = {"to_out": ("to_out", "0"), "fc_in": ("net", "0", "proj"), "fc_out": ("net", "2")}
_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def _diffusers_key(path: Path) -> str:
    """Unrolled apt_jax parameter path -> diffusers state-dict key."""
    parts: list[str] = []
    for name in path[:-1]:
        m = re.fullmatch(r"transformer_blocks_(\d+)", name)
        if m:
            parts += ["transformer_blocks", m.group(1)]
        else:
            parts += _RENAMES.get(name, (name,))
    if path[0] == "pos_embed":
        parts.append("proj")
    if path[-1] not in _LEAVES:
        raise ValueError(f"No diffusers name for apt_jax parameter {'/'.join(path)}.")
    return ".".join(parts + [_LEAVES[path[-1]]])


def _is_patch_kernel(path: Path) -> bool:
    return path == ("pos_embed", "kernel")


def _torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """diffusers shape of an apt_jax leaf of `shape`."""
    if _is_patch_kernel(path):
        if len(shape) == 5:  # (1, p, p, C, D): a one-frame temporal patch
            shape = shape[1:]
        p, q, c, d = shape
        return (d, c, p, q)
    if path[-1] == "kernel":
        return tuple(reversed(shape))
    return tuple(shape)


def _to_apt(path: Path, x: np.ndarray, target_ndim: int) -> np.ndarray:
    """diffusers tensor -> apt_jax layout."""
    if _is_patch_kernel(path):
        x = x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        return x[None] if target_ndim == 5 else x
    if path[-1] == "kernel":
        return x.T
    return x


def _to_torch(path: Path, x: np.ndarray) -> np.ndarray:
    """apt_jax leaf -> diffusers layout."""
    if _is_patch_kernel(path):
        if x.ndim == 5:
            x = x[0]
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if path[-1] == "kernel":
        return x.T
    return x


def _pos_table(config: MMDiTConfig) -> np.ndarray:
    m, d = config.pos_embed_max_size, config.inner_dim
    base = config.sample_size // config.patch_size
    return sd3_pos_table(d, m, m, base).reshape(1, m * m, d)


@dataclasses.dataclass
class _Entry:
    """One leaf of the apt_jax tree and the diffusers tensor(s) it is made of."""

    target: Path  # path in the (possibly scanned) apt_jax tree
    paths: list[Path]  # unrolled apt_jax path per source tensor
    keys: list[str]  # diffusers key per source tensor (one per layer when stacked)
    shape: tuple[int, ...]  # shape of the target leaf
    stacked: bool


def _flatten(tree: Any) -> dict[Path, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    return {tuple(str(getattr(k, "key", k)) for k in kp): leaf for kp, leaf in flat}


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return out


def _check_convertible(config: MMDiTConfig) -> None:
    if config.patch_size_t not in (None, 1):
        raise ValueError(
            f"patch_size_t={config.patch_size_t}: SD3 checkpoints have 2D patches, so only "
            "image configs (patch_size_t=None) or one-frame temporal patches "
            "(patch_size_t=1) convert to / from diffusers."
        )


def _plan(config: MMDiTConfig) -> tuple[list[_Entry], dict[str, tuple[int, ...]]]:
    """The leaves of `config`'s tree (scanned or not) and the diffusers shapes they need."""
    _check_convertible(config)
    unrolled = _flatten(abstract_params(config.replace(scan_layers=False)))
    stacked_in: dict[str, tuple[str, int, int]] = {}
    if config.scan_layers:
        for run in layer_runs(config):
            if run.is_scanned_in:
                n = run.stop - run.start
                for k, i in enumerate(range(run.start, run.stop)):
                    stacked_in[run.block_name(i)] = (run.scanned_name, k, n)
    entries: dict[Path, _Entry] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for path, leaf in unrolled.items():
        key = _diffusers_key(path)
        expected[key] = _torch_shape(path, tuple(leaf.shape))
        if path[0] in stacked_in:
            name, k, n = stacked_in[path[0]]
            target = (name,) + path[1:]
            if target not in entries:
                shape = (n,) + tuple(leaf.shape)
                entries[target] = _Entry(target, [()] * n, [""] * n, shape, True)
            entries[target].paths[k] = path
            entries[target].keys[k] = key
        else:
            entries[path] = _Entry(path, [path], [key], tuple(leaf.shape), False)
    if config.pos_embed_max_size is not None:
        m = config.pos_embed_max_size
        expected[POS_TABLE_KEY] = (1, m * m, config.inner_dim)
    return list(entries.values()), expected


# ----------------------------------------------------------------------------
# Diagnosing a checkpoint that does not fit the config
# ----------------------------------------------------------------------------
def _infer_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Config values a diffusers state dict implies, from tensor shapes alone."""
    out: dict[str, Any] = {}
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    if blocks:
        out["num_layers"] = max(blocks) + 1
    out["dual_attention_layers"] = tuple(
        sorted(
            {
                int(m.group(1))
                for k in shapes
                if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))
            }
        )
    )
    out["qk_norm"] = "rms_norm" if any(".attn.norm_q." in k for k in shapes) else None
    if (s := shapes.get("context_embedder.weight")) and len(s) == 2:
        out["caption_projection_dim"], out["joint_attention_dim"] = s
    if (s := shapes.get("time_text_embed.text_embedder.linear_1.weight")) and len(s) == 2:
        out["pooled_projection_dim"] = s[1]
    if (s := shapes.get("pos_embed.proj.weight")) and len(s) == 4:
        out["in_channels"], out["patch_size"] = s[1], s[2]
        inner = s[0]
        if (s2 := shapes.get("proj_out.weight")) and len(s2) == 2 and s2[0] % (s[2] ** 2) == 0:
            out["out_channels"] = s2[0] // s[2] ** 2
        head = next((v[0] for k, v in shapes.items() if k.endswith(".attn.norm_q.weight")), None)
        if head:
            out["attention_head_dim"] = head
            if inner % head == 0:
                out["num_attention_heads"] = inner // head
        else:
            out["num_attention_heads * attention_head_dim"] = inner
    if (s := shapes.get(POS_TABLE_KEY)) and len(s) == 3:
        side = int(round(s[1] ** 0.5))
        out["pos_embed_max_size"] = side if side * side == s[1] else s[1]
    elif shapes:
        out["pos_embed_max_size"] = None
    return out


def _rule_hint(key: str) -> str:
    """The config field a bad key most likely points at, from its name."""
    rules = (
        (r"\.attn2\.", "dual_attention_layers"),
        (r"norm_(added_)?[qk]\.", "qk_norm / attention_head_dim"),
        (r"^pos_embed\.pos_embed$", "pos_embed_max_size"),
        (r"^pos_embed\.proj", "patch_size / in_channels / num_attention_heads"),
        (r"^proj_out", "patch_size / out_channels"),
        (r"^context_embedder", "joint_attention_dim / caption_projection_dim"),
        (r"text_embedder\.linear_1", "pooled_projection_dim"),
        (r"\.norm1\.linear", "dual_attention_layers"),
        (r"(norm1_context|to_add_out|ff_context)", "num_layers"),
    )
    for pattern, field in rules:
        if re.search(pattern, key):
            return field
    return "num_attention_heads / attention_head_dim"


def _mismatch_error(
    config: MMDiTConfig,
    where: str,
    expected: Mapping[str, tuple[int, ...]],
    actual: Mapping[str, tuple[int, ...]],
) -> ValueError | None:
    missing = sorted(k for k in expected if k not in actual)
    unexpected = sorted(k for k in actual if k not in expected)
    misshaped = sorted(k for k in expected if k in actual and tuple(actual[k]) != expected[k])
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{where} does not match the MMDiTConfig it is loaded with:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {title} keys (first 10): {', '.join(keys[:10])}")
    if misshaped:
        shown = [f"{k} {tuple(actual[k])} != expected {expected[k]}" for k in misshaped[:10]]
        lines.append(f"  {len(misshaped)} mis-shaped keys (first 10): {'; '.join(shown)}")
    implied = _infer_fields(actual)
    diffs = []
    for field, value in implied.items():
        if field == "num_attention_heads * attention_head_dim":
            if value != config.inner_dim:
                diffs.append(f"{field} (config {config.inner_dim}, checkpoint {value})")
        elif getattr(config, field) != value:
            diffs.append(
                f"{field} (config {getattr(config, field)!r}, checkpoint looks like {value!r})"
            )
    if not diffs:
        fields = dict.fromkeys(_rule_hint(k) for k in missing + unexpected + misshaped)
        diffs = list(fields)
    lines.append("  Config field(s) that probably mismatch: " + "; ".join(diffs) + ".")
    return ValueError("\n".join(lines))


def _check_pos_table(config: MMDiTConfig, table: np.ndarray) -> None:
    expected = _pos_table(config)
    err = float(np.max(np.abs(table.astype(np.float32) - expected)))
    tol = max(1e-5, float(jnp.finfo(table.dtype).eps))
    if not err <= tol:
        raise ValueError(
            f"{POS_TABLE_KEY} differs by {err:.3g} (> {tol:.1g}) from the 2D sin-cos table "
            f"apt_jax computes for sample_size={config.sample_size}, patch_size="
            f"{config.patch_size}, pos_embed_max_size={config.pos_embed_max_size} (base grid "
            f"{config.sample_size // config.patch_size}). apt_jax recomputes this table, so "
            "the checkpoint's config.json (sample_size / patch_size) probably disagrees with "
            "its weights, or the table was modified."
        )


# ----------------------------------------------------------------------------
# Conversion core
# ----------------------------------------------------------------------------
def _convert(
    config: MMDiTConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    dtype: np.dtype,
    place: Callable[[Path, np.ndarray], Any],
    where: str,
) -> dict:
    entries, expected = _plan(config)
    if error := _mismatch_error(config, where, expected, shapes):
        raise error
    if POS_TABLE_KEY in expected:
        _check_pos_table(config, read(POS_TABLE_KEY))
    flat = {}
    for entry in entries:
        if entry.stacked:
            out = np.empty(entry.shape, dtype)
            for k, (path, key) in enumerate(zip(entry.paths, entry.keys, strict=True)):
                out[k] = _to_apt(path, read(key), len(entry.shape) - 1)
        else:
            out = _to_apt(entry.paths[0], read(entry.keys[0]), len(entry.shape)).astype(dtype)
        flat[entry.target] = place(entry.target, np.ascontiguousarray(out))
    return _unflatten(flat)


def from_diffusers_state_dict(config: MMDiTConfig, tensors: Mapping[str, Any]) -> dict:
    """diffusers state dict (name -> array) -> apt_jax params, as numpy arrays.

    Leaves are cast to `config.param_dtype` and laid out for `config`
    (stacked when `config.scan_layers`). Raises ValueError listing missing,
    unexpected and mis-shaped keys, or if `pos_embed.pos_embed` is not the table
    apt_jax computes.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    return _convert(
        config,
        shapes,
        lambda k: np.asarray(tensors[k]),
        config.storage_dtype,
        lambda path, x: x,
        "The state dict",
    )


def _iter_torch_tensors(
    config: MMDiTConfig, params: Mapping
) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(diffusers key, shape, fetch) per tensor, in model order; fetch converts one leaf."""
    entries, expected = _plan(config)
    flat = _flatten(params)
    got = {p: tuple(np.shape(x)) for p, x in flat.items()}
    want = {e.target: e.shape for e in entries}
    if got != want:
        missing = sorted("/".join(p) for p in want if p not in got)
        extra = sorted("/".join(p) for p in got if p not in want)
        shaped = sorted(
            f"{'/'.join(p)} {got[p]} != {want[p]}" for p in want if p in got and got[p] != want[p]
        )
        hint = ""
        if (
            any(re.fullmatch(r"transformer_blocks_\d+_\d+", p[0]) for p in got)
            != config.scan_layers
        ):
            hint = f" The params' layout does not match scan_layers={config.scan_layers}."
        raise ValueError(
            f"params do not match the config: missing {missing[:10]}, unexpected {extra[:10]}, "
            f"mis-shaped {shaped[:10]}.{hint}"
        )
    for entry in entries:
        for k, (path, key) in enumerate(zip(entry.paths, entry.keys, strict=True)):
            leaf = flat[entry.target]

            def fetch(leaf=leaf, k=k, path=path, stacked=entry.stacked):
                x = _host(leaf[k] if stacked else leaf)
                return np.ascontiguousarray(_to_torch(path, x))

            yield key, expected[key], fetch
    if POS_TABLE_KEY in expected:
        yield POS_TABLE_KEY, expected[POS_TABLE_KEY], lambda: _pos_table(config)


def _host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def to_diffusers_state_dict(config: MMDiTConfig, params: Mapping) -> dict[str, np.ndarray]:
    """apt_jax params (laid out for `config`) -> diffusers state dict of numpy arrays.

    Leaves keep their dtype; `pos_embed.pos_embed` (float32) is added when the
    config has a `pos_embed_max_size`.
    """
    return {key: fetch() for key, _, fetch in _iter_torch_tensors(config, params)}


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------
def _resolve_folder(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a folder (expected a diffusers transformer folder)."
        )
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        sub = os.path.join(path, "transformer")
        if os.path.exists(os.path.join(sub, CONFIG_NAME)):
            log.info("Reading the pipeline's transformer from %s.", sub)
            return sub
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r}: not a diffusers model folder.")
    return path


def _weight_files(folder: str, variant: str | None) -> dict[str, str]:
    """key -> file for the folder's safetensors weights (single file or sharded)."""
    names = set(os.listdir(folder))
    suffix = f".{variant}" if variant else ""
    candidates = [
        f"diffusion_pytorch_model.safetensors.index{suffix}.json",
        f"diffusion_pytorch_model{suffix}.safetensors",
    ]
    if variant is None and not any(c in names for c in candidates):
        # No variant asked and no plain weights: take the only variant present.
        variants = sorted({m.group(1) for n in names if (m := _VARIANT_RE.fullmatch(n))})
        if len(variants) > 1:
            raise ValueError(f"{folder!r} holds the weight variants {variants}; pass variant=.")
        if variants:
            return _weight_files(folder, variants[0])
    index = next((c for c in candidates if c in names and c.endswith(".json")), None)
    if index is not None:
        with open(os.path.join(folder, index)) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
    elif candidates[1] in names:
        shard_names = [candidates[1]]
    else:
        pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"{folder!r} holds only pickle weights {pickles[:5]}; apt_jax refuses pickle "
                "(loading it can run arbitrary code). Convert it to safetensors once, in an "
                "environment you trust: `SD3Transformer2DModel.from_pretrained(folder)"
                ".save_pretrained(out_folder, safe_serialization=True)`."
            )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} (or sharded index) in {folder!r}.")
    files = {}
    for name in shard_names:
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise FileNotFoundError(
                f"Shard {name!r} listed in the index is missing from {folder!r}."
            )
        with safe_open(file, framework="numpy") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


@functools.lru_cache(maxsize=8)
def _header(file: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    del mtime_ns, size  # cache keys: a rewritten file is read again
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return 8 + header_len, json.loads(f.read(header_len))


def _read_raw(file: str, key: str) -> np.ndarray:
    """One tensor read straight from the file: for dtypes numpy lacks (bfloat16, fp8)."""
    stat = os.stat(file)
    start, header = _header(file, stat.st_mtime_ns, stat.st_size)
    info = header[key]
    begin, end = info["data_offsets"]
    with open(file, "rb") as f:
        f.seek(start + begin)
        data = np.frombuffer(f.read(end - begin), dtype=_ST_DTYPES[info["dtype"]])
    return data.reshape(info["shape"])


def load(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    shardings: Any = None,
    scan_layers: bool = False,
    variant: str | None = None,
    **config_overrides: Any,
) -> tuple[MMDiTConfig, dict]:
    """Reads a diffusers `SD3Transformer2DModel` folder into apt_jax.

    Args:
      path: the folder with `config.json` and `diffusion_pytorch_model*.safetensors`
        (a single file, or shards with their `.index.json`); a pipeline folder
        is read from its `transformer/` subfolder.
      dtype: the parameters' dtype (e.g. "bfloat16"); also sets
        `config.param_dtype`. None: `config.param_dtype` (float32 unless overridden).
      shardings: where each leaf goes: None (default device), one
        `jax.sharding.Sharding` for all leaves, a pytree matching the returned
        params of shardings (or of arrays / ShapeDtypeStructs carrying
        `.sharding`), or a callable `path tuple -> Sharding`.
      scan_layers: return the stacked layout of `config.scan_layers=True`.
      variant: weight variant ("fp16" for `*.fp16.safetensors`); None takes the
        plain files, or the only variant present.
      **config_overrides: other `MMDiTConfig` fields (remat_policy, dtype, ...).

    Returns:
      `(config, params)`, params a pytree of `jax.Array`.

    Raises:
      ValueError: not an SD3 transformer; pickle-only folder; checkpoint keys or
        shapes that do not fit the config (one error listing them and naming
        the config field that probably mismatches); a position table that is
        not SD3's.
      FileNotFoundError: no config or weights.
    """
    folder = _resolve_folder(path)
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        raw_config = json.load(f)
    overrides = dict(config_overrides, scan_layers=scan_layers)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        if "param_dtype" in overrides and overrides["param_dtype"] != name:
            raise ValueError(
                f"dtype={name!r} contradicts param_dtype={overrides['param_dtype']!r}."
            )
        if name in DTYPES:
            overrides["param_dtype"] = name
    config = config_from_diffusers(raw_config, **overrides)
    target_dtype = jnp.dtype(dtype) if dtype is not None else config.storage_dtype
    files = _weight_files(folder, variant)
    place = _placer(shardings, config)

    with contextlib.ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(file, framework="numpy"))
            for file in set(files.values())
        }
        slices = {key: handles[file].get_slice(key) for key, file in files.items()}
        shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}

        def read(key: str) -> np.ndarray:
            if slices[key].get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
                return _read_raw(files[key], key)
            return handles[files[key]].get_tensor(key)

        params = _convert(
            config, shapes, read, target_dtype, place, f"The checkpoint in {folder!r}"
        )
    return config, params


def _placer(shardings: Any, config: MMDiTConfig) -> Callable[[Path, np.ndarray], jax.Array]:
    if shardings is None:
        return lambda path, x: jax.device_put(x)
    if isinstance(shardings, jax.sharding.Sharding):
        lookup = lambda path: shardings
    elif callable(shardings) and not isinstance(shardings, Mapping):
        lookup = shardings
    else:
        flat = {p: getattr(s, "sharding", s) for p, s in _flatten(shardings).items()}
        want = {e.target for e in _plan(config)[0]}
        if set(flat) != want:
            missing = sorted("/".join(p) for p in want - set(flat))
            extra = sorted("/".join(p) for p in set(flat) - want)
            raise ValueError(
                f"shardings do not match the params of this config (scan_layers="
                f"{config.scan_layers}): missing {missing[:10]}, unexpected {extra[:10]}."
            )
        lookup = flat.__getitem__

    def place(path: Path, x: np.ndarray) -> jax.Array:
        sharding = lookup(path)
        if sharding is None:
            return jax.device_put(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes (int) or e.g. '5GB', '500MB'.")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[m.group(2) or "B"])


def _write_safetensors(file: str, items: list, dtype: np.dtype, write: bool) -> None:
    """Writes tensors one at a time (header first: shapes are known up front)."""
    st_dtype = _NP_TO_ST[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, _ in items:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[key] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    if not write:  # other hosts still take part in every gather
        for _, _, fetch in items:
            fetch()
        return
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape, fetch in items:
            x = fetch().astype(dtype.newbyteorder("<"), copy=False)
            if x.shape != tuple(shape):
                raise AssertionError(f"{key}: {x.shape} != {shape}")
            f.write(np.ascontiguousarray(x).tobytes())
    os.replace(tmp, file)


def save(
    config: MMDiTConfig,
    params: Mapping,
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    max_shard_size: int | str | None = None,
) -> None:
    """Writes a folder `SD3Transformer2DModel.from_pretrained(path)` loads.

    Args:
      config: the architecture; `params` must be in its layout (scanned or not).
      params: the apt_jax parameters (numpy or jax arrays, sharded ones too;
        on several hosts every process calls `save` and process 0 writes).
      path: output folder (created; earlier weights there are replaced).
      dtype: dtype of the written tensors ("float32", "bfloat16", "float16").
      max_shard_size: bytes (int) or "5GB"-style string; None writes one file,
        otherwise shards `diffusion_pytorch_model-0000i-of-0000n.safetensors`
        plus `diffusion_pytorch_model.safetensors.index.json`.
    """
    out_dtype = np.dtype(jnp.dtype(dtype))
    if out_dtype not in _NP_TO_ST or not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"dtype={dtype!r}: use float32, bfloat16 or float16.")
    items = list(_iter_torch_tensors(config, params))
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = int(np.prod(item[1])) * out_dtype.itemsize
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    write = jax.process_index() == 0
    folder = os.fspath(path)
    if write:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # stale weights would shadow or mix with ours
            if re.fullmatch(
                r"diffusion_pytorch_model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", name
            ):
                os.remove(os.path.join(folder, name))
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config_to_diffusers(config), f, indent=2, sort_keys=True)
            f.write("\n")
    if len(shards) == 1:
        _write_safetensors(os.path.join(folder, WEIGHTS_NAME), shards[0], out_dtype, write)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(folder, name), shard, out_dtype, write)
        for key, shape, _ in shard:
            weight_map[key] = name
            total += int(np.prod(shape)) * out_dtype.itemsize
    if write:
        with open(os.path.join(folder, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
