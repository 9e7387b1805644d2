"""Deployment exports: merged full params, or the adapters (and trained head) alone.

Both are safetensors files written atomically. A merged export is a plain hydra_jax checkpoint
(``checkpoints.load`` reads it; it has exactly the base architecture). An adapters export holds
the trainable tree ``{"adapters": ..., "params": ...}`` and the adapter spec as JSON metadata.

Any checkpoint ``checkpoints.load`` reads (a merged export included) converts to a Hugging Face
transformers directory (``checkpoints.save_hf``: the ViT / DINOv2 / SigLIP class that computes
the same function):

  python -m hydra_jax.export /tmp/run/export/merged.safetensors --hf /tmp/run/export/hf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import safetensors
from flax import traverse_util

from hydra_jax import adapters as adapters_lib
from hydra_jax import checkpoints


def save_merged(path: str | pathlib.Path, params, pre: checkpoints.Pretrained) -> None:
  """Saves merged params with the base model's kwargs and input normalisation."""
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  merged = checkpoints.Pretrained(jax.device_get(params), pre.model, pre.mean, pre.std,
                                  f"merged from {pre.source}")
  checkpoints.save(path, merged)


def save_adapters(path: str | pathlib.Path, trainable, spec: adapters_lib.AdapterSpec) -> None:
  """Saves the trainable tree and the spec that reads it."""
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep="/")
  checkpoints.native.write_safetensors(
      path, flat, {"hydra_jax_adapter_spec": json.dumps(dataclasses.asdict(spec))})


def load_adapters(path: str | pathlib.Path):
  """Reads ``save_adapters`` output; returns (trainable tree, AdapterSpec)."""
  with safetensors.safe_open(str(path), framework="numpy") as f:
    meta = f.metadata() or {}
    if "hydra_jax_adapter_spec" not in meta:
      raise ValueError(f"{path} is not a hydra_jax adapters export (no adapter spec metadata)")
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  fields = json.loads(meta["hydra_jax_adapter_spec"])
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  trainable = traverse_util.unflatten_dict(tensors, sep="/")
  trainable.setdefault("adapters", {})
  trainable.setdefault("params", {})
  return trainable, adapters_lib.AdapterSpec(**fields)


def main(argv: Sequence[str] | None = None) -> None:
  """Converts a checkpoint to a transformers directory; ``argv`` without the program name."""
  p = argparse.ArgumentParser(prog="python -m hydra_jax.export",
                              description="Writes a checkpoint as a Hugging Face directory.")
  p.add_argument("checkpoint", help="any format checkpoints.load reads (e.g. merged.safetensors)")
  p.add_argument("--hf", required=True, help="directory to write (an earlier export is replaced)")
  p.add_argument("--dtype", default="float32", choices=checkpoints.hf_export.DTYPES)
  p.add_argument("--labels", default=None, help="comma-separated class names (default LABEL_i)")
  args = p.parse_args(argv)
  labels = args.labels.split(",") if args.labels else None
  arch = checkpoints.save_hf(args.hf, checkpoints.load(args.checkpoint), labels=labels,
                             dtype=args.dtype)
  print(f"wrote {args.hf} ({arch})")


if __name__ == "__main__":
  main()
