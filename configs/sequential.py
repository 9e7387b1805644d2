"""Sequential-only baseline (Hydra without its parallel branch) on the offline default.

  python train.py --config configs/sequential.py --workdir /tmp/hydra_sequential

Rank 4 on the same layers as Hydra's 2 + 2: the same rank budget, fewer parameters (Hydra's
parallel branch on the MLP's Dense_1 reads the 4x wider hidden layer): 83,040 vs 119,904 on
ViT-S/14, 165,984 vs 239,712 on ViT-B/16.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("sequential", rank=4, scale=1.0)
  return c
