"""The embedded demo as a library function (launch/demo.py is its entry point)."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from apt_jax.eval.grid import save_png_grid, write_results
from apt_jax.eval.metrics import evaluate_digits
from apt_jax.tasks import build_task
from apt_jax.tasks.runs import load_run
from apt_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = ""):
    """`get_config(variant)` of `configs/<name>.py`."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _evaluate_row(name, workdir, steps, num_samples, out_dir, seed=0):
    task, state, _ = load_run(workdir)
    images, labels = task.sample(state, num_samples, steps, task.config.eval.cfg_scale, seed)
    metrics = evaluate_digits(images, labels)
    order = np.argsort(labels[:100], kind="stable")
    save_png_grid(images[:100][order], os.path.join(out_dir, f"{name}.png"), nrow=10)
    return {"name": name, "steps": steps, **metrics}


def run_demo(workdir: str, num_samples: int = 1000, variant: str = "") -> str:
    """Runs every stage into `workdir/<stage>` and returns the Markdown results table."""
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    sft_dir = os.path.join(workdir, "sft")
    t0 = time.perf_counter()
    train(build_task(load_config("digits_sft", variant)), sft_dir)
    timings["sft"] = time.perf_counter() - t0

    rows = [
        _evaluate_row("teacher_25_steps", sft_dir, 25, num_samples, workdir),
        _evaluate_row("teacher_1_step", sft_dir, 1, num_samples, workdir),
    ]
    for row in rows:
        row["train_seconds"] = round(timings["sft"], 1)
    return write_results(
        rows,
        os.path.join(workdir, "results.json"),
        os.path.join(workdir, "results.md"),
        columns=["name", "steps", "frechet_distance", "accuracy", "num_samples", "train_seconds"],
    )
