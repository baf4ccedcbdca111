"""A diffusers SD3 pipeline folder: its configs checked, its VAE and text encoders run in torch.

The folder is what `StableDiffusion3Pipeline.save_pretrained` writes (SD3,
SD3.5): `model_index.json` and the subfolders `vae/`, `text_encoder/`,
`text_encoder_2/` (the two CLIPs), `text_encoder_3/` (T5), their
`tokenizer*/`, and `transformer/` (only its config.json is read here).
`read_pipeline` reads the JSON files alone; torch, diffusers and transformers
are imported inside the functions that run a network.

What the arrays are, as the pipeline computes them:

    latent   `(z - vae.config.shift_factor) * vae.config.scaling_factor`,
             channels-last `(H / s, W / s, C)`, `s = 2 ** (len(block_out_channels) - 1)`,
             where `z` is the VAE posterior's mean (`latent_dist.mode()`): the
             same image always gives the same latent. (diffusers'
             train_dreambooth_sd3 draws `latent_dist.sample()` every step
             instead; a fixed dataset keeps the mean.)
    context  `(77 + max_sequence_length, joint_attention_dim)`: the two CLIPs'
             penultimate hidden states side by side, zero-padded to T5's
             width, above T5's last hidden state (`encode_prompt`)
    pooled   `(pooled_projection_dim,)`: the two CLIPs' projected pooled outputs
    image    `(B, H, W, 3)`: uint8 into the VAE, float32 in [-1, 1] out of it
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from apt_jax.errors import UserError

INSTALL_HINT = "pip install -r requirements-encode.txt (PyTorch CPU build, diffusers, transformers)"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TORCH_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


# ---------------------------------------------------------- the pipeline folder
@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What the folder's configs say, read without loading a network.

    `clip_widths` / `clip_projections` are the two CLIPs' `hidden_size` /
    `projection_dim`; `t5_width` is T5's `d_model` (None when not read).
    """

    path: str
    vae_scale: int  # pixels per latent cell along each side
    latent_channels: int
    shift_factor: float
    scaling_factor: float
    patch_size: int | None = None
    in_channels: int | None = None
    joint_attention_dim: int | None = None
    pooled_projection_dim: int | None = None
    clip_widths: tuple[int, int] | None = None
    clip_projections: tuple[int, int] | None = None
    t5_width: int | None = None


