"""Sequential-only baseline (Hydra without its parallel branch) on the offline default.

  python train.py --config configs/sequential.py --workdir /tmp/hydra_sequential

Rank 4 on the same layers as Hydra's 2 + 2: the same parameter budget.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("sequential", rank=4, scale=1.0)
  return c
