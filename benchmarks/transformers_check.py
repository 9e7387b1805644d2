"""A finished run's merged model, exported to Hugging Face transformers, scored in PyTorch.

  python benchmarks/transformers_check.py --workdir /tmp/h

Writes ``<workdir>/export/hf`` from ``export/merged.safetensors`` (``python -m hydra_jax.export``),
loads it with ``AutoModelForImageClassification`` and ``AutoImageProcessor`` and scores the run's
test split (its ``data.test_limit`` first images) from the raw images, then prints the accuracy
beside the run's own ``results.json``. Needs torch and transformers (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_collections
import numpy as np
import torch
import transformers

from hydra_jax import build, export


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished train.py run")
  p.add_argument("--batch", type=int, default=200)
  args = p.parse_args()
  workdir = pathlib.Path(args.workdir)
  hf_dir = workdir / "export" / "hf"
  export.main([str(workdir / "export" / "merged.safetensors"), "--hf", str(hf_dir)])
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  source = build.open_source(config.data, config.data.test_split)
  count = min(len(source), config.data.test_limit or len(source))
  model = transformers.AutoModelForImageClassification.from_pretrained(hf_dir).eval()
  processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
  correct = 0
  for start in range(0, count, args.batch):
    items = [source[i] for i in range(start, min(start + args.batch, count))]
    images = [np.repeat(x["image"], 3, -1) if x["image"].shape[-1] == 1 else x["image"]
              for x in items]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      predicted = model(pixel_values=pixels).logits.argmax(-1).numpy()
    correct += int((predicted == np.array([x["label"] for x in items])).sum())
  ours = json.loads((workdir / "results.json").read_text())["test_accuracy"]
  print(json.dumps({"model": type(model).__name__, "test_images": count,
                    "transformers_accuracy": correct / count, "hydra_jax_accuracy": ours}))


if __name__ == "__main__":
  main()
