"""Evaluate samples against the digits set: Frechet distance in pixel space and
the accuracy of a fixed classifier fitted on the digits. Clips (samples of a
moving-digits run, `(N, F, S, S, 1)`) get the video metrics instead: per-frame
distance and accuracy, motion error and mean speed (`apt_jax.eval.video_metrics`).

  python launch/evaluate.py --samples A.npz [--samples B.npz ...] [--out_dir DIR]

Prints a Markdown table and writes `results.json` and `results.md`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_SAMPLES = flags.DEFINE_multi_string(
    "samples", None, ".npz files written by launch/sample.py (local or gs://)."
)
_NAMES = flags.DEFINE_multi_string("name", None, "Row names (default: the file stems).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where to write results.{json,md} (local or gs://; default: the first file's)."
)
_MAX_SPEED = flags.DEFINE_integer(
    "max_speed", 2, "Clips: the data's largest speed (config.data.max_speed), for the motion fit."
)
flags.mark_flags_as_required(["samples"])


def main(argv):
    del argv
    import io

    import numpy as np

    from apt_jax.eval.grid import write_results
    from apt_jax.eval.metrics import evaluate_digits
    from apt_jax.eval.video_metrics import evaluate_moving_digits
    from apt_jax.paths import as_path

    # Local paths or URIs (gs://...), read whole through epath.
    names = _NAMES.value or [as_path(p).stem for p in _SAMPLES.value]
    if len(names) != len(_SAMPLES.value):
        raise app.UsageError("Give one --name per --samples file.")
    rows, video = [], False
    for name, path in zip(names, _SAMPLES.value, strict=True):
        with np.load(io.BytesIO(as_path(path).read_bytes())) as f:
            images, labels = f["images"], f["labels"] if "labels" in f else None
        if images.ndim == 5:
            if labels is None:
                raise app.UsageError(f"{path} holds clips without labels.")
            metrics = evaluate_moving_digits(images, labels, _MAX_SPEED.value)
            video = True
        else:
            metrics = evaluate_digits(images, labels)
        rows.append({"name": name, **metrics})
    out_dir = as_path(_OUT_DIR.value) if _OUT_DIR.value else as_path(_SAMPLES.value[0]).parent
    markdown = write_results(
        rows,
        out_dir / "results.json",
        out_dir / "results.md",
        columns=None if video else ["name", "frechet_distance", "accuracy", "num_samples"],
    )
    print(markdown)


if __name__ == "__main__":
    cli.run(main, workdir=_OUT_DIR)
