"""A pipeline of stages run in order into one workdir, with resume; the two demos.

Stages:
  `Train(name, config, inputs)`  a run in `<workdir>/<name>`; `inputs` maps
      config keys to earlier stages whose output they name, e.g.
      `{"teacher_workdir": "sft", "targets_path": "targets"}`;
  `Targets(name, teacher, ...)`  a teacher run's ODE solutions, `<workdir>/<name>.npz`
      (`apt_jax.tasks.distill.make_targets`);
  `Evaluate(rows, columns, ...)` every row (a run sampled with some number of
      steps) from the same noise and labels for each noise seed, scored with
      the digits or the moving-digits metrics, averaged over the seeds (each
      seed's value kept as `<metric>_seeds`); a picture per row,
      `comparison.png` (clips: also `comparison.gif`) with every row's first
      samples (digits 0-9, the first seed), and the results table
      `results.{json,md}`.

`run(stages, workdir)` runs them in order and returns the results table.
Running it again resumes: a run that reached its `total_steps` and a targets
file that exists are skipped, an interrupted run continues from its newest
checkpoint, and the evaluation is redone. The seconds each stage took add up
over re-runs in `<workdir>/stage_seconds.json`; the table's `stage_seconds`
column shows them.

`digits_demo` and `moving_digits_demo` are the stage lists of
`launch/demo.py` and `launch/video_demo.py`. They take the recipes'
ConfigDicts (the launch scripts load them from the checkout's `configs/`):
nothing here reads a file of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from apt_jax.data import registry
from apt_jax.eval.generate import generate
from apt_jax.eval.grid import save_png_grid, save_video_gif, save_video_strips, write_results
from apt_jax.eval.metrics import evaluate_digits
from apt_jax.eval.video_metrics import evaluate_moving_digits
from apt_jax.paths import as_path
from apt_jax.tasks import build_task
from apt_jax.tasks.distill import make_targets
from apt_jax.tasks.networks import make_generator
from apt_jax.tasks.runs import load_run
from apt_jax.train.checkpoint import Checkpointer
from apt_jax.train.loop import train

log = logging.getLogger(__name__)

DIGITS_COLUMNS = (
    "name",
    "steps",
    "frechet_distance",
    "frechet_distance_seeds",
    "accuracy",
    "num_samples",
    "stage_seconds",
)
MOVING_DIGITS_COLUMNS = (
    "name",
    "steps",
    "frame_frechet_distance",
    "frame_frechet_distance_seeds",
    "frame_accuracy",
    "motion_error",
    "motion_error_seeds",
    "mean_speed",
    "num_samples",
    "stage_seconds",
)
SECONDS_FILE = "stage_seconds.json"


# ------------------------------------------------------------------- stages
@dataclasses.dataclass(frozen=True)
class Train:
    """Trains `config` into `<workdir>/<name>` (`apt_jax.train.loop.train`).

    Attributes:
      name: the run's folder under the workdir, and the stage's name.
      config: the run's ConfigDict, as given (`inputs` set on a copy).
      inputs: config key -> name of an earlier stage whose output (run folder
        or targets file) the key is set to.
    """

    name: str
    config: ml_collections.ConfigDict
    inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Targets:
    """Solves the `teacher` stage's ODE for `num` seeds into `<workdir>/<name>.npz`."""

    name: str
    teacher: str
    num: int
    steps: int
    cfg_scale: float
    shift: float
    chunk: int = 500


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the results table: the `stage` run sampled with `steps` steps.

    `seconds_of`: the stages whose seconds the row's `stage_seconds` adds up
    (what it cost to get this model).
    """

    name: str
    stage: str
    steps: int
    seconds_of: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """Samples and scores `rows`, writes their pictures and the results table.

    Attributes:
      rows: the table's rows, in order.
      columns: the table's columns.
      num_samples: samples (or clips) per row and seed; labels are `i mod 10`
        and the noise depends on the seed only, so every row sees the same noise.
      seeds: the noise seeds; a row's metrics are their means over the seeds,
        and `<metric>_seeds` lists each seed's value.
      sample_shape: what every row samples, e.g. `(F, H, W, C)` clips for
        runs that also trained on one-frame clips; None: each run's own.
      name: the stage's name.
    """

    rows: tuple[Row, ...]
    columns: tuple[str, ...]
    num_samples: int = 1000
    seeds: tuple[int, ...] = (0,)
    sample_shape: tuple[int, ...] | None = None
    name: str = "evaluate"


Stage = Train | Targets | Evaluate


# ------------------------------------------------------------------ running
def _check(stages: Sequence[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"Two stages are named {stage.name!r}; stage names must differ.")
        if isinstance(stage, Train):
            needs = set(stage.inputs.values())
        elif isinstance(stage, Targets):
            needs = {stage.teacher}
        else:
            if not stage.seeds:
                raise ValueError(f"Stage {stage.name!r} has no noise seeds; give at least one.")
            needs = {row.stage for row in stage.rows}
        missing = sorted(needs - seen)
        if missing:
            raise ValueError(
                f"Stage {stage.name!r} uses {missing}: no earlier stage has that name."
            )
        seen.add(stage.name)


def _output(stage: Stage, workdir: epath.Path) -> str:
    if isinstance(stage, Targets):
        return str(workdir / f"{stage.name}.npz")
    return str(workdir / stage.name)


def _finished_step(run_dir: str) -> int | None:
    """The newest checkpoint step of the run in `run_dir` (None: no checkpoint)."""
    if not as_path(run_dir).exists():
        return None
    with Checkpointer(run_dir, read_only=True, async_save=False) as ckpt:
        return ckpt.latest_step()


def _train(stage: Train, outputs: dict[str, str], prefix: str) -> bool:
    """Trains (or resumes) the run; False if it had finished already."""
    config = stage.config.copy_and_resolve_references()
    for key, source in stage.inputs.items():
        config[key] = outputs[source]
    run_dir, total = outputs[stage.name], config.total_steps
    step = _finished_step(run_dir)
    if step is not None and step >= total:
        log.info("%s %s: finished earlier (step %d), kept.", prefix, stage.name, step)
        return False
    doing = f"resuming at step {step} of {total}" if step else f"training {total} steps"
    log.info("%s %s: %s (%s) in %s", prefix, stage.name, doing, config.task, run_dir)
    train(build_task(config), run_dir)
    return True


def _targets(stage: Targets, outputs: dict[str, str], prefix: str) -> bool:
    """Writes the targets file; False if it exists already."""
    path = outputs[stage.name]
    if as_path(path).exists():
        log.info("%s %s: %s exists, kept.", prefix, stage.name, path)
        return False
    log.info(
        "%s %s: the %s run's %d-step solutions for %d seeds -> %s",
        prefix,
        stage.name,
        stage.teacher,
        stage.steps,
        stage.num,
        path,
    )
    make_targets(
        outputs[stage.teacher],
        path,
        num=stage.num,
        steps=stage.steps,
        cfg_scale=stage.cfg_scale,
        shift=stage.shift,
        chunk=stage.chunk,
    )
    return True


def _sample_row(
    run_dir: str, steps: int, num: int, shape: tuple[int, ...] | None, seeds: Sequence[int]
):
    """`num` samples of the run's served generator for each seed, labels `i mod 10`.

    Returns the run's config and a list of `(samples, labels)`, one per seed.
    """
    task, state, _ = load_run(run_dir)
    config = task.config
    shape = tuple(shape or registry.sample_shape(config))
    params = task.served_params(state)
    return config, [
        generate(
            make_generator(config),
            params,
            num=num,
            steps=steps,
            cfg_scale=config.eval.cfg_scale,
            shift=config.eval.shift,
            seed=seed,
            image_shape=shape,
            chunk=100 if len(shape) == 4 else 500,
        )
        for seed in seeds
    ]


def _seed_means(per_seed: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One row's metrics over the seeds: the mean of each float metric, with its
    values as `<metric>_seeds`; other values (counts) from the first seed."""
    row = dict(per_seed[0])
    for key, value in per_seed[0].items():
        if isinstance(value, (float, np.floating)):
            values = [float(m[key]) for m in per_seed]
            row[key] = float(np.mean(values))
            row[f"{key}_seeds"] = values
    return row


