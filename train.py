"""Fine-tunes a ViT with low-rank adapters.

  python train.py --config configs/default.py --workdir /tmp/hydra_default
  python train.py --config configs/lora.py --config.optim.lr=5e-4 --workdir /tmp/lora
"""

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from hydra_jax.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds are chatty at INFO
  logging.getLogger("hydra_jax").setLevel(logging.INFO)
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(json.dumps(results, sort_keys=True))
  print(f"test accuracy ({results['model']} model): {results['test_accuracy']:.4f}")


if __name__ == "__main__":
  app.run(main)
