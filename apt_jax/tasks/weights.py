"""Where a stage's weights come from, and which of them are the generator's.

Starting weights are named by config keys, and the key says what it names:
`*_workdir` keys (`teacher_workdir`, `generator_workdir`, `init_workdir`) a
training run, whose served weights (EMA, adapters merged) are taken;
`*init_from` keys (`init_from`, `generator_init_from`) a params checkpoint
`launch/convert.py` wrote, holding an MMDiT alone (`{"mmdit": ...}`).
`check_start` validates either from its stored config alone (before
anything compiles); `load_start` reads the weights.

`GeneratorWeights` is the other direction: what a finished run's generator
is, whichever state layout its stage keeps (a plain or LoRA `TrainState`,
a distillation student whose LoRA base is the teacher). Exporters and later
stages ask the task for it (`Task.generator_weights`) instead of knowing
those layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from jax.sharding import Mesh

from apt_jax.convert.params_checkpoint import load_params, read_mmdit_config
from apt_jax.data import registry
from apt_jax.errors import UserError
from apt_jax.lora import LoRA
from apt_jax.paths import as_path
from apt_jax.tasks.runs import RUNTIME_FIELDS, load_run
from apt_jax.train.checkpoint import read_config
from apt_jax.train.config import mmdit_config
from apt_jax.train.lora_state import LoRATrainState
from apt_jax.train.state import TrainState

# Config keys naming a converted checkpoint; every other source key names a run.
CHECKPOINT_KEYS = ("init_from", "generator_init_from")

# A source may differ from the run in how the network runs (`RUNTIME_FIELDS`). A
# converted checkpoint may also differ in its stored dtype (cast on restore), but
# not in its layer layout; a run's layout (scanned or not) is its own task's
# business, its parameter dtype is not.
_FREE_VS_CHECKPOINT = (*RUNTIME_FIELDS, "param_dtype")
_FREE_VS_RUN = (*RUNTIME_FIELDS, "scan_layers")


@dataclasses.dataclass(frozen=True)
class GeneratorWeights:
    """A run's generator.

    Attributes:
      trained: the tree the stage trains for it (EMA or raw): full params, or
        LoRA adapters over `base`.
      base: the frozen weights the adapters apply to (None without LoRA).
      lora: the adapters' `apt_jax.lora.LoRA` (None without LoRA).
    """

    trained: Any
    base: Any = None
    lora: LoRA | None = None

    def full(self) -> Any:
        """The weights the generator runs with (adapters merged onto the base)."""
        return self.trained if self.lora is None else self.lora.merge(self.base, self.trained)


def state_weights(state: TrainState, ema: bool, base: Any = None, lora: LoRA | None = None):
    """`GeneratorWeights` of a role's TrainState: its EMA (`ema`) or trained tree.
    A `LoRATrainState` brings its own base and LoRA; pass them for a plain state
    whose params are adapters over weights kept elsewhere (distillation)."""
    trained = state.ema_params if ema else state.params
    if trained is None:
        raise UserError("This run keeps no EMA weights; export the trained ones (--noema).")
    if isinstance(state, LoRATrainState):
        base, lora = state.base, state.lora
    return GeneratorWeights(trained, base, lora)


# ------------------------------------------------------------ source checks
def is_checkpoint_key(key: str) -> bool:
    return key in CHECKPOINT_KEYS


def run_config(workdir: str, key: str = "teacher_workdir") -> ml_collections.ConfigDict:
    """The stored config of the run in `workdir`, named by `config.<key>`; errors say how to fix."""
    if not workdir:
        raise UserError(f"config.{key} is empty: pass --config.{key}=DIR.")
    if not (as_path(workdir) / "checkpoints").is_dir():
        raise UserError(
            f"config.{key}={workdir!r} holds no checkpoints; train that run first "
            "(README.md lists the recipes) or fix the path."
        )
    return ml_collections.ConfigDict(read_config(workdir))


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def check_same_model(config, source_config, what: str = "teacher") -> None:
    """`config`'s model must have the architecture of the run it starts from (`what`:
    "teacher", "generator"), whose stored config is `source_config`."""
    diffs = []
    for f in ("model", "num_classes", "context_tokens"):
        a, b = config.get(f), source_config.get(f)
        a = a.to_dict() if hasattr(a, "to_dict") else a
        b = b.to_dict() if hasattr(b, "to_dict") else b
        if isinstance(a, dict):
            shape_keys = [k for k in a if k not in _FREE_VS_RUN]
            diffs += [
                f"{f}.{k}: {b.get(k)!r} ({what}) vs {a[k]!r}"
                for k in shape_keys
                if _norm(a[k]) != _norm(b.get(k))
            ]
        elif a != b:
            diffs.append(f"{f}: {b!r} ({what}) vs {a!r}")
    if diffs:
        raise UserError(
            f"The {what} run holds a model of another shape than config.model: "
            + "; ".join(diffs[:10])
            + f". Set the student's config to the {what}'s (e.g. --config.model.num_layers=...)."
        )


def check_pretrained(config: ml_collections.ConfigDict, key: str = "init_from") -> None:
    """The converted checkpoint in `config.<key>` must hold `config.model`'s architecture.

    Reads the checkpoint's `mmdit_config.json` only (no arrays).

    Raises:
      ValueError: no checkpoint there, or the fields that differ, named.
    """
    path = config.get(key)
    try:
        theirs = read_mmdit_config(path).to_dict()
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"config.{key}={path!r}: {e}") from e
    mine = mmdit_config(config).to_dict()
    diffs = [
        f"config.model.{k}={mine[k]!r} but the checkpoint has {theirs.get(k)!r}"
        for k in mine
        if k not in _FREE_VS_CHECKPOINT and _norm(mine[k]) != _norm(theirs.get(k))
    ]
    if diffs:
        raise UserError(
            f"config.{key}={path!r} holds another architecture than config.model: "
            + "; ".join(diffs)
            + ". Pick the config variant of the checkpoint's model (configs/sd3_sft.py:"
            "sd3-medium, ...) or override the field; for scan_layers, convert again with "
            "or without `launch/convert.py --scan_layers`."
        )


def check_start(config: ml_collections.ConfigDict, key: str, what: str) -> None:
    """`config.<key>` (a run or a converted checkpoint) holds `config.model`'s
    architecture and, for a run, the same conditioning (`what` names it in errors)."""
    if is_checkpoint_key(key):
        check_pretrained(config, key)
        return
    source = run_config(config[key], key)
    if registry.conditioning(source) != registry.conditioning(config):
        raise UserError(
            f"config.{key}={config[key]!r} was trained on {source.data.name} and this run "
            f"on {config.data.name}: G and D must be conditioned alike."
        )
    check_same_model(config, source, what)


# ------------------------------------------------------------------ loading
def load_pretrained_mmdit(path: str, abstract_mmdit: Any, key: str = "init_from") -> Any:
    """The MMDiT params of a converted checkpoint, restored straight into the
    shardings and dtypes of `abstract_mmdit` (each host reads its shards only).

    Raises:
      ValueError: the saved tree does not fit (key paths and shapes listed).
    """
    try:
        _, params = load_params(path, abstract_params=abstract_mmdit)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"config.{key}={path!r}: {e}") from e
    return params


def load_start(
    config: ml_collections.ConfigDict, key: str, *, mesh: Mesh, abstract_mmdit: Any
) -> Any:
    """The weights `config.<key>` names: a run's served params (in the run's own
    tree: `{"mmdit", "labels"}` for class-conditional generators), or
    `{"mmdit": ...}` of a converted checkpoint restored into `abstract_mmdit`'s
    shardings and dtypes."""
    if is_checkpoint_key(key):
        return {"mmdit": load_pretrained_mmdit(config[key], abstract_mmdit, key)}
    task, state, _ = load_run(config[key], mesh=mesh)
    return task.served_params(state)


def trained_mmdit(abstract_role_state: Any) -> Any:
    """The abstract MMDiT of a role's state that pretrained weights fill: the
    params, or under LoRA the frozen base."""
    if isinstance(abstract_role_state, LoRATrainState):
        return abstract_role_state.base["mmdit"]
    return abstract_role_state.params["mmdit"]
