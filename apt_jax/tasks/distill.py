"""Distillation of a many-step teacher into a one- or few-step student.

`config.variant`:
  "deterministic": APT's generator initialisation. The student, started from
    the teacher's weights, takes one step at t = 1, `G(z, c) = z - v(z, 1, c)`,
    and is regressed (MSE) onto the teacher's N-step CFG ODE solution from z.
  "direct": DiffSynth's direct distillation. The student runs its own K-step
    sampler (CFG 1) from z with gradients through every step (remat per
    step), MSE to the teacher's solution.

Targets (`config.targets`): "on_the_fly" solves the teacher ODE inside the
jitted step (no gradient); "precomputed" reads rows `(seed, label, target)`
written by `launch/make_targets.py`. A row's noise is a function of its seed,
so both give the same targets for the same seed.

The state is `{"student": TrainState, "teacher": params}`; only the student
is differentiated. The teacher travels with the state (donated and returned
unchanged, so never copied) and with the checkpoints, so a run resumes on its
own.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from apt_jax import sampling
from apt_jax.data import registry
from apt_jax.eval.generate import sample_labels
from apt_jax.models.partitioning import axis_rules, logical_shardings
from apt_jax.objectives.distill import (
    deterministic_distill_loss,
    direct_distill_loss,
    noise_from_seeds,
    teacher_solution,
)
from apt_jax.tasks import weights
from apt_jax.tasks.networks import make_generator
from apt_jax.tasks.runs import load_run, register
from apt_jax.train import sharding
from apt_jax.train.config import validate_common
from apt_jax.train.lora_state import lora_for
from apt_jax.train.optim import make_optimizer, make_schedule
from apt_jax.train.state import apply_gradients, compute_grads, create_train_state
from apt_jax.train.task import Task, abstract_batch, abstract_state, jit_train_step

VARIANTS = ("deterministic", "direct")
TARGETS = ("on_the_fly", "precomputed")


# -------------------------------------------------------------------- config
def validate(config: ml_collections.ConfigDict, check_sources: bool = True) -> None:
    """Checks the config; with `check_sources`, the teacher run and the targets file too."""
    validate_common(config)
    if config.variant not in VARIANTS:
        raise ValueError(f"config.variant={config.variant!r} is unknown; use one of {VARIANTS}.")
    if config.targets not in TARGETS:
        raise ValueError(f"config.targets={config.targets!r} is unknown; use one of {TARGETS}.")
    if config.variant == "direct" and config.student_steps < 1:
        raise ValueError("config.student_steps must be >= 1 for direct distillation.")
    if config.get("init_from"):
        raise ValueError(
            "config.init_from is read by the sft and apt tasks; distillation starts from "
            "config.teacher_workdir (a run) instead."
        )
    if registry.conditioning(config) != "class":
        raise ValueError(
            f"config.data.name={config.data.name!r}: distillation trains on class labels "
            "(digits, moving_digits) only; text-conditioned latents train with the sft and "
            "apt tasks."
        )
    if not check_sources:
        return
    if config.targets == "precomputed":
        _check_targets_file(config)
    weights.check_same_model(config, weights.run_config(config.teacher_workdir))


def _check_targets_file(config) -> None:
    path = config.targets_path
    if not path or not os.path.exists(path):
        raise ValueError(
            f"config.targets_path={path!r} does not exist; make it with "
            "`python launch/make_targets.py --teacher_workdir ... --out F.npz`."
        )
    with np.load(path) as f:
        steps, cfg = int(f["teacher_steps"]), float(f["teacher_cfg"])
        target_shape = tuple(f["target"].shape[1:])
    shape = registry.sample_shape(config)
    if target_shape != tuple(shape):
        raise ValueError(
            f"{path} holds targets of shape {target_shape}, but config.data gives samples of "
            f"shape {tuple(shape)}; make the targets from a teacher trained on this data."
        )
    if steps != config.teacher_steps or not np.isclose(cfg, config.teacher_cfg):
        raise ValueError(
            f"{path} holds targets of {steps} teacher steps at CFG {cfg}, but the config asks "
            f"for teacher_steps={config.teacher_steps}, teacher_cfg={config.teacher_cfg}."
        )


class TargetsSource:
    """Random-access rows `{seed, label, target}` of a precomputed targets file."""

    def __init__(self, path: str):
        with np.load(path) as f:
            self._seeds = f["seed"].astype(np.int32)
            self._labels = f["label"].astype(np.int32)
            self._targets = f["target"].astype(np.float32)

    def __len__(self) -> int:
        return len(self._seeds)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"seed": self._seeds[i], "label": self._labels[i], "target": self._targets[i]}


def teacher_sigmas(config) -> np.ndarray:
    return sampling.shifted_linear_sigmas(config.teacher_steps, config.teacher_shift)


def uncond_labels(labels: jax.Array, config, null_label: int) -> jax.Array:
    """The teacher's negative condition: the null class, or a fixed class."""
    neg = config.get("teacher_negative_label", -1)
    return jnp.full_like(labels, null_label if neg < 0 else neg)


