"""A finished run's merged model, exported to PyTorch (transformers or timm), scored there.

  python benchmarks/transformers_check.py --workdir /tmp/h
  python benchmarks/transformers_check.py --workdir /tmp/l --peft   # a LoRA run, through PEFT
  python benchmarks/transformers_check.py --workdir /tmp/h --timm   # timm's VisionTransformer
  python benchmarks/transformers_check.py --workdir /tmp/lg --peft --timm   # PEFT on timm

Writes ``<workdir>/export/hf`` from ``export/merged.safetensors`` (``python -m hydra_jax.export``),
loads it with ``AutoModelForImageClassification`` and ``AutoImageProcessor`` and scores the run's
test split (its ``data.test_limit`` first images) from the raw images, then prints the accuracy
beside the run's own ``results.json``. With ``--peft`` it writes ``<workdir>/export/peft``
(``--peft`` of the export CLI: the base model and a PEFT adapter) and scores
``PeftModel.from_pretrained(base, lora)`` instead. With ``--timm`` the model is timm's
(``<workdir>/export/timm``, or with ``--peft`` ``export/peft_timm``), built by
``timm.create_model("local-dir:...", pretrained=True)``; the images are resized (PIL bicubic) and
normalised as its ``pretrained_cfg`` says by hand, since timm's transforms need torchvision, which
has no CPU build here. The model must be one timm computes (pooled "tok", "gap" or "map": the
default run's "tok+gap" is not; ``--config.model.pool=gap`` runs one that is). Needs torch,
transformers, peft and timm (requirements-test*.txt).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import numpy as np
import peft
import PIL.Image
import torch
import transformers

from hydra_jax import build, export

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from timm_import import import_timm  # noqa: E402


def _timm_pixels(images, cfg) -> torch.Tensor:
  """uint8 HWC images -> timm's input: bicubic resize to cfg's input size, then (x - mean) / std."""
  _, h, w = cfg["input_size"]
  x = np.stack([np.asarray(PIL.Image.fromarray(im).resize((w, h), PIL.Image.BICUBIC))
                for im in images]).astype(np.float32) / 255
  x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished train.py run")
  p.add_argument("--batch", type=int, default=200)
  p.add_argument("--peft", action="store_true", help="score the LoRA run through PEFT instead")
  p.add_argument("--timm", action="store_true", help="score it in timm instead of transformers")
  args = p.parse_args()
  workdir = pathlib.Path(args.workdir)
  library = "timm" if args.timm else "hf"
  if args.peft:  # the run's base model and its adapter
    out = workdir / "export" / ("peft_timm" if args.timm else "peft")
    export.main([str(workdir), "--peft", str(out), "--peft-target",
                 "timm" if args.timm else "transformers"])
    base_dir = out / "base"
  else:  # the merged model
    base_dir = workdir / "export" / library
    export.main([str(workdir / "export" / "merged.safetensors"), f"--{library}", str(base_dir)])
  if args.timm:
    model = import_timm().create_model(f"local-dir:{base_dir}", pretrained=True)
    preprocess = functools.partial(_timm_pixels, cfg=model.pretrained_cfg)
  else:
    model = transformers.AutoModelForImageClassification.from_pretrained(base_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(base_dir)
    preprocess = lambda images: processor(images=images, return_tensors="pt")["pixel_values"]  # noqa: E731
  name = f"{'timm ' if args.timm else ''}{type(model).__name__}"
  if args.peft:
    model = peft.PeftModel.from_pretrained(model, out / "lora")
    name += " + PEFT LoRA"
  model.eval()
  config = build.run_config(workdir)
  source = build.open_source(config.data, config.data.test_split)
  count = min(len(source), config.data.test_limit or len(source))
  correct = 0
  for start in range(0, count, args.batch):
    items = [source[i] for i in range(start, min(start + args.batch, count))]
    images = [np.repeat(x["image"], 3, -1) if x["image"].shape[-1] == 1 else x["image"]
              for x in items]
    with torch.no_grad():
      output = model(preprocess(images))
    logits = output if isinstance(output, torch.Tensor) else output.logits
    correct += int((logits.argmax(-1).numpy() == np.array([x["label"] for x in items])).sum())
  ours = json.loads((workdir / "results.json").read_text())["test_accuracy"]
  print(json.dumps({"model": name, "test_images": count, "pytorch_accuracy": correct / count,
                    "hydra_jax_accuracy": ours}))


if __name__ == "__main__":
  main()
