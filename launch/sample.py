"""Sample a trained run: writes `images` (N, ...) float32 in [-1, 1] and `labels` (N,)
(moving-digits runs: clips `(N, F, S, S, 1)`).

  python launch/sample.py --workdir DIR --num N --steps K --out F.npz [--seed S] [--cfg G]
  python launch/sample.py --workdir TEXT_RUN --prompts prompts.txt --pipeline PIPE ...

Uses the run's generator (its EMA weights where the run keeps them);
class-conditional runs use labels `i mod num_classes`. Text runs condition on
their eval split's rows, or with `--prompts FILE` (one prompt a line) on those
prompts, encoded by the text encoders of the `StableDiffusion3Pipeline` folder
`--pipeline` (torch: requirements-encode.txt); sample i takes row / prompt
`i mod rows`, its index in `labels`. CFG guides against the run's dataset's
negative prompt. Decode the latents with `launch/decode.py`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_NUM = flags.DEFINE_integer("num", 1000, "Number of samples.")
_STEPS = flags.DEFINE_integer("steps", None, "Euler steps (default: the recipe's).")
_OUT = flags.DEFINE_string("out", None, "Output .npz path (local or gs://).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: the recipe's).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: newest).")
_GRID = flags.DEFINE_string(
    "grid", None, "Optional PNG grid of the first samples (local or gs://)."
)
_PROMPTS = flags.DEFINE_string("prompts", None, "Text runs: a file of prompts, one a line.")
_PIPELINE = flags.DEFINE_string(
    "pipeline", None, "With --prompts: the StableDiffusion3Pipeline folder to encode them."
)
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "With --prompts: torch device.")
flags.mark_flags_as_required(["workdir", "out"])


def encoded_prompts(task) -> dict:
    """`{"context": (R, L, D), "pooled": (R, P)}` of `--prompts`, with the pipeline's
    text encoders, L the run's context length (77 CLIP tokens + T5's)."""
    from apt_jax.data import registry
    from apt_jax.errors import UserError
    from apt_jax.sd3 import pipeline

    if registry.conditioning(task.config) != "text":
        raise UserError("--prompts samples text-conditioned runs; this run is class-conditional.")
    if not _PIPELINE.value:
        raise UserError("--prompts needs --pipeline PIPE (a StableDiffusion3Pipeline folder).")
    with open(_PROMPTS.value) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {_PROMPTS.value} holds no prompt (one a line).")
    pipeline.read_pipeline(_PIPELINE.value)
    length = registry.example_spec(task.config)["context"][0][0]
    device = pipeline.torch_device(_DEVICE.value)
    pipe = pipeline.load_text_encoders(_PIPELINE.value, device)
    context, pooled = pipeline.encode_prompts(pipe, prompts, length - 77, device)
    return {"context": context, "pooled": pooled}


def main(argv):
    del argv
    import io

    import jax
    import numpy as np

    jax.config.update("jax_threefry_partitionable", True)
    from apt_jax.paths import as_path
    from apt_jax.tasks.runs import load_run

    task, state, step = load_run(_WORKDIR.value, _STEP.value)
    steps = _STEPS.value or task.config.eval.steps
    cfg = task.config.eval.cfg_scale if _CFG.value is None else _CFG.value
    if _PROMPTS.value:
        rows = encoded_prompts(task)
        images, labels = task.sample(state, _NUM.value, steps, cfg, _SEED.value, cond_rows=rows)
    else:
        images, labels = task.sample(state, _NUM.value, steps, cfg, _SEED.value)
    # Local or gs://: built in memory, written whole; ".npz" appended as np.savez(path) did.
    out = as_path(_OUT.value if _OUT.value.endswith(".npz") else _OUT.value + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, images=images.astype(np.float32), labels=labels.astype(np.int32))
    out.write_bytes(buffer.getvalue())
    if _GRID.value:
        from apt_jax.eval.grid import save_png_grid, save_video_strips

        if images.ndim == 5:  # clips: one per line, time left to right
            save_video_strips(images[:10], _GRID.value)
        else:
            save_png_grid(images[:100], _GRID.value, nrow=10)
    print(f"Wrote {len(images)} samples ({steps} steps, cfg {cfg}, checkpoint {step}) to {out}")


if __name__ == "__main__":
    cli.run(main, workdir=_WORKDIR)
