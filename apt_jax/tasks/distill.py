"""Distillation of a many-step teacher into a one- or few-step student.

`config.variant`:
  "deterministic": APT's generator initialisation. The student, started from
    the teacher's weights, takes one step at t = 1, `G(z, c) = z - v(z, 1, c)`,
    and is regressed (MSE) onto the teacher's N-step CFG ODE solution from z.
  "direct": DiffSynth's direct distillation. The student runs its own K-step
    sampler (CFG 1) from z with gradients through every step (remat per
    step), MSE to the teacher's solution.

The condition follows the data (`apt_jax.data.registry`): class labels on the
digits, text embeddings on a latents dataset. The teacher's CFG guides against
the null class (or `config.teacher_negative_label`), or against the dataset's
negative prompt embedding (`registry.negative_condition`; zeros, with a
warning, for a dataset without one), as diffusers' SD3 pipeline does.

The teacher is a run (`config.teacher_workdir`: its served weights) or, for
text runs, a converted checkpoint (`config.init_from`); see
`apt_jax.tasks.weights`. The student starts as the teacher's copy.

Targets (`config.targets`): "on_the_fly" solves the teacher ODE inside the
jitted step (no gradient); "precomputed" reads rows written by
`launch/make_targets.py`, keyed like DiffSynth's by (condition, seed, teacher
steps, CFG scale): `(seed, label, target)` for labels, `(row, seed, target)`
for text, `row` indexing the dataset's train split. A row's noise is a
function of its seed, so both give the same targets for the same seed.

The state is `{"student": TrainState, "teacher": params}`; only the student
is differentiated. The teacher travels with the state (donated and returned
unchanged, so never copied) and with the checkpoints, so a run resumes on its
own.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from apt_jax import sampling
from apt_jax.data import registry
from apt_jax.errors import UserError
from apt_jax.eval.generate import sample_labels
from apt_jax.models.partitioning import axis_rules, logical_shardings
from apt_jax.objectives.distill import (
    deterministic_distill_loss,
    direct_distill_loss,
    noise_from_seeds,
    teacher_solution,
)
from apt_jax.tasks import weights
from apt_jax.tasks.networks import Generator, check_batch_and_mesh, make_generator
from apt_jax.tasks.runs import load_run, register
from apt_jax.train import sharding
from apt_jax.train.config import mmdit_config, validate_common
from apt_jax.train.lora_state import lora_for
from apt_jax.train.optim import make_optimizer, make_schedule
from apt_jax.train.state import apply_gradients, compute_grads, create_train_state
from apt_jax.train.task import Task, abstract_batch, abstract_state, jit_train_step

VARIANTS = ("deterministic", "direct")
# Batch fields holding samples, which precomputed rows replace by (seed, target).
SAMPLE_KEYS = ("image", "video", "latent")
TARGETS = ("on_the_fly", "precomputed")


# -------------------------------------------------------------------- config
def validate(config: ml_collections.ConfigDict, check_sources: bool = True) -> None:
    """Checks the config; with `check_sources`, the teacher run and the targets file too."""
    validate_common(config)
    if config.variant not in VARIANTS:
        raise UserError(f"config.variant={config.variant!r} is unknown; use one of {VARIANTS}.")
    teacher_sigmas(config)  # a known schedule
    if config.targets not in TARGETS:
        raise UserError(f"config.targets={config.targets!r} is unknown; use one of {TARGETS}.")
    if config.variant == "direct" and config.student_steps < 1:
        raise UserError("config.student_steps must be >= 1 for direct distillation.")
    key = teacher_key(config)
    if weights.is_checkpoint_key(key) and registry.conditioning(config) == "class":
        raise UserError(
            "config.init_from (a converted checkpoint, an MMDiT alone) can be the teacher of "
            "text-conditioned runs only; a class-conditional teacher is a run: pass "
            "--config.teacher_workdir=RUN."
        )
    if config.targets == "precomputed" and weights.is_checkpoint_key(key):
        raise UserError(
            "config.targets='precomputed' reads targets launch/make_targets.py made from a "
            "teacher run (--teacher_workdir); with a converted teacher (config.init_from) use "
            "config.targets='on_the_fly'."
        )
    if not check_sources:
        return
    registry.check_on_disk(config, mmdit_config(config))
    if config.targets == "precomputed":  # the data's own shapes first: the clearer error
        _check_targets_file(config)
    weights.check_start(config, key, "teacher")


def teacher_key(config: ml_collections.ConfigDict) -> str:
    """The key naming the teacher: "teacher_workdir" (a run) or "init_from" (a
    converted checkpoint, text runs)."""
    if config.get("init_from") and config.get("teacher_workdir"):
        raise UserError(
            "config.init_from and config.teacher_workdir both name the teacher; set one."
        )
    if config.get("init_from"):
        return "init_from"
    if not config.get("teacher_workdir"):
        raise UserError(
            "A distillation run needs a teacher: pass --config.teacher_workdir=RUN (an SFT "
            "run) or, for text-conditioned runs, --config.init_from=CKPT (launch/convert.py)."
        )
    return "teacher_workdir"


def _check_targets_file(config) -> None:
    path = config.targets_path
    if not path or not os.path.exists(path):
        raise UserError(
            f"config.targets_path={path!r} does not exist; make it with "
            "`python launch/make_targets.py --teacher_workdir ... --out F.npz`."
        )
    with np.load(path) as f:
        steps, cfg = int(f["teacher_steps"]), float(f["teacher_cfg"])
        target_shape = tuple(f["target"].shape[1:])
        keyed_by_row = "row" in f
        schedule = str(f["teacher_schedule"]) if "teacher_schedule" in f else "linear"
    if keyed_by_row != (registry.conditioning(config) == "text"):
        kind = "dataset rows (text)" if keyed_by_row else "class labels"
        raise UserError(
            f"{path} holds targets keyed by {kind}, but this run trains on "
            f"{config.data.name!r}; make the targets from a teacher trained on this data."
        )
    shape = registry.sample_shape(config)
    if target_shape != tuple(shape):
        raise UserError(
            f"{path} holds targets of shape {target_shape}, but config.data gives samples of "
            f"shape {tuple(shape)}; make the targets from a teacher trained on this data."
        )
    if schedule != config.get("teacher_schedule", "linear"):
        raise UserError(
            f"{path} holds targets on the {schedule!r} teacher schedule, but the config asks "
            f"for teacher_schedule={config.get('teacher_schedule', 'linear')!r}; make them "
            "again with launch/make_targets.py --schedule, or set the config to match."
        )
    if steps != config.teacher_steps or not np.isclose(cfg, config.teacher_cfg):
        raise UserError(
            f"{path} holds targets of {steps} teacher steps at CFG {cfg}, but the config asks "
            f"for teacher_steps={config.teacher_steps}, teacher_cfg={config.teacher_cfg}."
        )


class TargetsSource:
    """Random-access rows of a precomputed targets file: `{seed, label, target}`,
    or, for text, `{seed, target, context, pooled}` with the embeddings of the
    dataset row the target was made for (`records`: the train split)."""

    def __init__(self, path: str, records=None):
        with np.load(path) as f:
            self._seeds = f["seed"].astype(np.int32)
            self._targets = f["target"].astype(np.float32)
            key = "row" if "row" in f else "label"
            self._keys = f[key].astype(np.int32)
        if key == "row" and records is None:
            raise UserError(f"{path} holds text targets: pass the dataset's records.")
        self._records = records if key == "row" else None

    def __len__(self) -> int:
        return len(self._seeds)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        row = {"seed": self._seeds[i], "target": self._targets[i]}
        if self._records is None:
            return {**row, "label": self._keys[i]}
        example = self._records[self._keys[i]]
        return {**row, "context": example["context"], "pooled": example["pooled"]}


def _targets_source(config: ml_collections.ConfigDict) -> TargetsSource:
    text = registry.conditioning(config) == "text"
    return TargetsSource(config.targets_path, registry.make_source(config) if text else None)


SCHEDULES = ("linear", "diffusers")


def schedule_sigmas(schedule: str, steps: int, shift: float) -> np.ndarray:
    """The teacher's `steps + 1` sigmas: "linear", `shift(linspace(1, 0))`; or
    "diffusers", `FlowMatchEulerDiscreteScheduler(shift)`'s, so targets are the
    many-step output a diffusers SD3 pipeline gives for the same noise."""
    if schedule not in SCHEDULES:
        raise UserError(f"teacher_schedule={schedule!r} is unknown; use one of {SCHEDULES}.")
    if schedule == "diffusers":
        return sampling.diffusers_sigmas(steps, shift)
    return sampling.shifted_linear_sigmas(steps, shift)


def teacher_sigmas(config) -> np.ndarray:
    schedule = config.get("teacher_schedule", "linear")
    return schedule_sigmas(schedule, config.teacher_steps, config.teacher_shift)


def teacher_negative(config: ml_collections.ConfigDict) -> Any:
    """What the teacher's CFG guides against besides the null condition: a fixed
    negative class (`config.teacher_negative_label`, -1: the null class), or the
    dataset's negative prompt embedding (`registry.negative_condition`)."""
    if registry.conditioning(config) == "text":
        return registry.negative_condition(config)
    return config.get("teacher_negative_label", -1)


