"""A finished run's merged model, exported to Hugging Face transformers, scored in PyTorch.

  python benchmarks/transformers_check.py --workdir /tmp/h
  python benchmarks/transformers_check.py --workdir /tmp/l --peft   # a LoRA run, through PEFT

Writes ``<workdir>/export/hf`` from ``export/merged.safetensors`` (``python -m hydra_jax.export``),
loads it with ``AutoModelForImageClassification`` and ``AutoImageProcessor`` and scores the run's
test split (its ``data.test_limit`` first images) from the raw images, then prints the accuracy
beside the run's own ``results.json``. With ``--peft`` it writes ``<workdir>/export/peft``
(``--peft`` of the export CLI: the base model and a PEFT adapter) and scores
``PeftModel.from_pretrained(base, lora)`` instead. Needs torch, transformers and peft
(requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_collections
import numpy as np
import peft
import torch
import transformers

from hydra_jax import build, export


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished train.py run")
  p.add_argument("--batch", type=int, default=200)
  p.add_argument("--peft", action="store_true", help="score the LoRA run through PEFT instead")
  args = p.parse_args()
  workdir = pathlib.Path(args.workdir)
  if args.peft:
    out = workdir / "export" / "peft"
    export.main([str(workdir), "--peft", str(out)])
    hf_dir = out / "base"
    model = transformers.AutoModelForImageClassification.from_pretrained(hf_dir)
    model = peft.PeftModel.from_pretrained(model, out / "lora").eval()
  else:
    hf_dir = workdir / "export" / "hf"
    export.main([str(workdir / "export" / "merged.safetensors"), "--hf", str(hf_dir)])
    model = transformers.AutoModelForImageClassification.from_pretrained(hf_dir).eval()
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  source = build.open_source(config.data, config.data.test_split)
  count = min(len(source), config.data.test_limit or len(source))
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
  name = (f"{type(model.get_base_model()).__name__} + PEFT LoRA" if args.peft
          else type(model).__name__)
  print(json.dumps({"model": name, "test_images": count, "transformers_accuracy": correct / count,
                    "hydra_jax_accuracy": ours}))


if __name__ == "__main__":
  main()
