"""Train states whose trained parameters are LoRA adapters over a frozen base.

`LoRATrainState` is a `TrainState` whose `params`, `ema_params` and
`opt_state` are those of the adapters (`apt_jax.lora`); the frozen base
weights travel in `base` (sharded like any parameter, donated and returned
unchanged by the step, saved with the checkpoints so a run resumes alone) and
the `LoRA` description is static (part of the treedef). `apply_gradients`
works on it unchanged.

Recipes read a role's weights through `model_params(state, trained)`: the
trained tree itself for a plain `TrainState`, `merge(base, trained)` for a
`LoRATrainState`; the step differentiates w.r.t. `trained` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax
from flax import struct

from apt_jax import lora as lora_lib
from apt_jax.train.state import TrainState, create_train_state


@struct.dataclass
class LoRATrainState(TrainState):
    """TrainState of adapters; `base` the frozen weights they adapt.

    Attributes:
      base: the full parameter tree (never updated).
      lora: the adapters' `apt_jax.lora.LoRA` (static).
    """

    base: Any = None
    lora: lora_lib.LoRA = struct.field(pytree_node=False, default=None)


def lora_for(lora_config: ml_collections.ConfigDict | None, abstract_params: Callable, **extra):
    """The `LoRA` of `config.lora` over the params `abstract_params()` returns, or None when off.

    `abstract_params` is called only when LoRA is on (it traces an init).
    `extra` overrides settings fields (APT's discriminator: `modules_to_save`).
    Raises ValueError (bad settings, patterns matching nothing) without compiling.
    """
    settings = lora_lib.settings_from_config(lora_config)
    if settings is None:
        return None
    if extra:
        settings = dataclasses.replace(settings, **extra)
    return lora_lib.LoRA.for_params(settings, abstract_params())


def create_state(
    params: Any, tx: optax.GradientTransformation, lora: lora_lib.LoRA | None, ema: bool = True
) -> TrainState:
    """`create_train_state(params)` without LoRA; adapters over frozen `params` with it."""
    if lora is None:
        return create_train_state(params, tx, ema)
    s = create_train_state(lora.init(params), tx, ema)
    return LoRATrainState(
        step=s.step,
        params=s.params,
        ema_params=s.ema_params,
        opt_state=s.opt_state,
        base=params,
        lora=lora,
    )


def model_params(state: TrainState, trained: Any = None) -> Any:
    """The full weights the model runs with, for `trained` (default `state.params`)."""
    trained = state.params if trained is None else trained
    if isinstance(state, LoRATrainState):
        return state.lora.merge(state.base, trained)
    return trained


def served_params(state: TrainState) -> Any:
    """The weights samplers use: the EMA (merged onto the base under LoRA)."""
    return model_params(state, state.ema_params)
