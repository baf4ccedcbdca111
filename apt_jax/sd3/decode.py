"""Sampled latents -> PNG files and a grid, with an SD3 pipeline's VAE (`launch/decode.py`)."""

from __future__ import annotations

import os

import numpy as np

from apt_jax.errors import UserError
from apt_jax.sd3 import pipeline as sd3


def read_samples(path: str) -> tuple[np.ndarray, list[str] | None]:
    """The latents of a samples `.npz` and their captions, if it has any.

    `launch/sample.py` writes `images`, an evaluation writes `latents` (and
    `captions`); either is `(N, h, w, C)`, channels-last.

    Raises:
      UserError: no such file, neither key, or not a batch of image latents.
    """
    if not os.path.isfile(path):
        raise UserError(
            f"--samples {path} does not exist: give an .npz from launch/sample.py or an "
            "evaluation's samples_step*.npz."
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            key = "latents" if "latents" in keys else "images" if "images" in keys else None
            if key is None:
                raise UserError(
                    f"{path} holds neither 'latents' nor 'images' (it has {keys}): give an .npz "
                    "from launch/sample.py or an evaluation's samples_step*.npz."
                )
            x = np.asarray(f[key], np.float32)
            captions = [str(c) for c in f["captions"]] if "captions" in keys else None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - np.load raises several types on a bad file
        raise UserError(f"{path} is not a readable .npz ({type(e).__name__}: {e}).") from None
    if x.ndim != 4:
        raise UserError(
            f"{path}: {key} has shape {x.shape}; decode.py takes image latents (N, h, w, C) "
            "(SD3's VAE decodes images, not clips)."
        )
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise UserError(
            f"{path}: {key} has {bad} NaN/Inf value(s): the run that sampled them diverged; "
            "sample an earlier checkpoint (launch/sample.py --checkpoint_step)."
        )
    return x, captions


def decode_samples(
    pipeline: str,
    samples: str,
    out_dir: str,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    torch_dtype_name: str = "float32",
    nrow: int = 8,
) -> list[str]:
    """Latents of a samples `.npz` -> `<out_dir>/00000.png ...`, `<out_dir>/grid.png`
    (the first `nrow * nrow` images, `nrow` to a row) and, when the file has
    captions, `<out_dir>/captions.txt` (one line per image).

    Args:
      pipeline: a StableDiffusion3Pipeline folder (only its vae/ is read).
      samples: an `.npz` with `latents` or `images` `(N, h, w, C)` (`read_samples`).
      out_dir: created if missing.
      device: torch device name, cpu or cuda.
      batch_size: latents per VAE call.
      torch_dtype_name: the VAE's dtype, one of `pipeline.TORCH_DTYPES`.
      nrow: images per grid row.

    Returns:
      The PNG paths, the grid last.

    Raises:
      UserError: a bad file, or latents whose channels are not the VAE's; nothing
        is written then.
    """
    from PIL import Image
    from tqdm import tqdm

    from apt_jax.eval.grid import save_png_grid

    spec = sd3.read_pipeline(pipeline, text=False)
    latents, captions = read_samples(samples)
    if captions is not None and len(captions) != len(latents):
        captions = None  # not one per image: nothing to pair them with
    if latents.shape[-1] != spec.latent_channels:
        raise UserError(
            f"{samples}: latents have {latents.shape[-1]} channels (shape {latents.shape}) but "
            f"{os.path.join(pipeline, 'vae')} decodes {spec.latent_channels}: give the samples "
            "of a run trained on this VAE's latents (channels-last)."
        )
    if batch_size < 1 or nrow < 1:
        raise UserError(f"--batch_size={batch_size} and --nrow={nrow} must be at least 1.")
    dev = sd3.torch_device(device)
    vae = sd3.load_vae(pipeline, dev, sd3.torch_dtype(torch_dtype_name))
    os.makedirs(out_dir, exist_ok=True)
    paths, shown = [], []  # the grid's images only: a thousand 1024 px images are 12 GB
    with tqdm(total=len(latents), desc="decode", unit="img") as bar:
        for s in sd3.batches(len(latents), batch_size):
            for x in sd3.decode_latents(vae, latents[s], dev):
                path = os.path.join(out_dir, f"{len(paths):05d}.png")
                Image.fromarray(_to_uint8(x)).save(path)
                paths.append(path)
                if len(shown) < nrow * nrow:
                    shown.append(x)
            bar.update(s.stop - s.start)
    grid = os.path.join(out_dir, "grid.png")
    save_png_grid(np.stack(shown), grid, nrow=nrow, upscale=1)
    if captions is not None:
        with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
            f.write("".join(c.replace("\n", " ") + "\n" for c in captions))
    return [*paths, grid]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..255, as the pipeline's image processor rounds."""
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
