"""Adapter comparison: linear probe, LoRA, sequential, Hydra, HydraLoRA, full fine-tuning.

  python benchmarks/adapters_study.py                      # offline default data, 3 seeds
  python benchmarks/adapters_study.py --dataset cifar100 --num_classes 100 \\
      --train_split "train[:800]" --val_split "train[45000:45200]" --data_dir ~/tfds

Every method gets the same budget: the same pre-trained backbone, resolution, epochs, batch and
images; each method keeps its config's learning rate (configs/*.py). Writes a table
(mean +- std test accuracy of the merged model over seeds, trainable parameters, train time) to
STUDY.md, a plot to study.png and raw results to study.jsonl in --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ and hydra_jax/

from configs import default as hydra
from configs import full_finetune, hydralora, linear_probe, lora, sequential

METHODS = {"linear probe": linear_probe, "LoRA": lora, "sequential": sequential,
           "Hydra": hydra, "HydraLoRA": hydralora, "full fine-tune": full_finetune}


def _config(module, args, seed: int):
  c = module.get_config()
  c.seed = seed
  c.model.image_size = args.image_size
  c.num_epochs = args.epochs
  c.eval_every_epochs = args.epochs
  c.data.test_limit = args.test_limit
  c.progress = False
  c.export = False
  for field in ("dataset", "num_classes", "train_split", "val_split", "test_split", "data_dir"):
    value = getattr(args, field)
    if value is not None:
      c.data[{"dataset": "name"}.get(field, field)] = value
  return c


def run(args) -> list[dict]:
  from hydra_jax.loop import train_and_evaluate  # after argument parsing: jax starts slowly

  rows = []
  for name, module in METHODS.items():
    for seed in args.seeds:
      with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        results = train_and_evaluate(_config(module, args, seed), workdir)
        seconds = time.perf_counter() - t0
      row = dict(method=name, seed=seed, test_accuracy=results["test_accuracy"],
                 val_accuracy=results["val_accuracy"], seconds=seconds,
                 trainable_params=results["trainable_params"])
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def _summary(rows: list[dict]) -> list[dict]:
  out = []
  for name in METHODS:
    mine = [r for r in rows if r["method"] == name]
    if not mine:
      continue
    acc = [100 * r["test_accuracy"] for r in mine]
    out.append(dict(method=name, mean=statistics.mean(acc),
                    std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    params=mine[0]["trainable_params"],
                    seconds=statistics.mean(r["seconds"] for r in mine), n=len(mine)))
  return out


def write_outputs(rows: list[dict], args, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = _summary(rows)
  lines = [
      "# Adapter study", "",
      f"Command: `{args.command}`", "",
      f"Data: {args.dataset or 'fashion_mnist_offline'} (splits: train "
      f"{args.train_split or 'train[:800]'}, val {args.val_split or 'train[54000:54200]'}), "
      f"test accuracy on the first {args.test_limit} test images (of the merged model; "
      f"HydraLoRA's is unmerged: its router depends on the input); bundled pre-trained "
      f"ViT-S/14 at {args.image_size} px, {args.epochs} epochs, batch 32, "
      f"seeds {', '.join(map(str, args.seeds))}; measured on 2 CPU cores.", "",
      "| method | test accuracy (%) | trainable params | train + eval time (s) |",
      "|---|---|---|---|",
  ]
  lines += [f"| {s['method']} | {s['mean']:.1f} ± {s['std']:.1f} | {s['params']:,} | "
            f"{s['seconds']:.0f} |" for s in summary]
  lines += ["", "![study](study.png)", ""]
  (out / "STUDY.md").write_text("\n".join(lines))
  (out / "study.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.bar([s["method"] for s in summary], [s["mean"] for s in summary],
         yerr=[s["std"] for s in summary], capsize=4, color="#4c72b0")
  lo = min(s["mean"] - s["std"] for s in summary)
  ax.set_ylim(max(0, lo - 5), min(100, max(s["mean"] + s["std"] for s in summary) + 3))
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"mean ± std over {len(args.seeds)} seeds")
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  fig.savefig(out / "study.png", dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
  p.add_argument("--image_size", type=int, default=56)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--test_limit", type=int, default=1000)
  p.add_argument("--dataset", default=None, help="a tfds name (default: offline Fashion-MNIST)")
  p.add_argument("--num_classes", type=int, default=None)
  p.add_argument("--train_split", default=None)
  p.add_argument("--val_split", default=None)
  p.add_argument("--test_split", default=None)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent)
  args = p.parse_args(argv)
  args.command = "python benchmarks/adapters_study.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)
  rows = run(args)
  write_outputs(rows, args, args.out)


if __name__ == "__main__":
  main()
