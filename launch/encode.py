"""Encode a folder of images and captions into a latents dataset with an SD3 pipeline.

  python launch/encode.py --pipeline sd3.5-medium --images photos \
      --metadata photos/metadata.csv --data_dir data --name photos --resolution 512 \
      [--negative_prompt ""] [--eval_rows 16] [--max_sequence_length 256] \
      [--device cpu|cuda] [--batch_size 4] [--torch_dtype bfloat16] [--dtype float16]

--pipeline is a diffusers StableDiffusion3Pipeline folder (as `save_pretrained`
writes it); metadata.csv has DiffSynth's columns `image,prompt` (paths relative
to --images; optional `id`, `split`). Each image is resized so that its shorter
side is --resolution and centre-cropped; its VAE latent (the posterior mean,
shifted and scaled as the pipeline does), the three text encoders' `context`
and `pooled` of its prompt, and the negative prompt's embedding (encoded once)
land in `<data_dir>/latents/<name>`, as `prepare_latents.py` packs them. Every
input is checked first (pipeline configs, the CSV, every image): a bad one
stops the run with its file named, before a model loads and with nothing
written. Needs `pip install -r requirements-encode.txt`. Then train on it with

  python launch/train.py --config configs/sd3_sft.py:sd3.5-medium --workdir RUN \
      --config.data.data_dir=data --config.data.dataset=photos --config.init_from=CKPT
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this checkout's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_PIPELINE = flags.DEFINE_string("pipeline", None, "diffusers StableDiffusion3Pipeline folder.")
_IMAGES = flags.DEFINE_string("images", None, "Folder the CSV's image paths are relative to.")
_METADATA = flags.DEFINE_string("metadata", None, "image,prompt CSV (default IMAGES/metadata.csv).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir to write into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (config.data.dataset).")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Square side in pixels of every image.")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", "", "The prompt CFG guides against (the pipeline's default: empty)."
)
_EVAL_ROWS = flags.DEFINE_integer(
    "eval_rows", 0, "Hold out the CSV's last N rows as the validation split (no 'split' column)."
)
_MAX_LEN = flags.DEFINE_integer(
    "max_sequence_length", 256, "T5 tokens per prompt (context has 77 + this many rows)."
)
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu or cuda.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Images (or prompts) per network call.")
_TORCH_DTYPE = flags.DEFINE_enum(
    "torch_dtype", "float32", ["float32", "bfloat16", "float16"], "dtype the networks run in."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of that name.")
_KEEP = flags.DEFINE_bool(
    "keep_encoded",
    False,
    "Keep the per-row .npy files, a prepare_latents.py CSV and the negative embedding "
    "under DATA_DIR/encoded/NAME.",
)
flags.mark_flags_as_required(["pipeline", "images", "data_dir", "name", "resolution"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from apt_jax.data import latents
    from apt_jax.sd3 import encode

    options = encode.EncodeOptions(
        resolution=_RESOLUTION.value,
        negative_prompt=_NEGATIVE.value,
        eval_rows=_EVAL_ROWS.value,
        max_sequence_length=_MAX_LEN.value,
        device=_DEVICE.value,
        batch_size=_BATCH.value,
        dtype=_DTYPE.value,
        torch_dtype=_TORCH_DTYPE.value,
        overwrite=_OVERWRITE.value,
        keep_encoded=_KEEP.value,
    )
    metadata = _METADATA.value or os.path.join(_IMAGES.value, "metadata.csv")
    out = encode.encode_folder(
        _PIPELINE.value, _IMAGES.value, metadata, _DATA_DIR.value, _NAME.value, options
    )
    spec = latents.read_spec(_DATA_DIR.value, _NAME.value)
    print(
        f"Wrote {sum(spec.splits.values())} examples {spec.splits} to {out}: latent "
        f"{spec.shapes.latent}, context {spec.shapes.context}, pooled {spec.shapes.pooled}"
        f", and the negative prompt {_NEGATIVE.value!r}."
    )
    if _KEEP.value:
        print(f"The per-row arrays: {encode.encoded_dir(_DATA_DIR.value, _NAME.value)}")


if __name__ == "__main__":
    cli.run(main)
