"""hydra_jax: Hydra, HydraLoRA, LoRA and sequential adapters for Vision Transformers in JAX."""

__version__ = "0.1.0"
