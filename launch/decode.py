"""Decode sampled latents into PNG files and a grid with an SD3 pipeline's VAE.

  python launch/decode.py --pipeline sd3.5-medium --samples samples.npz --out pngs \
      [--device cpu|cuda] [--batch_size 4] [--nrow 8]

--samples is `launch/sample.py`'s .npz (`images`) or an evaluation's
`samples_step*.npz` (`latents`, and `captions`, written beside the PNGs as
captions.txt): latents `(N, h, w, C)`, channels-last, scaled as the pipeline
scales them. The VAE undoes the scale and shift and decodes them to
`OUT/00000.png ...` and `OUT/grid.png`. Needs `pip install -r
requirements-encode.txt`.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this checkout's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from apt_jax import cli  # noqa: E402

_PIPELINE = flags.DEFINE_string(
    "pipeline", None, "diffusers StableDiffusion3Pipeline folder (its vae/ is read)."
)
_SAMPLES = flags.DEFINE_string("samples", None, ".npz with 'latents' or 'images' (N, h, w, C).")
_OUT = flags.DEFINE_string("out", None, "Folder for the PNG files and grid.png.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu or cuda.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Latents per VAE call.")
_TORCH_DTYPE = flags.DEFINE_enum(
    "torch_dtype", "float32", ["float32", "bfloat16", "float16"], "dtype the VAE runs in."
)
_NROW = flags.DEFINE_integer("nrow", 8, "Images per grid row (the grid shows nrow * nrow).")
flags.mark_flags_as_required(["pipeline", "samples", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from apt_jax.sd3 import decode

    paths = decode.decode_samples(
        _PIPELINE.value,
        _SAMPLES.value,
        _OUT.value,
        device=_DEVICE.value,
        batch_size=_BATCH.value,
        torch_dtype_name=_TORCH_DTYPE.value,
        nrow=_NROW.value,
    )
    print(f"Wrote {len(paths) - 1} images and {paths[-1]} to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
