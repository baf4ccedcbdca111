"""apt_jax: diffusion post-training (SFT, distillation, APT) in JAX/Flax."""

__version__ = "0.1.0"
