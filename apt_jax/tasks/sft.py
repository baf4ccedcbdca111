"""Flow-matching SFT of an MMDiT (the teacher of later stages).

Builds, from a config: the mesh, the sharded train state (params, AdamW state,
EMA), the jitted train step, the data iterator and the evaluator. The model is
class-conditional on the digits and text-conditioned on a latents dataset
(`apt_jax.data.registry`). The MMDiT starts fresh, from a converted checkpoint
(`config.init_from`, restored straight into the state's shardings) or from a
run (`config.init_workdir`, its served weights); see `apt_jax.tasks.weights`.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from apt_jax import flow
from apt_jax.data import registry
from apt_jax.errors import UserError
from apt_jax.models.partitioning import axis_rules, logical_shardings, unbox
from apt_jax.objectives.sft import flow_matching_loss
from apt_jax.tasks import weights
from apt_jax.tasks.networks import check_batch_and_mesh, make_generator
from apt_jax.tasks.runs import register
from apt_jax.train import sharding
from apt_jax.train.config import mmdit_config, validate_common
from apt_jax.train.lora_state import create_state, lora_for, model_params
from apt_jax.train.optim import make_optimizer, make_schedule
from apt_jax.train.state import apply_gradients, compute_grads
from apt_jax.train.task import Task, jit_train_step, sharded_init


# -------------------------------------------------------------------- config
def validate(config: ml_collections.ConfigDict, check_sources: bool = True) -> None:
    """Raises ValueError for a bad SFT config, before anything is compiled.

    `check_sources` also reads the dataset's metadata and the starting
    weights' stored config (`apt_jax.tasks.runs.build_task`)."""
    validate_common(config)
    f = config.flow
    if f.density not in flow.DENSITIES:
        raise UserError(
            f"config.flow.density={f.density!r} is unknown; use one of {flow.DENSITIES}."
        )
    if f.weighting not in flow.LOSS_WEIGHTINGS:
        raise UserError(
            f"config.flow.weighting={f.weighting!r} is unknown; use one of {flow.LOSS_WEIGHTINGS}."
        )
    if not 0.0 <= f.label_dropout < 1.0:
        raise UserError(f"config.flow.label_dropout={f.label_dropout} must be in [0, 1).")
    k = config.optimizer.accumulation_steps
    if config.batch_size % k:
        raise UserError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"config.optimizer.accumulation_steps={k}."
        )
    start = start_key(config)
    if start is None and config.get("lora", {}).get("rank", 0):
        raise UserError(
            "config.lora.rank > 0 trains adapters on frozen weights, but neither "
            "config.init_workdir (an SFT run) nor config.init_from (a converted checkpoint) is "
            "set (the base would be random): pass one, e.g. --config.init_workdir=RUN."
        )
    if check_sources:
        registry.check_on_disk(config, mmdit_config(config))
        if start is not None:
            weights.check_start(config, start, "init")


def start_key(config: ml_collections.ConfigDict) -> str | None:
    """The key naming the starting weights: "init_from", "init_workdir" or None (fresh)."""
    init_from, init_workdir = config.get("init_from", ""), config.get("init_workdir", "")
    if init_from and init_workdir:
        raise UserError(
            "config.init_from (a converted checkpoint) and config.init_workdir (a run) both "
            "name the starting weights; set one."
        )
    return "init_from" if init_from else "init_workdir" if init_workdir else None


# --------------------------------------------------------------------- build
@register("sft")
def build(config: ml_collections.ConfigDict, mesh=None, *, check_sources: bool = True) -> Task:
    validate(config, check_sources)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    check_batch_and_mesh(config, mesh)
    rules = config.logical_axis_rules
    gen = make_generator(config)
    tx = make_optimizer(config.optimizer, config.total_steps)
    lr_schedule = make_schedule(config.optimizer, config.total_steps)

    # ------------------------------------------------------------ sharded state
    # Full training, or LoRA adapters over frozen weights (config.lora).
    boxed_params = jax.eval_shape(gen.init_boxed, jax.random.key(0))
    adapt = lora_for(config.get("lora"), lambda: boxed_params)
    make_state = lambda params: create_state(params, tx, adapt)  # noqa: E731
    init_state, abstract_state, state_shardings = sharded_init(
        lambda rng: make_state(gen.init_boxed(rng)), mesh, rules
    )
    start = start_key(config)
    if start is not None:
        init_state = _init_from(
            config, start, gen, make_state, abstract_state, state_shardings, mesh, boxed_params
        )

    # -------------------------------------------------------------------- step
    def loss_fn(params, batch, rng):
        r_drop, r_loss = jax.random.split(rng)
        x0, cond = registry.split_batch(batch)
        # CFG dropout: the null class, or zeroed text embeddings (SD3).
        cond = gen.drop_condition(cond, r_drop, config.flow.label_dropout)
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

    return Task(
        config=config,
        mesh=mesh,
        generator=gen,
        init_state=init_state,
        abstract_state=abstract_state,
        train_step=jit_train_step(train_step, state_shardings, mesh),
        # Samplers serve the EMA weights (merged onto the base under LoRA).
        generator_weights=weights.state_weights,
    )


def _init_from(config, key, gen, make_state, abstract_state, state_shardings, mesh, boxed_params):
    """`rng -> state` whose params start from `config.<key>` (`weights.load_start`).

    A converted checkpoint holds the MMDiT alone: it fills the MMDiT (params
    and EMA, or LoRA's frozen base) and anything else (a label embedder)
    starts fresh. A run gives the whole generator.
    """
    mmdit_abstract = weights.trained_mmdit(abstract_state)
    param_shardings = logical_shardings(boxed_params, mesh, config.logical_axis_rules)

    def init_with(rng, start):
        params = unbox(gen.init_boxed(rng))  # what `start` replaces is dead code, never computed
        params.update(start)
        return make_state(params)

    start_shardings = (
        {"mmdit": param_shardings["mmdit"]} if weights.is_checkpoint_key(key) else param_shardings
    )
    # The restored arrays are donated: they become the params; the EMA is a copy.
    init_jit = jax.jit(
        init_with,
        in_shardings=(sharding.replicated(mesh), start_shardings),
        out_shardings=state_shardings,
        donate_argnums=1,
    )

    def init_state(rng):
        start = weights.load_start(config, key, mesh=mesh, abstract_mmdit=mmdit_abstract)
        return init_jit(rng, start)

    return init_state
