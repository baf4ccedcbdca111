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

D warm-up (`config.discriminator_warmup_steps = W`, default 0): the first W
steps update D alone against the frozen student (G's forward, no pullback, no
G update), so that D has left chance before G starts to chase it; G then makes
`total_steps - W` updates. One jitted program holds both (`lax.cond` on D's
step count), so a resumed run picks the phase from its state.

The generated batch takes the real batch's conditions (sample i of each has
the same class or caption), which is what the relativistic loss pairs.

The condition `cond` is the batch's class labels, or for text-conditioned runs
(a latents dataset, `apt_jax.data.registry`) its `{"context", "pooled"}`
embeddings; both networks take it the same way. Text runs may start both
from converted checkpoints instead of runs (`sources`): D's backbone from
`config.init_from`, G from `config.generator_init_from` (or, when neither it
nor `generator_workdir` is set, from `init_from` too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from apt_jax import sampling
from apt_jax.data import registry
from apt_jax.errors import UserError
from apt_jax.models import APTDiscriminator
from apt_jax.models.partitioning import axis_rules, logical_shardings, unbox
from apt_jax.objectives.apt import APTLossSettings, discriminator_loss, generator_loss
from apt_jax.tasks import weights
from apt_jax.tasks.networks import (
    Generator,
    check_batch_and_mesh,
    make_discriminator,
    make_generator,
)
from apt_jax.tasks.runs import register
from apt_jax.train import sharding
from apt_jax.train.config import mmdit_config, validate_common
from apt_jax.train.lora_state import create_state, lora_for, model_params
from apt_jax.train.optim import make_optimizer, make_schedule
from apt_jax.train.state import apply_gradients
from apt_jax.train.task import Task, abstract_state, jit_train_step

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
        raise UserError(
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


def sources(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The config keys naming where D's backbone ("teacher") and G start: a
    `*_workdir` key a run (its served weights), an `*init_from` key a converted
    params checkpoint (`weights.is_checkpoint_key`).

    Raises:
      ValueError: two sources given for one network, or converted checkpoints
        for a class-conditional run (they hold no label embedder).
    """
    init_from, gen_init = config.get("init_from", ""), config.get("generator_init_from", "")
    if init_from and config.teacher_workdir:
        raise UserError(
            "config.init_from and config.teacher_workdir both name D's backbone; set one."
        )
    if gen_init and config.generator_workdir:
        raise UserError(
            "config.generator_init_from and config.generator_workdir both name G; set one."
        )
    teacher = "init_from" if init_from else "teacher_workdir"
    if gen_init:
        generator = "generator_init_from"
    elif init_from and not config.generator_workdir:
        generator = "init_from"
    else:
        generator = "generator_workdir"
    found = {"teacher": teacher, "generator": generator}
    from_checkpoint = any(weights.is_checkpoint_key(key) for key in found.values())
    if registry.conditioning(config) == "class" and from_checkpoint:
        raise UserError(
            "Converted checkpoints (config.init_from / generator_init_from) start text-"
            "conditioned APT runs; class-conditional runs start from teacher_workdir and "
            "generator_workdir."
        )
    return found


def validate(config: ml_collections.ConfigDict, check_sources: bool = True) -> None:
    """Checks the config and, with `check_sources`, the dataset and both sources,
    before anything is compiled."""
    validate_common(config)
    loss_settings(config)
    make_discriminator(config)  # head layers within the depth
    discriminator_optimizer(config.discriminator_optimizer, config.total_steps)
    for role in ROLES:
        opt = config[f"{role}_optimizer"]
        if opt.get("accumulation_steps", 1) != 1:
            raise UserError(
                f"config.{role}_optimizer.accumulation_steps must be 1: the APT step updates "
                "D and G once each per batch. Lower config.batch_size or add devices instead."
            )
    warmup = config.get("discriminator_warmup_steps", 0)
    if not isinstance(warmup, int) or not 0 <= warmup < config.total_steps:
        raise UserError(
            f"config.discriminator_warmup_steps={warmup!r} must be an integer in "
            f"[0, total_steps={config.total_steps}): D's updates before G's first."
        )
    found = sources(config)
    if check_sources:
        registry.check_on_disk(config, mmdit_config(config))
        for what, key in found.items():
            weights.check_start(config, key, what)


@dataclasses.dataclass(frozen=True)
class APTStep:
    """`(state, batch, rng) -> (state, metrics)`: one D update, then one G update.

    A pure function of its arguments (jit it; `build` does, with shardings).
    `batch` is a dataset's batch (`registry.split_batch` gives `(x, cond)`:
    `{"image": (B, ...), "label": (B,)}` for digits); `state` is
    `{"generator": TrainState, "discriminator": TrainState}`. The key of step n
    is `step_rngs(rng, n)` (n = D's update count, the loop's step).

    `discriminator_warmup`: the first that many steps update D alone against
    the frozen G (`warmup_step`); G's first update is the step after.
    """

    gen: Generator
    disc: APTDiscriminator
    settings: APTLossSettings
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    ema_decay: float
    ema_warmup: bool = True
    attention_implementation: str | None = None
    discriminator_warmup: int = 0

    def generate(self, g_params, z, cond):
        """`G(z, c) = z - v(z, 1, c)`, `(B, ...)`."""
        return sampling.one_step_generate(self.gen.velocity_fn(g_params), z, cond)

    def discriminator_update(self, d, real, fake, cond, rng):
        """D's TrainState after one update on real and (stopped) generated samples."""

        def d_loss(p):
            return discriminator_loss(
                self.disc,
                self.settings,
                model_params(d, p),
                real,
                jax.lax.stop_gradient(fake),
                cond,
                rng,
                attention_implementation=self.attention_implementation,
            )

        grads, metrics = jax.grad(d_loss, has_aux=True)(d.params)
        metrics["d_grad_norm"] = optax.tree.norm(grads)
        return apply_gradients(d, grads, self.d_tx, ema_decay=0.0), metrics  # no EMA kept

    def _inputs(self, state, batch, rng):
        g, d = state["generator"], state["discriminator"]
        # D updates every step (G not in its warm-up), so its count is the step's.
        r_z, r_d, r_g = step_rngs(rng, d.step)
        real, cond = registry.split_batch(batch)  # class labels or text embeddings
        z = jax.random.normal(r_z, real.shape, real.dtype)
        return g, d, real, cond, z, r_d, r_g

    def _generator_loss(self, d, real, cond, rng):
        """`x_hat -> (G's loss, metrics)` through D's TrainState `d`."""

        def g_loss(x_hat):
            return generator_loss(
                self.disc,
                self.settings,
                model_params(d),
                x_hat,
                real,
                cond,
                rng,
                attention_implementation=self.attention_implementation,
            )

        return g_loss

    def joint_step(self, state, batch, rng):
        """One D update, then one G update through the updated D."""
        g, d, real, cond, z, r_d, r_g = self._inputs(state, batch, rng)
        # 1. G's samples and their pullback.
        fake, g_pullback = jax.vjp(lambda p: self.generate(model_params(g, p), z, cond), g.params)
        # 2. D update.
        new_d, metrics = self.discriminator_update(d, real, fake, cond, r_d)
        # 3. G update through the updated D.
        g_loss = self._generator_loss(new_d, real, cond, r_g)
        fake_grad, g_metrics = jax.grad(g_loss, has_aux=True)(fake)
        (g_grads,) = g_pullback(fake_grad)
        new_g = apply_gradients(g, g_grads, self.g_tx, self.ema_decay, self.ema_warmup)
        metrics.update(g_metrics, g_grad_norm=optax.tree.norm(g_grads), fake_std=jnp.std(fake))
        return {"generator": new_g, "discriminator": new_d}, metrics

    def warmup_step(self, state, batch, rng):
        """D's update alone: G's samples without their pullback, G's state as it
        was. G's loss is still reported (forward only, through the updated D),
        its gradient norm as 0, so the metrics match `joint_step`'s."""
        g, d, real, cond, z, r_d, r_g = self._inputs(state, batch, rng)
        fake = self.generate(model_params(g), z, cond)
        new_d, metrics = self.discriminator_update(d, real, fake, cond, r_d)
        _, g_metrics = self._generator_loss(new_d, real, cond, r_g)(fake)
        g_grad_norm = jnp.zeros((), jnp.float32)
        metrics.update(g_metrics, g_grad_norm=g_grad_norm, fake_std=jnp.std(fake))
        return {"generator": g, "discriminator": new_d}, metrics

    def __call__(self, state, batch, rng):
        if not self.discriminator_warmup:
            return self.joint_step(state, batch, rng)
        warming = state["discriminator"].step < self.discriminator_warmup
        return jax.lax.cond(warming, self.warmup_step, self.joint_step, state, batch, rng)


@register("apt")
def build(config: ml_collections.ConfigDict, mesh=None, *, check_sources: bool = True) -> Task:
    validate(config, check_sources)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    check_batch_and_mesh(config, mesh)
    rules = config.logical_axis_rules
    gen = make_generator(config)
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

    state_abstract, state_shardings = abstract_state(boxed_init, mesh, rules)
    # The sources arrive in the generator's parameter shardings.
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
        """G and D's backbone from their `sources` (`weights.load_start`); one
        converted checkpoint that starts both is read once."""
        mmdit_abstract = weights.trained_mmdit(state_abstract["generator"])
        keys = sources(config)
        loaded: dict[str, Any] = {}
        for key in keys.values():
            if key not in loaded:
                loaded[key] = weights.load_start(
                    config, key, mesh=mesh, abstract_mmdit=mmdit_abstract
                )
        return assemble(rng, loaded[keys["teacher"]], loaded[keys["generator"]])

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
        config.get("discriminator_warmup_steps", 0),
    )

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            new_state, metrics = step(state, batch, rng)
            metrics["d_learning_rate"] = d_lr(state["discriminator"].step)
            metrics["g_learning_rate"] = g_lr(state["generator"].step)
            return new_state, metrics

    return Task(
        config=config,
        mesh=mesh,
        generator=gen,
        init_state=init_state,
        abstract_state=state_abstract,
        train_step=jit_train_step(train_step, state_shardings, mesh),
        generator_weights=lambda s, ema: weights.state_weights(s["generator"], ema),
    )
