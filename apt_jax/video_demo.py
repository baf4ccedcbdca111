"""One-step video on moving digits, end to end (launch/video_demo.py is its entry point).

Stages, each a normal run in `<workdir>/<stage>` (re-running resumes):
  1. sft_image      the teacher's image stage: one-frame clips
                    (configs/moving_digits_sft.py:image);
  2. sft_video      the teacher's video stage, from sft_image, on 4-frame clips
                    (configs/moving_digits_sft.py:video);
  3. targets.npz    the video teacher's 25-step ODE solutions;
  4. deterministic  the 1-step video student (configs/moving_digits_distill.py);
  5. apt_image      APT's image stage: G from the student, D from sft_image,
                    one-frame clips (configs/moving_digits_apt.py:image);
  6. apt_video      APT's video stage: G from apt_image's EMA, D re-initialised
                    from sft_video, clips (configs/moving_digits_apt.py:video).
Then every row samples the same noise and labels and is evaluated with
`apt_jax.eval.video_metrics` (per-frame distance and accuracy, motion), each
row's first clips saved as `<row>.png` (a clip per line) and `<row>.gif`.
"""

from __future__ import annotations

import os
import time

import numpy as np

from apt_jax.demo import load_config
from apt_jax.eval.grid import save_video_gif, save_video_strips, write_results
from apt_jax.eval.video_metrics import evaluate_moving_digits
from apt_jax.tasks import build_task
from apt_jax.tasks.common import class_conditional_generator, generate, make_source
from apt_jax.tasks.distill import make_targets
from apt_jax.tasks.runs import load_run
from apt_jax.train.loop import train

COLUMNS = [
    "name",
    "steps",
    "frame_frechet_distance",
    "frame_accuracy",
    "motion_error",
    "mean_speed",
    "num_samples",
    "stage_seconds",
]
# Each run's own end-of-training evaluation is kept small; the table evaluates
# every row on `num_samples` clips.
RUN_EVAL_SAMPLES = 100


def _evaluate_row(name, workdir, steps, num_samples, out_dir, video_shape, seed=0):
    """Samples `video_shape` clips (whatever the run trained on: image-stage runs
    make clips too) and evaluates them; returns (row dict, its first ten clips)."""
    task, state, _ = load_run(workdir)
    videos, labels = generate(
        class_conditional_generator(task.config),
        task.served_params(state),
        num=num_samples,
        steps=steps,
        cfg_scale=task.config.eval.cfg_scale,
        shift=task.config.eval.shift,
        seed=seed,
        image_shape=video_shape,
        chunk=100,
    )
    metrics = evaluate_moving_digits(videos, labels, task.config.data.max_speed)
    save_video_strips(videos[:10], os.path.join(out_dir, f"{name}.png"))
    save_video_gif(videos[:10], os.path.join(out_dir, f"{name}.gif"), nrow=10)
    return {"name": name, "steps": steps, **metrics}, videos[:10]


def _stage(name, variant, tiny, workdir, seconds, mesh=None, **settings):
    """Trains `configs/<name>.py:<variant>` with `settings` (and `mesh`, axis sizes
    overriding `config.mesh`) into `workdir`."""
    t0 = time.perf_counter()
    config = load_config(name, f"{variant},tiny" if tiny else variant)
    config.eval.num_samples = min(config.eval.num_samples, RUN_EVAL_SAMPLES)
    config.mesh.update(mesh or {})
    for key, value in settings.items():
        config[key] = value
    train(build_task(config), workdir)
    seconds[os.path.basename(workdir)] = time.perf_counter() - t0
    return config


def run_video_demo(
    workdir: str, num_samples: int = 1000, tiny: bool = False, mesh: dict | None = None
) -> str:
    """Runs every stage into `workdir/<stage>`; returns the Markdown results table.

    `mesh`: axis sizes for every stage's `config.mesh` (e.g. `{"data": 1}` for one
    device); default each config's own (all devices on the data axis).
    """
    os.makedirs(workdir, exist_ok=True)
    seconds = {}
    d = {s: os.path.join(workdir, s) for s in ("sft_image", "sft_video", "deterministic")}
    d.update(apt_image=os.path.join(workdir, "apt_image"), apt_video=os.path.join(workdir, "apt"))

    _stage("moving_digits_sft", "image", tiny, d["sft_image"], seconds, mesh)
    _stage(
        "moving_digits_sft",
        "video",
        tiny,
        d["sft_video"],
        seconds,
        mesh,
        init_workdir=d["sft_image"],
    )

    t0 = time.perf_counter()
    det = load_config("moving_digits_distill", "deterministic,tiny" if tiny else "deterministic")
    targets = os.path.join(workdir, "targets.npz")
    if not os.path.exists(targets):
        make_targets(
            d["sft_video"],
            targets,
            num=32 if tiny else 1024,
            steps=det.teacher_steps,
            cfg_scale=det.teacher_cfg,
            shift=det.teacher_shift,
            chunk=128,
        )
    seconds["targets"] = time.perf_counter() - t0
    _stage(
        "moving_digits_distill",
        "deterministic",
        tiny,
        d["deterministic"],
        seconds,
        mesh,
        teacher_workdir=d["sft_video"],
        targets="precomputed",
        targets_path=targets,
    )
    _stage(
        "moving_digits_apt",
        "image",
        tiny,
        d["apt_image"],
        seconds,
        mesh,
        teacher_workdir=d["sft_image"],
        generator_workdir=d["deterministic"],
    )
    apt = _stage(
        "moving_digits_apt",
        "video",
        tiny,
        d["apt_video"],
        seconds,
        mesh,
        teacher_workdir=d["sft_video"],
        generator_workdir=d["apt_image"],
    )

    _, shape = make_source(apt)
    evaluated = [
        _evaluate_row(name, d[stage], steps, num_samples, workdir, shape)
        for name, stage, steps in [
            ("teacher_25_steps", "sft_video", 25),
            ("deterministic_1_step", "deterministic", 1),
            ("apt_image_stage_1_step", "apt_image", 1),
            (f"apt_{apt.r1_mode}_r1_1_step", "apt_video", 1),
        ]
    ]
    rows = [row for row, _ in evaluated]
    # Labels are i mod 10 and the noise depends on the seed only: the first ten
    # clips of every row are digits 0-9 from the same noise, one row per model.
    save_video_gif(
        np.concatenate([clips for _, clips in evaluated]),
        os.path.join(workdir, "comparison.gif"),
        nrow=10,
    )
    save_video_strips(
        np.concatenate([clips[:3] for _, clips in evaluated]),
        os.path.join(workdir, "comparison.png"),
    )
    rows[0]["stage_seconds"] = round(seconds["sft_image"] + seconds["sft_video"], 1)
    rows[1]["stage_seconds"] = round(seconds["targets"] + seconds["deterministic"], 1)
    rows[2]["stage_seconds"] = round(seconds["apt_image"], 1)
    rows[3]["stage_seconds"] = round(seconds["apt"], 1)
    return write_results(
        rows,
        os.path.join(workdir, "results.json"),
        os.path.join(workdir, "results.md"),
        columns=COLUMNS,
    )