def _evaluate(
    stage: Evaluate,
    outputs: dict[str, str],
    seconds: Mapping[str, float],
    workdir: epath.Path,
    prefix: str,
) -> str:
    names = ", ".join(row.name for row in stage.rows)
    seeds = "seed" + (f" {stage.seeds[0]}" if len(stage.seeds) == 1 else f"s {list(stage.seeds)}")
    log.info(
        "%s %s: %d samples each of %s (noise %s)",
        prefix,
        stage.name,
        stage.num_samples,
        names,
        seeds,
    )
    rows, firsts = [], []
    for row in stage.rows:
        config, sampled = _sample_row(
            outputs[row.stage], row.steps, stage.num_samples, stage.sample_shape, stage.seeds
        )
        samples, labels = sampled[0]  # the pictures: the first seed's
        if samples.ndim == 5:  # clips (N, F, H, W, C)
            speed = config.data.max_speed
            metrics = _seed_means([evaluate_moving_digits(s, y, speed) for s, y in sampled])
            save_video_strips(samples[:10], workdir / f"{row.name}.png")
            save_video_gif(samples[:10], workdir / f"{row.name}.gif", nrow=10)
        else:
            metrics = _seed_means([evaluate_digits(s, y) for s, y in sampled])
            order = np.argsort(labels[:100], kind="stable")  # a row per digit
            save_png_grid(samples[:100][order], workdir / f"{row.name}.png", nrow=10)
        result = {"name": row.name, "steps": row.steps, **metrics}
        if row.seconds_of:
            result["stage_seconds"] = round(sum(seconds.get(s, 0.0) for s in row.seconds_of), 1)
        rows.append(result)
        firsts.append(samples[:10])
    # Labels are i mod 10 and the noise depends on the seed only: the first ten
    # samples of every row are digits 0-9 from the same noise, a row per model.
    comparison = np.concatenate(firsts)
    if comparison.ndim == 5:
        save_video_gif(comparison, workdir / "comparison.gif", nrow=10)
        save_video_strips(np.concatenate([f[:3] for f in firsts]), workdir / "comparison.png")
    else:
        save_png_grid(comparison, workdir / "comparison.png", nrow=10)
    return write_results(
        rows, workdir / "results.json", workdir / "results.md", columns=list(stage.columns)
    )