def teacher_targets(
    gen: Generator,
    teacher_params: Any,
    cond: Any,
    seeds: jax.Array,
    image_shape: tuple[int, ...],
    sigmas: np.ndarray,
    cfg_scale: float,
    negative: Any,
) -> tuple[jax.Array, jax.Array]:
    """`(z, target)`: the noise `(B, *image_shape)` of `seeds` `(B,)` and the teacher's
    Euler ODE solution from it under `cond`, CFG `cfg_scale` against
    `gen.null_condition(cond, negative)`. The one definition of a target, on the
    fly in the step and ahead of time in `make_targets`."""
    z = noise_from_seeds(seeds, image_shape)
    uncond = gen.null_condition(cond, negative)
    target = teacher_solution(
        gen.velocity_fn(teacher_params), z, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale
    )
    return z, target


def batch_condition(batch: dict) -> Any:
    """A batch's condition: its labels, or its `{"context", "pooled"}` embeddings."""
    if "label" in batch:
        return batch["label"]
    return {"context": batch["context"], "pooled": batch["pooled"]}


# --------------------------------------------------------------------- build
@register("distill")
def build(config: ml_collections.ConfigDict, mesh=None, *, check_sources: bool = True) -> Task:
    validate(config, check_sources)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    check_batch_and_mesh(config, mesh)
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
        abstract_mmdit = state_abstract["teacher"]["mmdit"]
        key = teacher_key(config)
        teacher = weights.load_start(config, key, mesh=mesh, abstract_mmdit=abstract_mmdit)
        return from_teacher(teacher)

    # -------------------------------------------------------------------- step
    t_sigmas = teacher_sigmas(config)
    s_sigmas = sampling.shifted_linear_sigmas(config.student_steps, config.student_shift)
    # The dataset's negative prompt is read with the sources; a compile from the
    # config alone guides against zeros of the same shapes.
    text = registry.conditioning(config) == "text"
    negative = None if text and not check_sources else teacher_negative(config)

    def targets_and_noise(teacher_params, batch, cond, rng):
        if config.targets == "precomputed":
            return noise_from_seeds(batch["seed"], image_shape), batch["target"]
        batch_size = jax.tree.leaves(cond)[0].shape[0]
        seeds = jax.random.randint(rng, (batch_size,), 0, jnp.iinfo(jnp.int32).max)
        return teacher_targets(
            gen, teacher_params, cond, seeds, image_shape, t_sigmas, config.teacher_cfg, negative
        )

    def loss_fn(params, inputs, rng):
        del rng
        z, cond, target = inputs
        student = gen.velocity_fn(params)
        if config.variant == "deterministic":
            return deterministic_distill_loss(student, z, cond, target)
        return direct_distill_loss(
            student, z, cond, target, sigmas=s_sigmas, remat_steps=config.remat_steps
        )

    def train_step(state, batch, rng):
        with axis_rules(rules, mesh):
            s = state["student"]
            rng = jax.random.fold_in(rng, s.step)
            cond = batch_condition(batch)
            z, target = targets_and_noise(state["teacher"], batch, cond, rng)
            grads, metrics = compute_grads(
                lambda p, *a: loss_fn(student_params(state, p), *a),
                s.params,
                (z, cond, target),
                rng,
                config.optimizer.accumulation_steps,
            )
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["learning_rate"] = lr_schedule(s.step)
            s = apply_gradients(s, grads, tx, config.ema_decay, config.ema_warmup)
            return {"student": s, "teacher": state["teacher"]}, metrics

    # -------------------------------------------------------------------- data
    if config.targets == "precomputed":
        # The rows' keys, in place of the dataset's samples: (seed, target) and the condition.
        example = {k: v for k, v in registry.example_spec(config).items() if k not in SAMPLE_KEYS}
        example.update(seed=((), np.int32), target=(image_shape, np.float32))
        make_iterator = registry.iterator_factory(config, lambda: _targets_source(config))
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
    schedule: str = "linear",
    chunk: int = 500,
) -> dict:
    """Solves the teacher run's ODE for rows `seed = first_seed + i` and writes them.

    Class-conditional teachers: rows `label = i mod C`, CFG against the null class
    (or `negative_label >= 0`); the .npz holds `seed, label, target`. Text
    teachers: rows `row = i mod N` over the teacher's dataset's train split, CFG
    against the dataset's negative prompt; the .npz holds `seed, row, target`.
    Both also hold the settings `teacher_steps`, `teacher_cfg`, `teacher_shift`
    and `teacher_schedule` (`schedule_sigmas`; DiffSynth keys its rows the same way).
    """
    task, state, _ = load_run(teacher_workdir)
    gen, config = task.generator, task.config
    image_shape = registry.sample_shape(config)
    sigmas = schedule_sigmas(schedule, steps, shift)
    text = registry.conditioning(config) == "text"
    negative = registry.negative_condition(config) if text else negative_label

    @jax.jit
    def solve(params, seeds, cond):
        return teacher_targets(gen, params, cond, seeds, image_shape, sigmas, cfg_scale, negative)[
            1
        ]

    params = task.served_params(state)
    seeds = (first_seed + np.arange(num)).astype(np.int32)
    if text:
        records = registry.make_source(config)
        keys = {"row": (np.arange(num) % len(records)).astype(np.int32)}

        def cond_of(rows):
            examples = [records[r] for r in rows]
            return {k: np.stack([e[k] for e in examples]) for k in ("context", "pooled")}
    else:
        keys = {"label": sample_labels(num, gen.num_classes)}
        cond_of = lambda rows: rows  # noqa: E731
    (key,) = keys.values()
    targets = np.concatenate(
        [
            np.asarray(solve(params, seeds[i : i + chunk], cond_of(key[i : i + chunk])))
            for i in range(0, num, chunk)
        ]
    )
    rows = dict(
        seed=seeds,
        **keys,
        target=targets.astype(np.float32),
        teacher_steps=np.int32(steps),
        teacher_cfg=np.float32(cfg_scale),
        teacher_shift=np.float32(shift),
        teacher_schedule=np.array(schedule),
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez(out_path, **rows)
    return rows
