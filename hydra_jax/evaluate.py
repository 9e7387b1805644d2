"""Scores a checkpoint with its own head on a config's validation and test splits.

Any file ``checkpoints.load`` reads (a run's ``export/merged.safetensors``, a task sum written by
``hydra_jax.merge``, a Hugging Face or timm classifier) is run as the config runs its model
(``model.image_size``, ``dtype``, ``attention``; ``model.pixel_mean`` / ``pixel_std`` where set,
else the normalisation the checkpoint records) on ``data``'s splits and limits, over the mesh
``parallel`` describes (``num_devices``; ``fsdp`` splits the weights; ``distributed`` joins the
processes of a multi-host run, each feeding its share of every batch):

  python -m hydra_jax.evaluate --config configs/default.py \\
      --checkpoint /tmp/h/export/merged.safetensors
  python -m hydra_jax.evaluate --config configs/default.py --checkpoint /tmp/soup.safetensors \\
      --config.data.test_limit=0
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hydra_jax import build, checkpoints, loop, parallel


def evaluate_pretrained(config, pre: checkpoints.Pretrained) -> dict:
  """``pre``'s accuracy on ``config``'s validation and test splits (their limits), on the mesh of
  ``config.parallel`` (batches split over it; weights replicated, or split under ``fsdp``).

  Returns:
    ``loop.score``'s {val,test}_accuracy, {val,test}_images and eval_seconds.

  Raises:
    ValueError: ``pre``'s head does not have ``data.num_classes`` classes, or
      ``data.eval_batch_size`` does not split over the mesh.
  """
  model = checkpoints.build_model(pre, **build.runtime_fields(config))
  if model.num_classes != config.data.num_classes:
    raise ValueError(f"the model's head has {model.num_classes} classes; data.num_classes is "
                     f"{config.data.num_classes}")
  mesh = loop.config_mesh(config)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  params = jax.device_put(pre.params, parallel.frozen_shardings(
      mesh, pre.params, fsdp=config.parallel.fsdp, min_size=config.parallel.fsdp_min_size))
  _, val_src, test_src = loop.sources(config)
  return loop.score(config, mesh, lambda b: apply(params, b["image"]), val_src, test_src)


def evaluate_checkpoint(config, path) -> dict:
  """``evaluate_pretrained`` of the checkpoint at ``path``, its position embedding resampled to
  ``model.image_size`` and its input normalisation ``model.pixel_mean`` / ``pixel_std`` where
  the config sets them."""
  pre = checkpoints.load(path, image_size=config.model.image_size)
  mean, std = build.pixel_stats(config.model, pre.mean, pre.std)
  return evaluate_pretrained(config, dataclasses.replace(pre, mean=mean, std=std))


def main(argv) -> None:
  """absl entry point: prints one JSON line of accuracies."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  try:
    parallel.initialize_distributed(**config.parallel.distributed)
    scores = evaluate_checkpoint(config, flags.FLAGS.checkpoint)
  except (ValueError, OSError) as e:  # refusals and bad paths name the reason
    raise app.UsageError(str(e)) from None
  if jax.process_index() == 0:
    print(json.dumps({"checkpoint": flags.FLAGS.checkpoint,
                      **{k: float(v) if isinstance(v, np.floating) else v
                         for k, v in scores.items()}}))


if __name__ == "__main__":  # flags only here: importing the module defines none
  config_flags.DEFINE_config_file("config", None, "Python config file (get_config()): the data "
                                  "and how the model runs.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Any file checkpoints.load reads, with a head of "
                      "data.num_classes classes.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