def run(stages: Sequence[Stage], workdir: str) -> str:
    """Runs `stages` in order into `workdir` (resuming what an earlier call left).

    Logs one line per stage (logger `apt_jax.stages`, INFO).

    Returns:
      The Markdown results table of the last `Evaluate` stage ("" if none).
    """
    _check(stages)
    root = as_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    seconds_path = root / SECONDS_FILE
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}
    outputs = {stage.name: _output(stage, root) for stage in stages}
    table = ""
    for i, stage in enumerate(stages, 1):
        prefix = f"[{i}/{len(stages)}]"
        t0 = time.perf_counter()
        if isinstance(stage, Evaluate):
            table = _evaluate(stage, outputs, seconds, root, prefix)
            continue  # redone on every run: not part of any model's cost
        kept = False
        try:
            kept = not (_train if isinstance(stage, Train) else _targets)(stage, outputs, prefix)
        finally:  # an interrupted stage's time counts too: the rerun resumes it
            if not kept:
                seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - t0
                seconds_path.write_text(json.dumps(seconds, indent=2) + "\n")
    return table


# -------------------------------------------------------------------- demos
def _with(config: ml_collections.ConfigDict, **settings) -> ml_collections.ConfigDict:
    """A copy of `config` with top-level `settings`."""
    config = config.copy_and_resolve_references()
    for key, value in settings.items():
        config[key] = value
    return config


def _small_eval(config: ml_collections.ConfigDict, num: int) -> ml_collections.ConfigDict:
    """A copy whose end-of-training check samples at most `num`: the results
    table evaluates every row on `num_samples` anyway."""
    config = _with(config)
    config.eval.num_samples = min(config.eval.num_samples, num)
    return config


def _teacher_targets(
    teacher: str, distill: ml_collections.ConfigDict, num: int, chunk: int = 500
) -> Targets:
    """The "targets" stage: `num` solutions of the `teacher` stage's run with the
    steps, guidance and shift `distill` (a distillation config) asks for."""
    return Targets(
        "targets",
        teacher=teacher,
        num=num,
        steps=distill.teacher_steps,
        cfg_scale=distill.teacher_cfg,
        shift=distill.teacher_shift,
        chunk=chunk,
    )


