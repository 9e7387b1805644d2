"""HydraLoRA on the offline default: shared A, 3 B heads, a per-token router on query and value.

  python train.py --config configs/hydralora.py --workdir /tmp/hydra_hydralora

The router depends on the input, so the final model is evaluated unmerged.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("hydralora", num_heads=3)  # rank 8, alpha 8
  return c