def _read_json(path: str, what: str, fix: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: {what}. {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): {what}. {fix}") from None


def _component(path: str, name: str, index: dict[str, Any], weights: bool = True) -> str:
    """The subfolder of component `name`, checked: listed in model_index.json,
    present, and (a network's) holding a weights file."""
    folder = os.path.join(path, name)
    fix = (
        f"Give --pipeline a full StableDiffusion3Pipeline folder (as save_pretrained writes it, "
        f"e.g. a download of stabilityai/stable-diffusion-3.5-medium), with its {name}/."
    )
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise UserError(
            f"{os.path.join(path, 'model_index.json')} has no {name} (it lists "
            f"{name}: {entry!r}). {fix}"
        )
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist. {fix}")
    if weights:
        files = os.listdir(folder)
        if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
            raise UserError(
                f"{folder} holds no weights (*.safetensors or *.bin; it has {sorted(files)}). {fix}"
            )
    return folder


def read_pipeline(path: str, *, text: bool = True) -> PipelineSpec:
    """Checks a StableDiffusion3Pipeline folder from its JSON files alone.

    Args:
      path: the folder.
      text: also check the three text encoders, their tokenizers and the
        transformer's config (encoding needs them; decoding needs the VAE only).

    Returns:
      The widths and VAE constants the encoder and decoder use.

    Raises:
      UserError: no such folder, a missing component (VAE, a text encoder, a
        tokenizer, the transformer's config), or text-encoder widths that do
        not fit the transformer's `joint_attention_dim` / `pooled_projection_dim`,
        or VAE latent channels other than the transformer's `in_channels`.
    """
    if not os.path.isdir(path):
        raise UserError(
            f"--pipeline {path} is not a folder: give a StableDiffusion3Pipeline folder "
            "(model_index.json, vae/, text_encoder*/, tokenizer*/, transformer/)."
        )
    index = _read_json(
        os.path.join(path, "model_index.json"),
        "not a diffusers pipeline folder",
        "Give the folder StableDiffusion3Pipeline.save_pretrained wrote (or a hub download).",
    )
    vae = _read_json(
        os.path.join(_component(path, "vae", index), "config.json"),
        "the VAE's config",
        "Restore the pipeline's vae/ folder.",
    )
    blocks = vae.get("block_out_channels") or ()
    shift = vae.get("shift_factor")
    spec = dict(
        path=path,
        vae_scale=2 ** (len(blocks) - 1) if blocks else 8,
        latent_channels=int(vae.get("latent_channels", 4)),
        # SD1/SDXL VAEs have no shift; the pipeline would fail on None, SD3's is set.
        shift_factor=float(shift) if shift is not None else 0.0,
        scaling_factor=float(vae.get("scaling_factor", 1.0)),
    )
    if not text:
        return PipelineSpec(**spec)

    configs = {}
    for name in TEXT_ENCODERS:
        configs[name] = _read_json(
            os.path.join(_component(path, name, index), "config.json"),
            f"the {name} config",
            f"Restore the pipeline's {name}/ folder.",
        )
    for name in TOKENIZERS:
        _component(path, name, index, weights=False)
    transformer = _read_json(
        os.path.join(_component(path, "transformer", index, weights=False), "config.json"),
        "the transformer's config (encode.py reads joint_attention_dim / pooled_projection_dim)",
        "Restore the pipeline's transformer/config.json.",
    )

    def width(name: str, key: str) -> int:
        c = configs[name].get("text_config", configs[name])  # a full CLIPConfig nests it
        if not isinstance(c.get(key), int):
            raise UserError(
                f"{os.path.join(path, name, 'config.json')} has no integer {key!r}: not the "
                f"config of an SD3 text encoder. Restore the pipeline's {name}/ folder."
            )
        return c[key]

    h1, p1 = width("text_encoder", "hidden_size"), width("text_encoder", "projection_dim")
    h2, p2 = width("text_encoder_2", "hidden_size"), width("text_encoder_2", "projection_dim")
    t5 = width("text_encoder_3", "d_model")
    joint, pooled = transformer.get("joint_attention_dim"), transformer.get("pooled_projection_dim")
    cfg = os.path.join(path, "transformer", "config.json")
    problems = []
    if t5 != joint:
        problems.append(
            f"text_encoder_3 (T5) has d_model={t5} but {cfg} has joint_attention_dim={joint}"
        )
    if h1 + h2 > (joint or 0):
        problems.append(
            f"the CLIPs' hidden widths {h1} + {h2} = {h1 + h2} exceed joint_attention_dim={joint} "
            "(encode_prompt would crop them)"
        )
    if p1 + p2 != pooled:
        problems.append(
            f"the CLIPs' projection widths {p1} + {p2} = {p1 + p2} != "
            f"pooled_projection_dim={pooled}"
        )
    in_channels = transformer.get("in_channels")
    if in_channels is not None and in_channels != spec["latent_channels"]:
        problems.append(
            f"the VAE has latent_channels={spec['latent_channels']} but the transformer "
            f"in_channels={in_channels}"
        )
    if problems:
        raise UserError(
            f"The text encoders / VAE in {path} do not fit its transformer: "
            + "; ".join(problems)
            + ". Use the text encoders and VAE that the transformer was trained with "
            "(the pipeline's own folders)."
        )
    return PipelineSpec(
        **spec,
        patch_size=int(transformer.get("patch_size", 2)),
        in_channels=in_channels,
        joint_attention_dim=joint,
        pooled_projection_dim=pooled,
        clip_widths=(h1, h2),
        clip_projections=(p1, p2),
        t5_width=t5,
    )


def check_resolution(spec: PipelineSpec, resolution: int) -> None:
    """`resolution` must give a latent side the transformer's patches tile.

    Raises:
      UserError: not positive, or not a multiple of `vae_scale * patch_size`.
    """
    step = spec.vae_scale * (spec.patch_size or 1)
    if resolution <= 0 or resolution % step:
        low = max(step, resolution // step * step)
        raise UserError(
            f"--resolution={resolution} must be a positive multiple of {step} (the VAE's "
            f"{spec.vae_scale} pixels per latent x the transformer's patch_size "
            f"{spec.patch_size or 1}); use e.g. {low} or {low + step}."
        )


# ------------------------------------------------------------ the torch side
@functools.cache
def import_torch():
    """torch, once diffusers and transformers are importable and quiet.

    Raises:
      UserError: one of them is not installed (the message says how to install).
    """
    try:
        import torch
        import transformers

        # transformers 5 warns, once diffusers imports CLIP's image processor, that
        # it falls back to PIL without torchvision; no image processor runs here.
        for handler in transformers.utils.logging._get_library_root_logger().handlers:
            handler.addFilter(_DropTorchvisionNotice())
        import diffusers
    except ImportError as e:
        raise UserError(f"{e.name or e} is not installed; {INSTALL_HINT}.") from None
    # The console shows our progress bars, not one per loaded component.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return torch


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def torch_device(name: str):
    """`torch.device(name)`, checked.

    Raises:
      UserError: an unknown name, or cuda where torch sees no GPU.
    """
    torch = import_torch()
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device={name!r}: use cpu or cuda (or cuda:N).")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device={name} but torch {torch.__version__} sees no GPU (a CPU build, or no "
            "driver): install a CUDA build of torch, or use --device cpu."
        )
    return torch.device(name)


def torch_dtype(name: str):
    """`torch.float32` etc. from its name (one of `TORCH_DTYPES`).

    Raises:
      UserError: another name.
    """
    torch = import_torch()
    if name not in TORCH_DTYPES:
        raise UserError(f"--torch_dtype={name!r}: use one of {', '.join(TORCH_DTYPES)}.")
    return getattr(torch, name)


def load_text_encoders(path: str, device: Any, dtype: Any = None):
    """The pipeline with its text encoders and tokenizers only (no transformer, no
    VAE: SD3.5-large's transformer alone is 8B parameters), on `device`, eval mode."""
    import_torch()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, transformer=None, vae=None, dtype=dtype)
    return pipe.to(device)


