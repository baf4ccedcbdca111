"""MMDiT parameters as an orbax checkpoint: the format recipes start from.

    save_params("ckpt/sd3-medium", config, params)
    config, params = load_params("ckpt/sd3-medium")                  # default device
    config, params = load_params("ckpt/sd3-medium", abstract_params=target)  # sharded

A checkpoint is a folder holding

    mmdit_config.json   `MMDiTConfig.to_dict()`: the architecture and its
                        execution fields (scan_layers fixes the tree layout)
    params/             an orbax `StandardCheckpointer` checkpoint of the
                        MMDiT parameter tree (unboxed, as `MMDiT.init` makes it)

`config.init_from` points at such a folder; `launch/convert.py` writes one
from a diffusers SD3 transformer folder and turns one back into diffusers.

Restoring goes straight onto the target shardings (each host reads only its
shards), so a 2B-parameter model never has to fit on one device. Every host of
a multi-host job calls `save_params` / `load_params` with the same arguments
(orbax synchronises them); only process 0 writes the JSON.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from apt_jax.errors import UserError
from apt_jax.models.config import MMDiTConfig
from apt_jax.models.mmdit import abstract_params as config_abstract_params
from apt_jax.models.partitioning import unbox
from apt_jax.paths import as_path

__all__ = ["save_params", "load_params", "read_mmdit_config", "CONFIG_NAME", "PARAMS_DIR"]

CONFIG_NAME = "mmdit_config.json"
PARAMS_DIR = "params"
# How many offending key paths a mismatch error lists.
_MAX_LISTED = 10
_SCANNED = re.compile(r"transformer_blocks_\d+_\d+")


def _flat(tree: Any) -> dict[str, Any]:
    """`{"a/b/c": leaf}` for a nested-dict pytree (orbax metadata or arrays)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p): x
        for p, x in leaves
    }


