"""Models: the ViT family."""

from hydra_jax.models.vit import PATCHES, SIZES, ViT, param_count, variant

__all__ = ["PATCHES", "SIZES", "ViT", "param_count", "variant"]
