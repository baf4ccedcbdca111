"""A tiny random SD3 pipeline, built and saved offline, for the encode / decode / export tests.

`save_tiny_sd3(path)` writes a `StableDiffusion3Pipeline` folder exactly as
`save_pretrained` writes a real one (model_index.json, vae/, text_encoder/,
text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/,
transformer/, scheduler/), with every network a few thousand random weights:

    vae             AutoencoderKL, 2 blocks (2 pixels per latent cell; SD3's
                    has 4 blocks, 8 pixels), 4 latent channels, SD3's shift
                    and scale factors
    text_encoder    CLIPTextModelWithProjection, hidden 8, projection 8
    text_encoder_2  CLIPTextModelWithProjection, hidden 8, projection 8
    text_encoder_3  T5EncoderModel, d_model 16 (gated-gelu, as T5 v1.1)
    transformer     SD3Transformer2DModel, 2 layers, inner width 16,
                    joint_attention_dim 16 (= T5's d_model, which the two
                    CLIP widths 8 + 8 fit inside), pooled_projection_dim 16
                    (= 8 + 8, the two CLIP projections)
    scheduler       FlowMatchEulerDiscreteScheduler(shift=3.0)

The widths keep SD3's relations (CLIP-L 768 + CLIP-G 1280 <= T5 4096 =
joint_attention_dim; 768 + 1280 = 2048 = pooled_projection_dim), so
`encode_prompt` gives `context` (B, 77 + L, 16) and `pooled` (B, 16).

Nothing is downloaded: the CLIP tokenizers are read from a vocab.json and a
merges.txt written here (byte-level BPE over lowercase letters, digits and a
few merges), the T5 tokenizer is a `tokenizers` Unigram model over a small
piece list. Words outside the vocabulary still tokenize (into letters), so
any lowercase ASCII caption works.

Importing this module imports torch, diffusers and transformers: tests call
`pytest.importorskip` first.
"""

from __future__ import annotations

import json
import os
import shutil
import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# SD3's VAE constants (stabilityai/stable-diffusion-3-medium, vae/config.json), so a
# test sees whether shift and scale are applied.
SHIFT_FACTOR = 0.0609
SCALING_FACTOR = 1.5305
LATENT_CHANNELS = 4
VAE_SCALE = 2  # 2 ** (len(block_out_channels) - 1)
CLIP_WIDTHS = (8, 8)  # hidden_size of text_encoder, text_encoder_2 (and their projection_dim)
JOINT_ATTENTION_DIM = 16  # T5's d_model
POOLED_PROJECTION_DIM = sum(CLIP_WIDTHS)
# Caption words with their own tokens (others fall back to letters).
WORDS = ("a", "red", "blue", "green", "circle", "square", "on", "white", "black", "photo", "of")
# A few byte-level BPE merges, so the CLIP tokenizers really merge: "r e", "re d</w>", ...
MERGES = ("r e", "re d</w>", "o n</w>", "o f</w>", "l u", "b lu", "blu e</w>")


def _clip_vocab() -> dict[str, int]:
    """CLIP's layout: characters, characters that end a word (`</w>`), merges, specials."""
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = list(chars) + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def write_clip_vocab(folder: str) -> None:
    """Writes `vocab.json` and `merges.txt` for a CLIP tokenizer into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(_clip_vocab(), f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def clip_tokenizer(vocab_folder: str, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer read from the vocab.json / merges.txt in `vocab_folder`."""
    return CLIPTokenizer(
        vocab=os.path.join(vocab_folder, "vocab.json"),
        merges=os.path.join(vocab_folder, "merges.txt"),
        model_max_length=model_max_length,
    )


def t5_tokenizer() -> T5TokenizerFast:
    """A Unigram T5 tokenizer: T5's specials (<pad> 0, </s> 1, <unk> 2), then pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in WORDS]
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _randomize(module: torch.nn.Module, std: float) -> None:
    """Every weight random: diffusers zero-inits SD3's output layers and gates, which
    would make the transformer's velocity zero whatever its input."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name):  # norm scales around 1, biases around 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def build_tiny_sd3(vocab_folder: str, seed: int = 0, clip_length: int = 77):
    """A tiny random `StableDiffusion3Pipeline` (module docstring), in float32, eval mode.

    Args:
      vocab_folder: where the CLIP vocab.json / merges.txt are written and read from.
      seed: torch seed for every network's weights.
      clip_length: the CLIP tokenizers' model_max_length (and position embeddings).
    """
    write_clip_vocab(vocab_folder)
    tokenizer = clip_tokenizer(vocab_folder, clip_length)
    tokenizer_2 = clip_tokenizer(vocab_folder, clip_length)
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)

    def clip(width: int, act: str) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            projection_dim=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=clip_length,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config)

    text_encoder = clip(CLIP_WIDTHS[0], "quick_gelu")  # as CLIP-L
    text_encoder_2 = clip(CLIP_WIDTHS[1], "gelu")  # as CLIP-G
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=JOINT_ATTENTION_DIM,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=SHIFT_FACTOR,
        scaling_factor=SCALING_FACTOR,
        use_quant_conv=False,  # as SD3's VAE
        use_post_quant_conv=False,
    )
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_PROJECTION_DIM,
        pos_embed_max_size=16,
    )
    _randomize(transformer, 0.2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    for module in (vae, text_encoder, text_encoder_2, text_encoder_3, transformer):
        module.eval()
    return pipe


def save_tiny_sd3(path: str, seed: int = 0, clip_length: int = 77) -> str:
    """Builds the tiny pipeline and `save_pretrained`s it into `path` (safetensors).

    Returns:
      `path`, a folder `StableDiffusion3Pipeline.from_pretrained(path)` loads offline.
    """
    vocab = os.path.join(path, "clip_vocab")
    pipe = build_tiny_sd3(vocab, seed, clip_length)
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(vocab)  # the saved tokenizer folders carry their own vocabulary
    return path
