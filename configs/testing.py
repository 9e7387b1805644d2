"""A tiny random ViT on a few Fashion-MNIST images (tests; seconds on a CPU).

  python train.py --config configs/testing.py --workdir /tmp/hydra_testing
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  return default.get_testing_config()
