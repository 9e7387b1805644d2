"""LoRA baseline on the offline default (rank 8 on every block's attention query and value).

  python train.py --config configs/lora.py --workdir /tmp/hydra_lora
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("lora", rank=8, alpha=8.0)
  return c
