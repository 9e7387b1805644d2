"""Models: the ViT family."""

from hydra_jax.models.vit import ARCHITECTURE_DEFAULTS, PATCHES, SIZES, ViT, param_count, variant

__all__ = ["ARCHITECTURE_DEFAULTS", "PATCHES", "SIZES", "ViT", "param_count", "variant"]
