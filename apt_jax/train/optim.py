"""Optimizers and learning-rate schedules, chosen by `config.optimizer`.

Config keys (`config.optimizer`): `name` (adamw | adam | rmsprop | sgd),
`learning_rate`, `schedule` (constant | cosine | linear), `warmup_steps`,
`b1`, `b2`, `eps`, `weight_decay` (adamw), `rmsprop_decay` (RMSProp's alpha;
APT uses 0.9), `grad_clip_norm` (0 disables), `accumulation_steps`
(micro-batches per update; see `apt_jax.train.state.compute_grads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from apt_jax.errors import UserError

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def check_optimizer_config(opt: Mapping[str, Any], total_steps: int) -> None:
    """Raises ValueError for an unknown optimizer / schedule or bad numbers."""
    name = opt.get("name")
    if name not in OPTIMIZERS:
        raise UserError(f"config.optimizer.name={name!r} is unknown; use one of {OPTIMIZERS}.")
    schedule = opt.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise UserError(
            f"config.optimizer.schedule={schedule!r} is unknown; use one of {SCHEDULES}."
        )
    if not opt.get("learning_rate", 0) > 0:
        raise UserError("config.optimizer.learning_rate must be > 0.")
    warmup = int(opt.get("warmup_steps", 0))
    if warmup < 0 or (schedule != "constant" and warmup >= total_steps):
        raise UserError(
            f"config.optimizer.warmup_steps={warmup} must be >= 0 and, for a decaying "
            f"schedule, below total_steps={total_steps}."
        )
    if int(opt.get("accumulation_steps", 1)) < 1:
        raise UserError("config.optimizer.accumulation_steps must be >= 1.")


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant, cosine or linear decay to 0."""
    lr = float(opt["learning_rate"])
    warmup = int(opt.get("warmup_steps", 0))
    schedule = opt.get("schedule", "constant")
    if schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup),
            optax.linear_schedule(lr, 0.0, total_steps - warmup),
        ],
        [warmup],
    )


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """The optax transformation described by `config.optimizer` (validated first)."""
    check_optimizer_config(opt, total_steps)
    lr = make_schedule(opt, total_steps)
    name = opt["name"]
    if name == "adamw":
        tx = optax.adamw(
            lr,
            b1=opt.get("b1", 0.9),
            b2=opt.get("b2", 0.999),
            eps=opt.get("eps", 1e-8),
            weight_decay=opt.get("weight_decay", 0.0),
        )
    elif name == "adam":
        tx = optax.adam(
            lr, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8)
        )
    elif name == "rmsprop":
        tx = optax.rmsprop(lr, decay=opt.get("rmsprop_decay", 0.9), eps=opt.get("eps", 1e-8))
    else:
        tx = optax.sgd(lr, momentum=opt.get("momentum", 0.0) or None)
    clip = float(opt.get("grad_clip_norm", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx
