"""Adversarial post-training (Seaweed-APT) of a one-step generator against real data.

The generator `G(z, c) = z - v(z, 1, c)` starts from a distilled one-step
student (`config.generator_workdir`, normally the deterministic-distillation
run); the discriminator (`APTDiscriminator`) starts from the diffusion teacher
(`config.teacher_workdir`), backbone copied, heads fresh. Both are trained.

State: `{"generator": TrainState (params, EMA, optimizer), "discriminator":
TrainState (params, optimizer; no EMA: nobody samples D)}`.

One jitted step, D first, then G:
  1. `x_hat = G(z, c)` once, keeping the pullback (`jax.vjp`) of G.
  2. D update on real `x` and `stop_gradient(x_hat)`
     (`apt_jax.objectives.apt.discriminator_loss`, with R1 per `r1_mode`).
  3. G update: the gradient of `generator_loss` w.r.t. `x_hat` through the
     *updated* D, pulled back through step 1's pullback.
D goes first so that G's update follows a D that has just seen G's current
samples (the usual alternation, and the paper's). G's parameters do not
change between steps 1 and 3, so its forward pass is shared: the step costs one
G forward and one G backward, not two forwards. The price is that G's
activations stay alive through D's update (use `model.remat_policy` when
memory is short).

The labels of the generated batch are the real batch's (sample i of each has
the same class), which is what the relativistic loss pairs.

Text-conditioned runs (a latents dataset, `common.conditioning`) condition both
networks on the batch's `{"context", "pooled"}` embeddings the same way, and
may start both from converted checkpoints instead of runs (`sources`): D's
backbone from `config.init_from`, G from `config.generator_init_from` (or,
when neither it nor `generator_workdir` is set, from `init_from` too).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from apt_jax import sampling
from apt_jax.models import APTDiscriminator, ClassConditionalMMDiT
from apt_jax.models.partitioning import axis_rules, logical_shardings, unbox
from apt_jax.objectives.apt import APTLossSettings, discriminator_loss, generator_loss
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
from apt_jax.train.state import apply_gradients

ROLES = ("generator", "discriminator")


def loss_settings(config: ml_collections.ConfigDict) -> APTLossSettings:
    """The `APTLossSettings` of `config` (validated on construction)."""
    exact_weight = config.r1_exact_weight
    return APTLossSettings(
        loss=config.loss,
        r1_mode=config.r1_mode,
        r2_mode=config.r2_mode,
        r1_weight=config.r1_weight,
        r1_sigma=config.r1_sigma,
        r1_exact_weight=None if exact_weight is None or exact_weight < 0 else exact_weight,
        gp_weight=config.gp_weight,
        d_timestep_shift=config.d_timestep_shift,
    )


def step_rngs(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys of step `step`: (G's noise z, D's loss, G's loss)."""
    r_z, r_d, r_g = jax.random.split(jax.random.fold_in(rng, step), 3)
    return r_z, r_d, r_g


def discriminator_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """D's optimizer: `opt` for the backbone, its learning rate times
    `opt.head_lr_multiplier` (default 1) for the freshly initialised heads.

    The backbone starts from the teacher and is wrecked by large steps, while
    the heads start from random weights and must learn fast for D to leave
    chance within a short run; one multiplier serves both.
    """
    multiplier = float(opt.get("head_lr_multiplier", 1.0))
    if multiplier <= 0:
        raise ValueError(
            f"config.discriminator_optimizer.head_lr_multiplier={multiplier} must be > 0."
        )
    tx = make_optimizer(opt, total_steps)
    if multiplier == 1.0:
        return tx

    # Scaling the updates (after the optimizer) equals scaling the learning rate
    # for RMSProp, Adam(W) and SGD, and keeps one optimizer state for all of D.
    def scale_heads(updates, params):
        del params
        return {
            k: jax.tree.map(lambda u: u * multiplier, v) if k == "heads" else v
            for k, v in updates.items()
        }

    return optax.chain(tx, optax.stateless(scale_heads))


def make_discriminator(config: ml_collections.ConfigDict) -> APTDiscriminator:
    layers = tuple(config.d_head_layers) or None
    return APTDiscriminator(
        common.mmdit_config(config),
        config.num_classes,
        config.context_tokens,
        head_layers=layers,
        conditioning=common.conditioning(config),
    )


def sources(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """Where D's backbone ("teacher") and G start: `(kind, config key)`, kind "run"
    (a workdir; its served weights) or "checkpoint" (a converted params checkpoint).

    Raises:
      ValueError: two sources given for one network, or converted checkpoints
        for a class-conditional run (they hold no label embedder).
    """
    init_from, gen_init = config.get("init_from", ""), config.get("generator_init_from", "")
    if init_from and config.teacher_workdir:
        raise ValueError(
            "config.init_from and config.teacher_workdir both name D's backbone; set one."
        )
    if gen_init and config.generator_workdir:
        raise ValueError(
            "config.generator_init_from and config.generator_workdir both name G; set one."
        )
    teacher = ("checkpoint", "init_from") if init_from else ("run", "teacher_workdir")
    if gen_init:
        generator = ("checkpoint", "generator_init_from")
    elif init_from and not config.generator_workdir:
        generator = ("checkpoint", "init_from")
    else:
        generator = ("run", "generator_workdir")
    found = {"teacher": teacher, "generator": generator}
    if common.conditioning(config) == "class" and any(k == "checkpoint" for k, _ in found.values()):
        raise ValueError(
            "Converted checkpoints (config.init_from / generator_init_from) start text-"
            "conditioned APT runs; class-conditional runs start from teacher_workdir and "
            "generator_workdir."
        )
    return found


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the config and both source runs, before anything is compiled."""
    validate_common(config)
    loss_settings(config)
    make_discriminator(config)  # head layers within the depth
    discriminator_optimizer(config.discriminator_optimizer, config.total_steps)
    for role in ROLES:
        opt = config[f"{role}_optimizer"]
        if opt.get("accumulation_steps", 1) != 1:
            raise ValueError(
                f"config.{role}_optimizer.accumulation_steps must be 1: the APT step updates "
                "D and G once each per batch. Lower config.batch_size or add devices instead."
            )
    common.validate_data(config)
    for what, (kind, key) in sources(config).items():
        if kind == "checkpoint":
            common.check_pretrained(config, key)
            continue
        source = common.run_config(config[key], key)
        if common.conditioning(source) != common.conditioning(config):
            raise ValueError(
                f"config.{key}={config[key]!r} was trained on {source.data.name} and this run "
                f"on {config.data.name}: G and D must be conditioned alike."
            )
        common.check_same_model(config, source, what)


@dataclasses.dataclass(frozen=True)
class APTStep:
    """`(state, batch, rng) -> (state, metrics)`: one D update, then one G update.

    A pure function of its arguments (jit it; `build` does, with shardings).
    `batch` is `{"image": (B, ...), "label": (B,)}`; `state` is
    `{"generator": TrainState, "discriminator": TrainState}`. The key of step n
    is `step_rngs(rng, n)` (n = G's update count).
    """

    gen: ClassConditionalMMDiT
    disc: APTDiscriminator
    settings: APTLossSettings
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    ema_decay: float
    ema_warmup: bool = True
    attention_implementation: str | None = None

    def generate(self, g_params, z, labels):
        """`G(z, c) = z - v(z, 1, c)`, `(B, ...)`."""
        return sampling.one_step_generate(self.gen.velocity_fn(g_params), z, labels)

    def discriminator_update(self, d, real, fake, labels, rng):
        """D's TrainState after one update on real and (stopped) generated samples."""

        def d_loss(p):
            return discriminator_loss(
                self.disc,
                self.settings,
                model_params(d, p),
                real,
                jax.lax.stop_gradient(fake),
                labels,
                rng,
                attention_implementation=self.attention_implementation,
            )

        grads, metrics = jax.grad(d_loss, has_aux=True)(d.params)
        metrics["d_grad_norm"] = optax.tree.norm(grads)
        return apply_gradients(d, grads, self.d_tx, ema_decay=0.0), metrics  # no EMA kept

    def __call__(self, state, batch, rng):
        g, d = state["generator"], state["discriminator"]
        r_z, r_d, r_g = step_rngs(rng, g.step)
        real, labels = common.split_batch(batch)  # labels: class labels or text embeddings
        z = jax.random.normal(r_z, real.shape, real.dtype)

        # 1. G's samples and their pullback.
        fake, g_pullback = jax.vjp(lambda p: self.generate(model_params(g, p), z, labels), g.params)
        # 2. D update.
        new_d, metrics = self.discriminator_update(d, real, fake, labels, r_d)

        # 3. G update through the updated D.
        def g_loss(x_hat):
            return generator_loss(
                self.disc,
                self.settings,
                model_params(new_d),
                x_hat,
                real,
                labels,
                r_g,
                attention_implementation=self.attention_implementation,
            )

        fake_grad, g_metrics = jax.grad(g_loss, has_aux=True)(fake)
        (g_grads,) = g_pullback(fake_grad)
        new_g = apply_gradients(g, g_grads, self.g_tx, self.ema_decay, self.ema_warmup)
        metrics.update(g_metrics, g_grad_norm=optax.tree.norm(g_grads), fake_std=jnp.std(fake))
        return {"generator": new_g, "discriminator": new_d}, metrics


def build(config: ml_collections.ConfigDict, mesh=None) -> common.Task:
    validate(config)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    rules = config.logical_axis_rules
    gen = common.make_generator(config)
    disc = make_discriminator(config)
    settings = loss_settings(config)
    total = config.total_steps
    g_tx = make_optimizer(config.generator_optimizer, total)
    d_tx = discriminator_optimizer(config.discriminator_optimizer, total)
    g_lr = make_schedule(config.generator_optimizer, total)
    d_lr = make_schedule(config.discriminator_optimizer, total)

    # ------------------------------------------------------------ sharded state
    # Under LoRA (config.lora) G trains adapters over the generator run's
    # weights; with lora.train_discriminator D too, over the teacher's
    # backbone, its fresh heads trained in full.
    key = jax.random.key(0)
    g_lora = lora_for(config.get("lora"), lambda: jax.eval_shape(gen.init_boxed, key))
    d_lora = None
    if g_lora is not None and config.lora.get("train_discriminator", False):
        abstract_d = lambda: jax.eval_shape(disc.init_boxed, key)  # noqa: E731
        d_lora = lora_for(config.lora, abstract_d, modules_to_save=("heads",))

    def boxed_init(rng):
        return {
            "generator": create_state(gen.init_boxed(rng), g_tx, g_lora),
            "discriminator": create_state(disc.init_boxed(rng), d_tx, d_lora, ema=False),
        }

    abstract_state, state_shardings = common.abstract_state(boxed_init, mesh, rules)
    # The source runs' served params arrive in the generator's parameter shardings.
    gen_shardings = logical_shardings(jax.eval_shape(gen.init_boxed, key), mesh, rules)

    def _assemble(rng, teacher, generator):
        d_params = unbox(disc.init_boxed(rng, teacher))
        return {
            "generator": create_state(generator, g_tx, g_lora),
            "discriminator": create_state(d_params, d_tx, d_lora, ema=False),
        }

    assemble = jax.jit(
        _assemble,
        in_shardings=(sharding.replicated(mesh), gen_shardings, gen_shardings),
        out_shardings=state_shardings,
    )

    def init_state(rng):
        """G and D's backbone from their `sources`: a run's served weights, or a
        converted checkpoint restored straight into G's shardings."""
        from apt_jax.tasks.runs import load_run

        start, loaded = {}, {}
        for role, (kind, key) in sources(config).items():
            if kind == "run":
                task, state, _ = load_run(config[key], mesh=mesh)
                start[role] = task.served_params(state)
            else:
                if key not in loaded:  # one checkpoint for both: read once
                    g_abstract = abstract_state["generator"]
                    if isinstance(g_abstract, LoRATrainState):  # the frozen base
                        abstract = g_abstract.base["mmdit"]
                    else:
                        abstract = g_abstract.params["mmdit"]
                    loaded[key] = {
                        "mmdit": common.load_pretrained_mmdit(config[key], abstract, key)
                    }
                start[role] = loaded[key]
        return assemble(rng, start["teacher"], start["generator"])

    # -------------------------------------------------------------------- step
    step = APTStep(
        gen,
        disc,
        settings,
        g_tx,
        d_tx,
        config.ema_decay,
        config.ema_warmup,
        config.model.attention_implementation,
    )

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            new_state, metrics = step(state, batch, rng)
            metrics["d_learning_rate"] = d_lr(state["discriminator"].step)
            metrics["g_learning_rate"] = g_lr(state["generator"].step)
            return new_state, metrics

    served = lambda s: served_params(s["generator"])  # noqa: E731
    evaluate, sample = common.generator_functions(gen, config, served)

    return common.Task(
        config=config,
        mesh=mesh,
        init_state=init_state,
        abstract_state=abstract_state,
        train_step=common.jit_train_step(train_step, state_shardings, mesh),
        make_iterator=common.iterator_factory(config),
        evaluate=evaluate,
        sample=sample,
        served_params=served,
    )