def _listing(items) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _mismatch(
    have: dict[str, Any], want: dict[str, Any], have_name: str, want_name: str, hint: str = ""
) -> str | None:
    """A message listing key paths / shapes that differ, or None if they agree."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    misshaped = [
        f"{k}: {tuple(have[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in have and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{have_name} does not match {want_name}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key path(s): {_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key path(s): {_listing(unexpected)}")
    if misshaped:
        lines.append(f"  {len(misshaped)} shape mismatch(es) (have vs want): {_listing(misshaped)}")
    if hint:
        lines.append("  " + hint)
    return "\n".join(lines)


def _layout_hint(config: MMDiTConfig, keys) -> str:
    scanned = any(_SCANNED.fullmatch(k.split("/")[0]) for k in keys)
    if scanned != config.scan_layers:
        return (
            f"The tree looks {'scanned' if scanned else 'unrolled'} but scan_layers="
            f"{config.scan_layers}; convert with apt_jax.models.stack_layers / unstack_layers "
            "or fix the config."
        )
    return ""


def save_params(
    path: str | os.PathLike, config: MMDiTConfig, params: Any, *, overwrite: bool = False
) -> None:
    """Writes `params` (laid out for `config`) and `config` to the folder `path`.

    Synchronous: the checkpoint is complete (and finalised atomically by orbax)
    when this returns.

    Args:
      path: output folder (local or `gs://`).
      config: the architecture `params` belong to.
      params: the MMDiT parameter tree (jax arrays, sharded or not, or numpy).
      overwrite: replace an existing checkpoint at `path`.

    Raises:
      ValueError: `params` do not fit `config` (key paths / shapes listed).
      FileExistsError: `path` already holds a checkpoint and not `overwrite`.
    """
    if not isinstance(config, MMDiTConfig):
        raise TypeError(f"config must be an MMDiTConfig, got {type(config).__name__}.")
    want = _flat(config_abstract_params(config))
    have = _flat(params)
    if msg := _mismatch(have, want, "params", "the MMDiTConfig's tree", _layout_hint(config, have)):
        raise UserError(msg)
    folder = as_path(path)
    params_dir = folder / PARAMS_DIR
    if (params_dir.exists() or (folder / CONFIG_NAME).exists()) and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a params checkpoint; pass overwrite=True or pick another path."
        )
    folder.mkdir(parents=True, exist_ok=True)  # every host: orbax needs the parent
    if jax.process_index() == 0 and (folder / CONFIG_NAME).exists():
        (folder / CONFIG_NAME).unlink()  # overwrite: the JSON marks finished params
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params, force=overwrite)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        # Written after the arrays: a folder with the JSON holds finished params.
        tmp = folder / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.rename(folder / CONFIG_NAME)


def _read_config(folder: epath.Path) -> MMDiTConfig:
    if not folder.exists():
        raise FileNotFoundError(f"Params checkpoint {folder} does not exist.")
    if not folder.is_dir():
        raise FileNotFoundError(f"Params checkpoint {folder} is not a folder.")
    config_file = folder / CONFIG_NAME
    if not config_file.exists():
        hint = ""
        if (folder / "config.json").exists():
            hint = (
                " It looks like a diffusers folder: convert it first with "
                f"`python launch/convert.py --diffusers {folder} --out CKPT`."
            )
        elif (folder / "checkpoints").exists():
            hint = (
                " It looks like a training run's workdir: open it with "
                "apt_jax.tasks.runs.load_run, or export its generator with "
                f"`python launch/convert.py --to-diffusers --workdir {folder} --out DIR`."
            )
        elif (folder / "_CHECKPOINT_METADATA").exists():
            hint = f" It looks like a bare orbax checkpoint; pass its parent holding {CONFIG_NAME}."
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {folder}: not an apt_jax params checkpoint (or its save "
            f"did not finish).{hint}"
        )
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(fields, dict):
        raise UserError(f"{config_file} must hold a JSON object of MMDiTConfig fields.")
    try:
        return MMDiTConfig(**fields)
    except TypeError as e:
        raise UserError(f"{config_file} has fields MMDiTConfig does not know: {e}") from e


def read_mmdit_config(path: str | os.PathLike) -> MMDiTConfig:
    """The `MMDiTConfig` of a checkpoint, from its JSON alone (no arrays are read).

    Raises:
      FileNotFoundError / ValueError: as `load_params`.
    """
    return _read_config(as_path(path))


def load_params(path: str | os.PathLike, *, abstract_params: Any = None) -> tuple[MMDiTConfig, Any]:
    """Reads a checkpoint written by `save_params`.

    Args:
      path: the checkpoint folder.
      abstract_params: target tree of `jax.ShapeDtypeStruct` (or arrays) whose
        `.sharding` says where each leaf goes and whose dtype it is cast to,
        e.g. the unboxed `jax.eval_shape` of the init plus
        `apt_jax.models.partitioning.logical_shardings`. None: the saved dtypes,
        every leaf on the default device.

    Returns:
      `(config, params)`, params a pytree of `jax.Array`.

    Raises:
      FileNotFoundError: no folder, no `mmdit_config.json` or no `params/`.
      ValueError: bad JSON; the saved tree does not fit the config, or does
        not fit `abstract_params` (missing / unexpected key paths and shape
        mismatches listed).
    """
    folder = as_path(path)
    config = _read_config(folder)
    params_dir = folder / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(
            f"{folder} has {CONFIG_NAME} but no {PARAMS_DIR}/ folder: the save did not "
            "finish or the folder was copied partially."
        )
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(params_dir)
        tree = metadata.item_metadata
        tree = getattr(tree, "tree", tree)
        saved = _flat(tree)
        want = _flat(config_abstract_params(config))
        if msg := _mismatch(
            saved,
            want,
            f"The params saved in {params_dir}",
            f"its {CONFIG_NAME}",
            _layout_hint(config, saved),
        ):
            raise UserError(msg)
        if abstract_params is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree
            )
        else:
            abstract_params = unbox(abstract_params)  # boxed eval_shape output works too
            target_flat = _flat(abstract_params)
            if msg := _mismatch(
                saved,
                target_flat,
                f"The params saved in {params_dir}",
                "abstract_params",
                _layout_hint(config, target_flat),
            ):
                raise UserError(msg)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    tuple(x.shape), x.dtype, sharding=getattr(x, "sharding", None) or device
                ),
                abstract_params,
            )
        params = ckptr.restore(params_dir, target)
    return config, params
