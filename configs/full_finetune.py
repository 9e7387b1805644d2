"""Full fine-tuning on the offline default: every parameter trains.

  python train.py --config configs/full_finetune.py --workdir /tmp/hydra_full
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("none")
  c.train_patterns = (".*",)
  c.optim.lr = 1e-4  # full fine-tuning needs a smaller step than adapters
  return c
