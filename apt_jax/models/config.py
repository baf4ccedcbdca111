"""`MMDiTConfig`: the architecture of an SD3-style MMDiT, and its variant table.

Field names follow diffusers' `SD3Transformer2DModel` config where they
overlap, so `MMDiTConfig(**diffusers_config_fields)` builds the same
network. Fields past those (marked "apt_jax" below) control how the network
is executed (scan, remat, dtypes, attention kernel, video patching) and have
defaults that reproduce diffusers' numerics in fp32.

Every contradiction between fields raises a `ValueError` naming the field and
the fix at construction time, before anything is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from apt_jax.errors import UserError

QK_NORMS = (None, "rms_norm")
ATTENTION_IMPLEMENTATIONS = ("xla", "xla_autodiff", "cudnn")
# The kernels whose backward pass JAX can differentiate again (exact R1 / R2, the
# gradient penalty); cuDNN's fused attention has no second-order rule.
SECOND_ORDER_ATTENTION = ("xla", "xla_autodiff")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of an MMDiT (SD3 / SD3.5 joint-attention transformer).

    Attributes (diffusers `SD3Transformer2DModel` names):
      sample_size: latent side the position table is centred on (SD3: 128).
      patch_size: spatial patch side p.
      in_channels, out_channels: latent channels in and out.
      num_layers: number of joint transformer blocks (the last is
        context-pre-only, as in SD3).
      attention_head_dim, num_attention_heads: inner width D = heads * head_dim.
      joint_attention_dim: width of the text-encoder context states.
      caption_projection_dim: width the context is projected to (must be D).
      pooled_projection_dim: width of the pooled text vector.
      pos_embed_max_size: side of the 2D sin-cos table that is centre-cropped
        to the patch grid; None computes the table for the exact grid.
      qk_norm: None or "rms_norm" (per-head RMSNorm on queries and keys).
      dual_attention_layers: block indices with an extra image self-attention
        (SD3.5 "MMDiT-X").

    Attributes (apt_jax):
      patch_size_t: temporal patch for video latents `(B, F, H, W, C)`; None
        means an image-only model.
      scan_layers: stack runs of identical blocks with `nn.scan` (compile time
        flat in depth; parameters get a leading "layers" axis).
      remat_policy: "none", "full" (save nothing), "dots" (save matmuls),
        "dots_no_batch" (save matmuls without batch dims: weights-stationary).
      attention_implementation: "xla" (apt_jax's kernel with a hand-written
        backward pass; differentiable twice in reverse mode: exact R1),
        "xla_autodiff" (`jax.nn.dot_product_attention`, autodiff; also forward
        mode) or "cudnn" (fused, GPU only, first-order only). Overridable per call.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int | None = 96
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    # apt_jax fields.
    patch_size_t: int | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str = "xla"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        # JSON gives lists and diffusers allows out_channels=None; normalise.
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers or ()))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        for name in (
            "sample_size",
            "patch_size",
            "in_channels",
            "out_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
            "caption_projection_dim",
            "pooled_projection_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"MMDiTConfig.{name} must be a positive int, got {value!r}.")
        if self.pos_embed_max_size is not None and self.pos_embed_max_size <= 0:
            raise UserError(
                f"MMDiTConfig.pos_embed_max_size must be positive or None, got "
                f"{self.pos_embed_max_size!r}."
            )
        if self.patch_size_t is not None and self.patch_size_t <= 0:
            raise UserError(
                f"MMDiTConfig.patch_size_t must be a positive int (video) or None (images "
                f"only), got {self.patch_size_t!r}."
            )
        if self.qk_norm not in QK_NORMS:
            raise UserError(
                f"MMDiTConfig.qk_norm={self.qk_norm!r} is unknown; use one of {QK_NORMS}."
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(
                f"MMDiTConfig.attention_implementation={self.attention_implementation!r} is "
                f"unknown; use one of {ATTENTION_IMPLEMENTATIONS}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(
                f"MMDiTConfig.remat_policy={self.remat_policy!r} is unknown; use one of "
                f"{REMAT_POLICIES}."
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(
                    f"MMDiTConfig.{name}={getattr(self, name)!r} is unknown; use one of {DTYPES}."
                )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise UserError(
                f"MMDiTConfig.dual_attention_layers has indices {bad} outside "
                f"[0, num_layers={self.num_layers}); drop them or raise num_layers."
            )
        if len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise UserError(
                f"MMDiTConfig.dual_attention_layers={self.dual_attention_layers} has duplicates."
            )
        if self.caption_projection_dim != self.inner_dim:
            raise UserError(
                f"MMDiTConfig.caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim}: the context "
                "stream joins the image stream in one attention; set it to "
                f"{self.inner_dim}."
            )

    # -------------------------------------------------------------- properties
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def is_video(self) -> bool:
        return self.patch_size_t is not None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> MMDiTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    # ------------------------------------------------------------ input checks
    def check_inputs(
        self,
        x_shape: Sequence[int],
        t_shape: Sequence[int] | None = None,
        context_shape: Sequence[int] | None = None,
        pooled_shape: Sequence[int] | None = None,
    ) -> None:
        """Raises ValueError if inputs of these shapes cannot go through the model.

        Args:
          x_shape: `(B, H, W, C)` image or `(B, F, H, W, C)` video latents.
          t_shape: `(B,)`.
          context_shape: `(B, L, joint_attention_dim)`.
          pooled_shape: `(B, pooled_projection_dim)`.
        """
        x_shape = tuple(x_shape)
        if len(x_shape) == 5:
            if not self.is_video:
                raise UserError(
                    f"Got video latents of shape {x_shape} (B, F, H, W, C) but this "
                    "MMDiTConfig is image-only: set patch_size_t (e.g. 1) to enable video."
                )
            frames = x_shape[1]
            if frames % self.patch_size_t:
                raise UserError(
                    f"Video has {frames} frames, not divisible by patch_size_t="
                    f"{self.patch_size_t}; pad or crop the frames, or change patch_size_t."
                )
        elif len(x_shape) == 4:
            if self.is_video and self.patch_size_t != 1:
                raise UserError(
                    f"Got image latents {x_shape} for a video config with patch_size_t="
                    f"{self.patch_size_t}; pass them as (B, F, H, W, C) clips with F a "
                    "multiple of patch_size_t."
                )
        else:
            raise UserError(
                f"Latents must be (B, H, W, C) images or (B, F, H, W, C) video, got shape "
                f"{x_shape}."
            )
        batch = x_shape[0]
        height, width, channels = x_shape[-3:]
        if channels != self.in_channels:
            raise UserError(
                f"Latents have {channels} channels (last axis, channels-last) but "
                f"in_channels={self.in_channels}."
            )
        p = self.patch_size
        if height % p or width % p:
            raise UserError(
                f"Latent size {height}x{width} is not divisible by patch_size={p}; pad or "
                "crop the latents, or change patch_size."
            )
        if self.pos_embed_max_size is not None:
            grid = self.pos_embed_max_size
            if height // p > grid or width // p > grid:
                raise UserError(
                    f"Latent size {height}x{width} is {height // p}x{width // p} patches, "
                    f"larger than the position table (pos_embed_max_size={grid}); raise "
                    "pos_embed_max_size or use smaller latents."
                )
        if t_shape is not None and tuple(t_shape) != (batch,):
            raise UserError(f"t must have shape (B,)=({batch},), got {tuple(t_shape)}.")
        if context_shape is not None:
            context_shape = tuple(context_shape)
            if len(context_shape) != 3 or context_shape[0] != batch:
                raise UserError(
                    f"context must be (B={batch}, L, {self.joint_attention_dim}), got "
                    f"{context_shape}."
                )
            if context_shape[-1] != self.joint_attention_dim:
                raise UserError(
                    f"context width {context_shape[-1]} != joint_attention_dim="
                    f"{self.joint_attention_dim}."
                )
        if pooled_shape is not None and tuple(pooled_shape) != (batch, self.pooled_projection_dim):
            raise UserError(
                f"pooled must be (B={batch}, pooled_projection_dim="
                f"{self.pooled_projection_dim}), got {tuple(pooled_shape)}."
            )


# ---------------------------------------------------------------------------
# Variant table. The released shapes come from the diffusers configs of the
# Stability AI checkpoints (reference.md section 6); their parameter counts are
# checked against the counts diffusers reports, in tests/test_models.py.
# ---------------------------------------------------------------------------
_SD3_COMMON = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
)

VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny model for unit tests: 2 layers, D = 32.
    "test": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=20,
        pos_embed_max_size=8,
    ),
    # The embedded 8x8 digits: 2x2 patches, 16 image tokens (a 4x cheaper step
    # than one pixel per token, at the same sample quality in our runs).
    "digits": dict(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=8,
    ),
    # The digits model shrunk for seconds-long smoke runs and tests (the ":tiny"
    # config variants). SFT and distillation share it, so a tiny teacher and a
    # tiny student always have the same shape.
    "digits-tiny": dict(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=8,
    ),
    "sd3-medium": dict(
        _SD3_COMMON,
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=192,
    ),
    "sd3.5-medium": dict(
        _SD3_COMMON,
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    "sd3.5-large": dict(
        _SD3_COMMON,
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
}

# Moving digits (apt_jax.data.moving_digits): the digits models on 12x12
# frames, 2x2 spatial patches, one frame per patch, so an image (a one-frame
# clip) is 36 tokens and a 4-frame clip 144. Measured on CPU: 4x4 patches on
# 16x16 frames (16 tokens a frame) learned far slower (15% digit accuracy after
# 800 image steps, 44% here after 600), and 2x2 patches on 16x16 x 8 frames
# (512 tokens) cost ~9x a step of 128 tokens.
_MOVING_DIGITS = dict(sample_size=12, patch_size_t=1, pos_embed_max_size=6)
VARIANTS["digits-video"] = dict(VARIANTS["digits"], **_MOVING_DIGITS)
VARIANTS["digits-tiny-video"] = dict(VARIANTS["digits-tiny"], **_MOVING_DIGITS)

# Parameter counts diffusers reports for the released checkpoints.
RELEASED_PARAMETER_COUNTS = {
    "sd3-medium": 2_028_328_000,
    "sd3.5-medium": 2_243_171_520,
    "sd3.5-large": 8_056_627_520,
}


def get_variant(name: str, **overrides: Any) -> MMDiTConfig:
    """Returns the `MMDiTConfig` of a named variant, with field overrides."""
    if name not in VARIANTS:
        raise UserError(f"Unknown MMDiT variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return MMDiTConfig(**{**VARIANTS[name], **overrides})
