"""Low-rank adapters for the ViT: Hydra, sequential, LoRA and HydraLoRA.

Adapters are their own pytree (see ``transform``); every function here is pure over
(frozen params, adapters). Training calls ``forward``; deployment calls ``merge``.
"""

from hydra_jax.adapters.algebra import add, combine, negate, scale, weighted_sum
from hydra_jax.adapters.hydralora import (
    balance_loss,
    choose_num_heads,
    kmeans,
    router_probs,
    top_k_weights,
)
from hydra_jax.adapters.intercept import apply_intercepted, forward, merge_path
from hydra_jax.adapters.spec import (
    HYDRA_TARGETS,
    KINDS,
    LORA_TARGETS,
    AdapterSpec,
    Layer,
    find_layers,
    spec_from_config,
)
from hydra_jax.adapters.transform import delta, init, merge, unmerge

__all__ = [
    "HYDRA_TARGETS", "KINDS", "LORA_TARGETS", "AdapterSpec", "Layer", "add", "apply_intercepted",
    "balance_loss", "choose_num_heads", "combine", "delta", "find_layers", "forward", "init",
    "kmeans", "merge", "merge_path", "negate", "router_probs", "scale", "spec_from_config",
    "top_k_weights", "unmerge", "weighted_sum",
]
