"""Flow-matching SFT of an MMDiT (the teacher of later stages).

Builds, from a config: the mesh, the sharded train state (params, AdamW state,
EMA), the jitted train step, the data iterator and the evaluator. The model is
class-conditional on the digits and text-conditioned on a latents dataset
(`common.conditioning`). `config.init_from` (a checkpoint `launch/convert.py`
wrote) starts the MMDiT from pretrained weights, restored straight into the
state's shardings; without it the MMDiT starts fresh.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from apt_jax import flow
from apt_jax.models.partitioning import axis_rules, unbox
from apt_jax.objectives.sft import flow_matching_loss
from apt_jax.tasks import common
from apt_jax.train import sharding
from apt_jax.train.config import validate_common
from apt_jax.train.lora_state import (
    LoRATrainState,
    create_state,
    lora_for,
    model_params,
    served_params,
)
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
    common.validate_data(config)
    init_from, init_workdir = config.get("init_from", ""), config.get("init_workdir", "")
    if init_from and init_workdir:
        raise ValueError(
            "config.init_from (a converted checkpoint) and config.init_workdir (a run) both "
            "name the starting weights; set one."
        )
    if init_from:
        common.check_pretrained(config, "init_from")
    elif init_workdir:
        common.check_same_model(config, common.run_config(init_workdir, "init_workdir"), "init")
    elif config.get("lora", {}).get("rank", 0):
        raise ValueError(
            "config.lora.rank > 0 trains adapters on frozen weights, but neither "
            "config.init_workdir (an SFT run) nor config.init_from (a converted checkpoint) is "
            "set (the base would be random): pass one, e.g. --config.init_workdir=RUN."
        )


def build(config: ml_collections.ConfigDict, mesh=None) -> common.Task:
    validate(config)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    rules = config.logical_axis_rules
    gen = common.make_generator(config)
    tx = make_optimizer(config.optimizer, config.total_steps)
    lr_schedule = make_schedule(config.optimizer, config.total_steps)

    # Full training, or LoRA adapters over frozen weights (config.lora).
    adapt = lora_for(config.get("lora"), lambda: jax.eval_shape(gen.init_boxed, jax.random.key(0)))
    init_state, abstract_state, state_shardings = common.sharded_init(
        lambda rng: create_state(gen.init_boxed(rng), tx, adapt), mesh, rules
    )
    if config.get("init_from", ""):
        init_state = _pretrained_init(
            gen,
            lambda p: create_state(p, tx, adapt),
            config.init_from,
            abstract_state,
            state_shardings,
            mesh,
        )
    elif config.get("init_workdir", ""):
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
        x0, cond = common.split_batch(batch)
        # CFG dropout: the null class, or zeroed text embeddings.
        cond = common.drop_condition(gen, cond, r_drop, config.flow.label_dropout)
        return flow_matching_loss(gen.velocity_fn(params), x0, cond, r_loss, config.flow)

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


def _pretrained_init(gen, make_state, path, abstract_state, state_shardings, mesh):
    """`rng -> state` whose MMDiT (params and EMA, or LoRA's frozen base) comes from the
    checkpoint at `path`; anything else (a label embedder, adapters) starts fresh.

    `make_state`: `params -> state` (full training or LoRA, `lora_state.create_state`).
    """
    base_params = lambda s: s.base if isinstance(s, LoRATrainState) else s.params  # noqa: E731
    mmdit_abstract = base_params(abstract_state)["mmdit"]
    mmdit_shardings = base_params(state_shardings)["mmdit"]

    def init_with(rng, mmdit):
        params = unbox(gen.init_boxed(rng))  # the fresh MMDiT is dead code, never computed
        params["mmdit"] = mmdit
        return make_state(params)

    # The restored arrays are donated: they become the params; the EMA is a copy.
    init_jit = jax.jit(
        init_with,
        in_shardings=(sharding.replicated(mesh), mmdit_shardings),
        out_shardings=state_shardings,
        donate_argnums=1,
    )

    def init_state(rng):
        mmdit = common.load_pretrained_mmdit(path, mmdit_abstract, "init_from")
        return init_jit(rng, mmdit)

    return init_state
