"""The training loop shared by every recipe.

Sections, in order: restore or init, the loop (step, log, checkpoint,
evaluate), shutdown. A recipe provides a `Task` (apt_jax.train.task).
Resuming on the same workdir continues from the newest checkpoint with the
same data order and random numbers (the step's rng is `fold_in(seed, step)`).
The train state restores onto whatever mesh the task has now. The data
iterator resumes exactly from its saved per-process state when the process
count is unchanged; otherwise it restarts at the checkpoint's step of the
global stream (`apt_jax.data.pipeline.seek_to_step`), the batches a run on the
new process count would have read there. Multi-host: every process runs this
same function; SIGTERM on any of them makes all save at one agreed step.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from apt_jax.data.pipeline import seek_to_step
from apt_jax.paths import as_path
from apt_jax.train.checkpoint import Checkpointer
from apt_jax.train.metrics_writer import MetricWriter, check_finite
from apt_jax.train.preemption import PreemptionGuard
from apt_jax.train.sharding import make_global_batch
from apt_jax.train.task import Task

log = logging.getLogger(__name__)


def _is_main() -> bool:
    return jax.process_index() == 0


def train(task: Task, workdir: str) -> dict:
    """Trains `task` to `config.total_steps`, resuming from `workdir` if possible.

    Returns:
      The final evaluation metrics (plus `step`), also written as JSON under
      `<workdir>/eval/`.
    """
    config = task.config
    as_path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
    ckpt = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    it = task.make_iterator()
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)

    # ---------------------------------------------------------- restore / init
    if ckpt.latest_step() is None:
        state, start = task.init_state(init_rng), 0
    else:
        # The newest step that reads (damaged newer ones are moved aside). Grain's
        # iterator states are per process: on another process count the
        # pipeline's position is recomputed from the step instead.
        state, start = ckpt.restore(
            abstract_state=task.abstract_state, data_iterator=it, reposition=seek_to_step
        )
        log.info("Resumed from step %d in %s", start, workdir)

    writer = MetricWriter(workdir)
    eval_dir = os.fspath(as_path(workdir) / "eval")
    total = config.total_steps
    stopped_early, step = False, start

    # -------------------------------------------------------------------- loop
    # The guard stays installed until in-flight saves are committed, so a
    # SIGTERM at any point before that cannot leave a half-written checkpoint.
    with PreemptionGuard() as guard:
        try:
            bar = tqdm(
                total=total,
                initial=start,
                disable=not (config.progress_bar and _is_main()),
                dynamic_ncols=True,
                desc=config.task,
            )
            t_last, s_last = time.perf_counter(), start
            for step in range(start + 1, total + 1):
                batch = make_global_batch(next(it), task.mesh)
                state, metrics = task.train_step(state, batch, step_rng)
                bar.update(1)

                # Every process asks every step (the sync point needs all of
                # them); it turns True on all at the same step after a SIGTERM.
                stop = ckpt.reached_preemption(step) or guard.requested
                save = step % config.checkpoint_every == 0 or step == total or stop
                if step % config.log_every == 0 or save:
                    # Checked before any save, so a NaN never overwrites a good state.
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(metrics, step)
                    now = time.perf_counter()
                    metrics["steps_per_second"] = (step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    writer.write_scalars(step, metrics)
                    bar.set_postfix(
                        {k: f"{v:.4f}" for k, v in metrics.items() if k.endswith("loss")}
                    )
                if save:
                    ckpt.save(step, state, data_iterator=it, config=config, force=stop)
                if config.eval_every and step % config.eval_every == 0 and step != total:
                    writer.write_scalars(step, task.evaluate(state, step, eval_dir))
                if stop:
                    log.warning("Preemption requested: saved step %d, exiting.", step)
                    stopped_early = True
                    break
            bar.close()
        finally:
            # Also on errors (a NaN, an interrupt): let in-flight saves finish, so
            # the last good checkpoint is complete on disk.
            ckpt.wait_until_finished()
            ckpt.close()
        # A SIGTERM that arrived during the final save is honoured here.
        stopped_early = stopped_early or guard.requested

    # ---------------------------------------------------------------- shutdown
    if stopped_early:
        writer.close()
        return {"step": step, "preempted": True}
    results = {"step": total}
    results.update(task.evaluate(state, total, eval_dir))
    writer.write_scalars(total, {k: v for k, v in results.items() if k != "step"})
    writer.close()
    if _is_main():
        out = as_path(eval_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"metrics_step{total}.json").write_text(
            json.dumps({k: float(np.asarray(v)) for k, v in results.items()}, indent=2)
        )
    if hasattr(it, "close"):
        it.close()
    return results
