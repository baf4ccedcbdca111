"""Pack precomputed latents and text embeddings into a tfds (ArrayRecord) dataset.

  python launch/prepare_latents.py --src DIR --metadata DIR/metadata.csv \
      --data_dir data --name mydata [--eval_rows 16] [--dtype float16] [--overwrite] \
      [--negative_context NEG.context.npy --negative_pooled NEG.pooled.npy]

The CSV has a `caption` column and either `latent`, `context`, `pooled`
columns (a `.npy` / `.safetensors` file each, relative to --src) or one
`file` column (a `.safetensors` holding tensors `latent`, `context`,
`pooled`); optional `id` and `split` (train / validation). Every file is read
and checked first (missing files or embeddings, shapes, NaN / Inf): bad files
are listed by name and nothing is written. `--negative_context` /
`--negative_pooled` (`.npy` or `.safetensors`, the rows' shapes) are the
negative prompt's embedding, which CFG guides against (encode the empty prompt,
as SD3 pipelines do by default, with the captions' text encoders; without them
CFG guides against zeros, with a warning). `launch/encode.py` does all of this
from images and captions. Then train on it with

  python launch/train.py --config configs/sd3_sft.py:sd3-medium --workdir RUN \
      --config.data.data_dir=data --config.data.dataset=mydata --config.init_from=CKPT
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_SRC = flags.DEFINE_string("src", None, "Folder the CSV's paths are relative to.")
_METADATA = flags.DEFINE_string("metadata", None, "Metadata CSV (default: SRC/metadata.csv).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir to write into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (config.data.dataset).")
_EVAL_ROWS = flags.DEFINE_integer(
    "eval_rows", 0, "Hold out the CSV's last N rows as the validation split (no 'split' column)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of that name.")
_NEG_CONTEXT = flags.DEFINE_string(
    "negative_context", None, "The negative prompt's context tokens (L, D): .npy / .safetensors."
)
_NEG_POOLED = flags.DEFINE_string(
    "negative_pooled", None, "The negative prompt's pooled vector (P,): .npy / .safetensors."
)
_NEG_PROMPT = flags.DEFINE_string("negative_prompt", "", "Its text, kept with it.")
flags.mark_flags_as_required(["src", "data_dir", "name"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from apt_jax.data import latents

    if bool(_NEG_CONTEXT.value) != bool(_NEG_POOLED.value):
        raise app.UsageError("--negative_context and --negative_pooled go together.")
    negative = None
    if _NEG_CONTEXT.value:
        negative = {
            "context": latents.load_array(_NEG_CONTEXT.value, "context"),
            "pooled": latents.load_array(_NEG_POOLED.value, "pooled"),
        }
    metadata = _METADATA.value or os.path.join(_SRC.value, "metadata.csv")
    rows = latents.read_metadata(_SRC.value, metadata, eval_rows=_EVAL_ROWS.value)
    out = latents.build_dataset(
        rows,
        _DATA_DIR.value,
        _NAME.value,
        dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value,
        negative=negative,
        negative_prompt=_NEG_PROMPT.value,
    )
    spec = latents.read_spec(_DATA_DIR.value, _NAME.value)
    print(
        f"Wrote {sum(spec.splits.values())} examples {spec.splits} to {out}: latent "
        f"{spec.shapes.latent}, context {spec.shapes.context}, pooled {spec.shapes.pooled}."
    )


if __name__ == "__main__":
    cli.run(main)