def digits_demo(
    sft: ml_collections.ConfigDict,
    deterministic: ml_collections.ConfigDict,
    apt: ml_collections.ConfigDict,
    *,
    num_targets: int = 4000,
    num_samples: int = 1000,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[Stage]:
    """The digits demo: the method end to end on the 8x8 digits.

    1. sft            the class-conditional MMDiT teacher;
    2. targets        its 25-step ODE solutions for `num_targets` seeds;
    3. deterministic  the 1-step student, APT's generator initialisation;
    4. apt            adversarial post-training of that student, D from the teacher;
    5. evaluate       the 25- and 1-step teacher, the student and the APT
                      generator on `num_samples` digits each.

    Args:
      sft: `configs/digits_sft.py`'s config.
      deterministic: `configs/digits_distill.py:deterministic`'s (its
        `teacher_steps`, `teacher_cfg`, `teacher_shift` make the targets).
      apt: `configs/digits_apt.py`'s.
      num_targets: teacher solutions to distil.
      num_samples: samples per row of the table and seed.
      seeds: the noise seeds the table averages over.
    """
    return [
        Train("sft", _small_eval(sft, 200)),
        _teacher_targets("sft", deterministic, num_targets),
        Train(
            "deterministic",
            _with(deterministic, targets="precomputed"),
            inputs={"teacher_workdir": "sft", "targets_path": "targets"},
        ),
        Train("apt", apt, inputs={"teacher_workdir": "sft", "generator_workdir": "deterministic"}),
        Evaluate(
            rows=(
                Row("teacher_25_steps", "sft", 25, ("sft",)),
                Row("teacher_1_step", "sft", 1),
                Row("deterministic_1_step", "deterministic", 1, ("targets", "deterministic")),
                Row(f"apt_{apt.r1_mode}_r1_1_step", "apt", 1, ("apt",)),
            ),
            columns=DIGITS_COLUMNS,
            num_samples=num_samples,
            seeds=seeds,
        ),
    ]


def moving_digits_demo(
    sft_image: ml_collections.ConfigDict,
    sft_video: ml_collections.ConfigDict,
    deterministic: ml_collections.ConfigDict,
    apt_image: ml_collections.ConfigDict,
    apt_video: ml_collections.ConfigDict,
    *,
    num_targets: int = 1024,
    num_samples: int = 1000,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[Stage]:
    """The moving-digits demo: one-step video by the image-then-video schedule.

    1. sft_image      the teacher's image stage, on one-frame clips;
    2. sft_video      its video stage, from sft_image, on clips;
    3. targets        the video teacher's 25-step solutions for `num_targets` seeds;
    4. deterministic  the 1-step video student;
    5. apt_image      APT's image stage: G from the student, D from sft_image;
    6. apt            APT's video stage: G from apt_image's EMA, D from sft_video;
    7. evaluate       the 25-step teacher and the 1-step generators on
                      `num_samples` clips each (per-frame distance and accuracy,
                      motion), all sampled with apt's clip shape.

    Args:
      sft_image, sft_video: `configs/moving_digits_sft.py:image` / `:video`.
      deterministic: `configs/moving_digits_distill.py:deterministic`.
      apt_image, apt_video: `configs/moving_digits_apt.py:image` / `:video`.
      num_targets: teacher solutions to distil.
      num_samples: clips per row of the table and seed.
      seeds: the noise seeds the table averages over.
    """
    small = lambda config: _small_eval(config, 100)  # noqa: E731
    return [
        Train("sft_image", small(sft_image)),
        Train("sft_video", small(sft_video), inputs={"init_workdir": "sft_image"}),
        _teacher_targets("sft_video", deterministic, num_targets, chunk=128),
        Train(
            "deterministic",
            small(_with(deterministic, targets="precomputed")),
            inputs={"teacher_workdir": "sft_video", "targets_path": "targets"},
        ),
        Train(
            "apt_image",
            small(apt_image),
            inputs={"teacher_workdir": "sft_image", "generator_workdir": "deterministic"},
        ),
        Train(
            "apt",
            small(apt_video),
            inputs={"teacher_workdir": "sft_video", "generator_workdir": "apt_image"},
        ),
        Evaluate(
            rows=(
                Row("teacher_25_steps", "sft_video", 25, ("sft_image", "sft_video")),
                Row("deterministic_1_step", "deterministic", 1, ("targets", "deterministic")),
                Row("apt_image_stage_1_step", "apt_image", 1, ("apt_image",)),
                Row(f"apt_{apt_video.r1_mode}_r1_1_step", "apt", 1, ("apt",)),
            ),
            columns=MOVING_DIGITS_COLUMNS,
            num_samples=num_samples,
            seeds=seeds,
            sample_shape=registry.sample_shape(apt_video),
        ),
    ]
