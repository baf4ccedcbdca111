"""The embedded demo as a library function (launch/demo.py is its entry point).

Stages, each a normal run in `<workdir>/<stage>` (re-running resumes):
  1. sft            the class-conditional MMDiT teacher (configs/digits_sft.py);
  2. targets.npz    the teacher's 25-step ODE solutions for 4,000 seeds;
  3. deterministic  the 1-step student, APT's generator initialisation
                    (configs/digits_distill.py:deterministic, precomputed targets);
  4. apt            adversarial post-training of that student against the
                    digits, D from the teacher (configs/digits_apt.py, cut to
                    DEMO_APT_UPDATES updates so the demo fits in 10 minutes).
Then every row is sampled with the same noise and labels and evaluated, and
`comparison.png` shows the rows' first ten samples (digits 0-9) one row each.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from apt_jax.eval.grid import save_png_grid, write_results
from apt_jax.eval.metrics import evaluate_digits
from apt_jax.tasks import build_task
from apt_jax.tasks.distill import make_targets
from apt_jax.tasks.runs import load_run
from apt_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_APT_UPDATES = 100

COLUMNS = ["name", "steps", "frechet_distance", "accuracy", "num_samples", "stage_seconds"]


def load_config(name: str, variant: str = ""):
    """`get_config(variant)` of `configs/<name>.py`."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _evaluate_row(name, workdir, steps, num_samples, out_dir, seed=0):
    """Samples and evaluates one row; returns (row dict, its first ten images)."""
    task, state, _ = load_run(workdir)
    images, labels = task.sample(state, num_samples, steps, task.config.eval.cfg_scale, seed)
    metrics = evaluate_digits(images, labels)
    order = np.argsort(labels[:100], kind="stable")
    save_png_grid(images[:100][order], os.path.join(out_dir, f"{name}.png"), nrow=10)
    return {"name": name, "steps": steps, **metrics}, images[:10]


def run_demo(workdir: str, num_samples: int = 1000, tiny: bool = False) -> str:
    """Runs every stage into `workdir/<stage>`; returns the Markdown results table."""
    os.makedirs(workdir, exist_ok=True)
    seconds = {}

    t0 = time.perf_counter()
    sft_dir = os.path.join(workdir, "sft")
    sft_config = load_config("digits_sft", "tiny" if tiny else "")
    # The table below evaluates every row on num_samples; the run's own
    # end-of-training check can be small (25-step sampling is the slow part).
    sft_config.eval.num_samples = min(sft_config.eval.num_samples, 200)
    train(build_task(sft_config), sft_dir)
    seconds["sft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    det_config = load_config("digits_distill", "deterministic,tiny" if tiny else "deterministic")
    targets = os.path.join(workdir, "targets.npz")
    if not os.path.exists(targets):
        make_targets(
            sft_dir,
            targets,
            num=64 if tiny else 4000,
            steps=det_config.teacher_steps,
            cfg_scale=det_config.teacher_cfg,
            shift=det_config.teacher_shift,
        )
    det_config.teacher_workdir = sft_dir
    det_config.targets = "precomputed"
    det_config.targets_path = targets
    det_dir = os.path.join(workdir, "deterministic")
    train(build_task(det_config), det_dir)
    seconds["deterministic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    apt_config = load_config("digits_apt", "tiny" if tiny else "")
    if not tiny:
        # The recipe's 400 updates would take the demo past 10 minutes on a
        # 2-core CPU; docs/results.md has the full run.
        apt_config.total_steps = DEMO_APT_UPDATES
    apt_config.teacher_workdir = sft_dir
    apt_config.generator_workdir = det_dir
    apt_dir = os.path.join(workdir, "apt")
    train(build_task(apt_config), apt_dir)
    seconds["apt"] = time.perf_counter() - t0

    evaluated = [
        _evaluate_row("teacher_25_steps", sft_dir, 25, num_samples, workdir),
        _evaluate_row("teacher_1_step", sft_dir, 1, num_samples, workdir),
        _evaluate_row("deterministic_1_step", det_dir, 1, num_samples, workdir),
        _evaluate_row(f"apt_{apt_config.r1_mode}_r1_1_step", apt_dir, 1, num_samples, workdir),
    ]
    rows = [row for row, _ in evaluated]
    # Labels are i mod 10 and the noise depends on the seed only: the first ten
    # samples of every row are digits 0-9 from the same noise.
    save_png_grid(
        np.concatenate([first_ten for _, first_ten in evaluated]),
        os.path.join(workdir, "comparison.png"),
        nrow=10,
    )
    rows[0]["stage_seconds"] = round(seconds["sft"], 1)
    rows[2]["stage_seconds"] = round(seconds["deterministic"], 1)
    rows[3]["stage_seconds"] = round(seconds["apt"], 1)
    return write_results(
        rows,
        os.path.join(workdir, "results.json"),
        os.path.join(workdir, "results.md"),
        columns=COLUMNS,
    )
