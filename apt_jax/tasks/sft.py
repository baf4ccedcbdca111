"""Flow-matching SFT of a class-conditional MMDiT (the teacher of later stages).

Builds, from a config: the mesh, the sharded train state (params, AdamW state,
EMA), the jitted train step, the data iterator and the evaluator.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from apt_jax import flow
from apt_jax.models.partitioning import axis_rules
from apt_jax.objectives.sft import drop_labels, flow_matching_loss
from apt_jax.tasks import common
from apt_jax.train import sharding
from apt_jax.train.config import validate_common
from apt_jax.train.lora_state import create_state, lora_for, model_params, served_params
from apt_jax.train.optim import make_optimizer, make_schedule
from apt_jax.train.state import apply_gradients, compute_grads


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a bad SFT config, before anything is compiled."""
    validate_common(config)
    f = config.flow
    if f.density not in flow.DENSITIES:
        raise ValueError(
            f"config.flow.density={f.density!r} is unknown; use one of {flow.DENSITIES}."
        )
    if f.weighting not in flow.LOSS_WEIGHTINGS:
        raise ValueError(
            f"config.flow.weighting={f.weighting!r} is unknown; use one of {flow.LOSS_WEIGHTINGS}."
        )
    if not 0.0 <= f.label_dropout < 1.0:
        raise ValueError(f"config.flow.label_dropout={f.label_dropout} must be in [0, 1).")
    k = config.optimizer.accumulation_steps
    if config.batch_size % k:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"config.optimizer.accumulation_steps={k}."
        )
    init_workdir = config.get("init_workdir", "")
    if init_workdir:
        common.check_same_model(config, common.run_config(init_workdir, "init_workdir"), "init")
    elif config.get("lora", {}).get("rank", 0):
        raise ValueError(
            "config.lora.rank > 0 trains adapters on frozen weights, but config.init_workdir is "
            "empty (the base would be random): pass --config.init_workdir=RUN (an SFT run)."
        )


def build(config: ml_collections.ConfigDict, mesh=None) -> common.Task:
    validate(config)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    rules = config.logical_axis_rules
    gen = common.class_conditional_generator(config)
    tx = make_optimizer(config.optimizer, config.total_steps)
    lr_schedule = make_schedule(config.optimizer, config.total_steps)

    # Full training, or LoRA adapters over frozen weights (config.lora).
    adapt = lora_for(config.get("lora"), lambda: jax.eval_shape(gen.init_boxed, jax.random.key(0)))
    init_state, abstract_state, state_shardings = common.sharded_init(
        lambda rng: create_state(gen.init_boxed(rng), tx, adapt), mesh, rules
    )
    if config.get("init_workdir", ""):
        init_state = common.init_from_run(
            config.init_workdir,
            lambda p: create_state(p, tx, adapt),
            gen,
            mesh,
            rules,
            state_shardings,
        )

    def loss_fn(params, batch, rng):
        r_drop, r_loss = jax.random.split(rng)
        labels = drop_labels(batch["label"], r_drop, config.flow.label_dropout, gen.null_label)
        return flow_matching_loss(
            gen.velocity_fn(params), batch["image"], labels, r_loss, config.flow
        )

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            rng = jax.random.fold_in(rng, state.step)
            grads, metrics = compute_grads(
                lambda p, b, r: loss_fn(model_params(state, p), b, r),
                state.params,
                batch,
                rng,
                config.optimizer.accumulation_steps,
            )
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["learning_rate"] = lr_schedule(state.step)
            return apply_gradients(state, grads, tx, config.ema_decay, config.ema_warmup), metrics

    # Samplers serve the EMA weights (merged onto the base under LoRA).
    evaluate, sample = common.generator_functions(gen, config, served_params)

    return common.Task(
        config=config,
        mesh=mesh,
        init_state=init_state,
        abstract_state=abstract_state,
        train_step=common.jit_train_step(train_step, state_shardings, mesh),
        make_iterator=common.iterator_factory(config),
        evaluate=evaluate,
        sample=sample,
        served_params=served_params,
    )