# --------------------------------------------------------------------- build
@register("distill")
def build(config: ml_collections.ConfigDict, mesh=None, *, check_sources: bool = True) -> Task:
    validate(config, check_sources)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    rules = config.logical_axis_rules
    gen = make_generator(config)
    tx = make_optimizer(config.optimizer, config.total_steps)
    lr_schedule = make_schedule(config.optimizer, config.total_steps)
    image_shape = registry.sample_shape(config)

    # ------------------------------------------------------------ sharded state
    # The student starts from the teacher's (EMA) weights. Under LoRA
    # (config.lora) the student trains adapters whose frozen base is the
    # teacher itself, so the weights are held once.
    boxed_params = jax.eval_shape(gen.init_boxed, jax.random.key(0))
    param_shardings = logical_shardings(boxed_params, mesh, rules)
    adapt = lora_for(config.get("lora"), lambda: boxed_params)

    def new_student(teacher):
        return create_train_state(teacher if adapt is None else adapt.init(teacher), tx)

    def student_params(state, trained):
        """The student's full weights for its trained tree (params or adapters)."""
        return trained if adapt is None else adapt.merge(state["teacher"], trained)

    def boxed_init(rng):
        params = gen.init_boxed(rng)
        return {"student": new_student(params), "teacher": params}

    state_abstract, state_shardings = abstract_state(boxed_init, mesh, rules)
    from_teacher = jax.jit(
        lambda t: {"student": new_student(t), "teacher": t},
        in_shardings=(param_shardings,),
        out_shardings=state_shardings,
    )

    def init_state(rng):
        del rng  # the student is the teacher's copy
        teacher = weights.load_start(config, "teacher_workdir", mesh=mesh, abstract_mmdit=None)
        return from_teacher(teacher)

    # -------------------------------------------------------------------- step
    t_sigmas = teacher_sigmas(config)
    s_sigmas = sampling.shifted_linear_sigmas(config.student_steps, config.student_shift)

    def targets_and_noise(teacher_params, batch, rng):
        labels = batch["label"]
        if config.targets == "precomputed":
            return noise_from_seeds(batch["seed"], image_shape), batch["target"]
        seeds = jax.random.randint(rng, labels.shape, 0, jnp.iinfo(jnp.int32).max)
        z = noise_from_seeds(seeds, image_shape)
        target = teacher_solution(
            gen.velocity_fn(teacher_params),
            z,
            labels,
            uncond_labels(labels, config, gen.null_label),
            sigmas=t_sigmas,
            cfg_scale=config.teacher_cfg,
        )
        return z, target

    def loss_fn(params, inputs, rng):
        del rng
        z, labels, target = inputs
        student = gen.velocity_fn(params)
        if config.variant == "deterministic":
            return deterministic_distill_loss(student, z, labels, target)
        return direct_distill_loss(
            student, z, labels, target, sigmas=s_sigmas, remat_steps=config.remat_steps
        )

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            s = state["student"]
            rng = jax.random.fold_in(rng, s.step)
            z, target = targets_and_noise(state["teacher"], batch, rng)
            grads, metrics = compute_grads(
                lambda p, *a: loss_fn(student_params(state, p), *a),
                s.params,
                (z, batch["label"], target),
                rng,
                config.optimizer.accumulation_steps,
            )
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["learning_rate"] = lr_schedule(s.step)
            s = apply_gradients(s, grads, tx, config.ema_decay, config.ema_warmup)
            return {"student": s, "teacher": state["teacher"]}, metrics

    # -------------------------------------------------------------------- data
    if config.targets == "precomputed":
        example = {
            "seed": ((), np.int32),
            "label": ((), np.int32),
            "target": (image_shape, np.float32),
        }
        targets = lambda: TargetsSource(config.targets_path)  # noqa: E731
        make_iterator = registry.iterator_factory(config, targets)
    else:
        example = registry.example_spec(config)
        make_iterator = registry.iterator_factory(config)

    # Under LoRA the student's trees are adapters over the teacher.
    def generator_weights(state, ema):
        base = None if adapt is None else state["teacher"]
        return weights.state_weights(state["student"], ema, base=base, lora=adapt)

    return Task(
        config=config,
        mesh=mesh,
        generator=gen,
        init_state=init_state,
        abstract_state=state_abstract,
        train_step=jit_train_step(train_step, state_shardings, mesh),
        generator_weights=generator_weights,
        abstract_batch=abstract_batch(example, config.batch_size, mesh),
        make_iterator=make_iterator,
    )


# ------------------------------------------------------- precomputed targets
def make_targets(
    teacher_workdir: str,
    out_path: str,
    *,
    num: int,
    steps: int,
    cfg_scale: float,
    shift: float = 1.0,
    first_seed: int = 0,
    negative_label: int = -1,
    chunk: int = 500,
) -> dict:
    """Solves the teacher ODE for rows `seed = first_seed + i`, `label = i mod C`.

    Writes an .npz with `seed, label, target` and the settings `teacher_steps`,
    `teacher_cfg`, `teacher_shift` (DiffSynth stores the same per row).
    """
    task, state, _ = load_run(teacher_workdir)
    gen = make_generator(task.config)
    image_shape = registry.sample_shape(task.config)
    settings = ml_collections.ConfigDict(
        dict(teacher_steps=steps, teacher_shift=shift, teacher_negative_label=negative_label)
    )
    sigmas = teacher_sigmas(settings)

    @jax.jit
    def solve(params, seeds, labels):
        z = noise_from_seeds(seeds, image_shape)
        uncond = uncond_labels(labels, settings, gen.null_label)
        return teacher_solution(
            gen.velocity_fn(params), z, labels, uncond, sigmas=sigmas, cfg_scale=cfg_scale
        )

    params = task.served_params(state)
    seeds = (first_seed + np.arange(num)).astype(np.int32)
    labels = sample_labels(num, gen.num_classes)
    targets = np.concatenate(
        [
            np.asarray(solve(params, seeds[i : i + chunk], labels[i : i + chunk]))
            for i in range(0, num, chunk)
        ]
    )
    rows = dict(
        seed=seeds,
        label=labels,
        target=targets.astype(np.float32),
        teacher_steps=np.int32(steps),
        teacher_cfg=np.float32(cfg_scale),
        teacher_shift=np.float32(shift),
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez(out_path, **rows)
    return rows
