"""Linear probe on the offline default: only the new head trains.

  python train.py --config configs/linear_probe.py --workdir /tmp/hydra_probe
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.adapter = default.adapter_config("none")
  c.train_patterns = ("head/.*",)
  return c