def encode_prompts(
    pipe: Any, prompts: Sequence[str], max_sequence_length: int, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    """`pipe.encode_prompt` of `prompts` (the same text to all three encoders, no CFG).

    Returns:
      `context (B, 77 + max_sequence_length, joint_attention_dim)` and
      `pooled (B, pooled_projection_dim)`, float32.
    """
    torch = import_torch()
    with torch.inference_mode():
        context, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
    return context.float().cpu().numpy(), pooled.float().cpu().numpy()


def load_vae(path: str, device: Any, dtype: Any = None):
    """The pipeline's `AutoencoderKL` on `device`, eval mode."""
    import_torch()
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype).to(device).eval()


def encode_images(vae: Any, images: np.ndarray, device: Any) -> np.ndarray:
    """Images `(B, H, W, 3)` uint8 -> scaled latents `(B, H / s, W / s, C)` float32
    (module docstring: the posterior mean, shifted and scaled)."""
    torch = import_torch()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = (x.to(device=device, dtype=vae.dtype) / 127.5) - 1.0
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mode()
    z = (z - _shift(vae)) * vae.config.scaling_factor
    return z.float().permute(0, 2, 3, 1).cpu().numpy()


def decode_latents(vae: Any, latents: np.ndarray, device: Any) -> np.ndarray:
    """Scaled latents `(B, h, w, C)` -> images `(B, h * s, w * s, 3)` float32 in
    [-1, 1], undoing the scale and shift as `StableDiffusion3Pipeline` does."""
    torch = import_torch()
    z = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).permute(0, 3, 1, 2)
    z = z.to(device=device, dtype=vae.dtype) / vae.config.scaling_factor + _shift(vae)
    with torch.inference_mode():
        x = vae.decode(z, return_dict=False)[0]
    return x.float().clamp(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()


def _shift(vae: Any) -> float:
    """SD3's VAEs have a shift_factor; SD1 / SDXL ones have None, meaning none."""
    return vae.config.shift_factor or 0.0


def free_memory(device: Any) -> None:
    """Returns a GPU's cached blocks once a stage's networks are dropped."""
    if device.type == "cuda":
        import_torch().cuda.empty_cache()


def batches(n: int, size: int) -> Iterator[slice]:
    """Slices `[0, size), [size, 2 size), ...` covering `range(n)`."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
