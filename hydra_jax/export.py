"""Deployment exports: merged full params, or the adapters (and trained head) alone.

Both are safetensors files written atomically. A merged export is a plain hydra_jax checkpoint
(``checkpoints.load`` reads it; it has exactly the base architecture). An adapters export holds
the trainable tree ``{"adapters": ..., "params": ...}`` and the adapter spec as JSON metadata.

Any checkpoint ``checkpoints.load`` reads (a merged export included) converts to a Hugging Face
transformers directory (``checkpoints.save_hf``: the ViT / DINOv2 / SigLIP class that computes
the same function):

  python -m hydra_jax.export /tmp/run/export/merged.safetensors --hf /tmp/run/export/hf

or to a timm directory (``checkpoints.save_timm``; ``timm.create_model("local-dir:DIR",
pretrained=True)`` loads it):

  python -m hydra_jax.export /tmp/run/export/merged.safetensors --timm /tmp/run/export/timm

or to a big_vision ``.npz`` (``checkpoints.save_npz``; big_vision's ``vit.load`` reads it, inputs
in [-1, 1]):

  python -m hydra_jax.export /tmp/run/export/merged.safetensors --npz /tmp/run/export/bv.npz

A LoRA run's adapters and head convert to a Hugging Face PEFT adapter (``checkpoints.save_peft``),
written beside its base model as transformers loads it:

  python -m hydra_jax.export /tmp/run --peft /tmp/run/export/peft   # .../peft/base, .../peft/lora
  python -m hydra_jax.export /tmp/run --peft /tmp/run/export/peft --peft-target timm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
import safetensors
from flax import traverse_util

from hydra_jax import adapters as adapters_lib
from hydra_jax import build, checkpoints, optim
from hydra_jax.adapters import transform


def save_merged(path: str | pathlib.Path, params, pre: checkpoints.Pretrained) -> None:
  """Saves merged params with the base model's kwargs and input normalisation."""
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  merged = checkpoints.Pretrained(jax.device_get(params), pre.model, pre.mean, pre.std,
                                  f"merged from {pre.source}")
  checkpoints.save(path, merged)


# Version 2: HydraLoRA's top_k=1 weight is the raw router probability (version 1 files, without
# the key, trained with weight 1).
_ADAPTER_FORMAT = "2"


def save_adapters(path: str | pathlib.Path, trainable, spec: adapters_lib.AdapterSpec) -> None:
  """Saves the trainable tree and the spec that reads it."""
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep="/")
  checkpoints.native.write_safetensors(
      path, flat, {"hydra_jax_adapter_spec": json.dumps(dataclasses.asdict(spec)),
                   "hydra_jax_adapter_format": _ADAPTER_FORMAT})


def load_adapters(path: str | pathlib.Path):
  """Reads ``save_adapters`` output; returns (trainable tree, AdapterSpec)."""
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      if "hydra_jax_adapter_spec" not in meta:
        raise ValueError(f"{path} is not a hydra_jax adapters export (no adapter spec metadata)")
      tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path} is not a hydra_jax adapters export (not a safetensors file: "
                     f"{e})") from None
  fields = json.loads(meta["hydra_jax_adapter_spec"])
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if (fields.get("kind") == "hydralora" and fields.get("top_k") == 1
      and meta.get("hydra_jax_adapter_format", "1") == "1"):
    raise ValueError(f"{path}: a HydraLoRA top_k=1 adapter written before 2026-11-23, when the "
                     "kept head's weight was 1; hydra_jax now weighs it by the router's "
                     "probability, so this adapter would compute another model (retrain it)")
  trainable = traverse_util.unflatten_dict(tensors, sep="/")
  trainable.setdefault("adapters", {})
  trainable.setdefault("params", {})
  # files from before fields a kind does not read were refused (e.g. a LoRA run of a Hydra
  # config recorded scale=1.0): dropped with a warning
  return trainable, adapters_lib.spec_from_config(fields)


# Rebuilt base vs a run's merged export where the run changed nothing: equal to float32 rounding
# (XLA on another backend may round the resampled position embedding differently); another
# base (checkpoint, seed) differs by far more.
_BASE_RTOL, _BASE_ATOL = 1e-5, 1e-6


def run_model(workdir: str | pathlib.Path, config, merged=None):
  """The model and base a finished run was fine-tuned from, rebuilt from its ``config`` as the run
  built them (``build.build_model``, a fresh head), and checked against its merged export.

  Args:
    workdir: the run's directory.
    config: its config (``build.run_config(workdir)``).
    merged: its merged export's params, where the caller has read them; else read from
      ``workdir/export/merged.safetensors`` where there is one (a HydraLoRA run has none and is
      not checked).

  Returns:
    ``(model, base)``: the ViT and its ``checkpoints.Pretrained``.

  Raises:
    ValueError: the base differs from the merged export at a param the run neither trained
      (``train_patterns``) nor adapted: its config names another base than the one it was
      trained from (a checkpoint file since replaced, another seed's random backbone).
  """
  workdir = pathlib.Path(workdir).expanduser()
  model, base = build.build_model(config, build.model_rng(config))
  path = workdir / "export" / "merged.safetensors"
  if merged is None and path.is_file():
    merged = checkpoints.load(path).params
  if merged is not None:
    _check_trained_from(workdir, config, base.params, merged)
  return model, base


def _check_trained_from(workdir: pathlib.Path, config, base, merged) -> None:
  trained, _ = optim.split(base, list(config.train_patterns))
  changed = set(body(trained))
  exported = workdir / "export" / "adapters.safetensors"
  if exported.is_file():
    trainable, _ = load_adapters(exported)
    layers = tuple("/".join(path) + "/" for path, _ in transform.factor_dicts(
        trainable["adapters"]))
    changed |= {k for k in body(base) if k.startswith(layers)}
  merged = body(merged)
  for path, value in body(base).items():
    if path not in changed and (path not in merged or np.shape(merged[path]) != np.shape(value)
                                or not np.allclose(merged[path], value, rtol=_BASE_RTOL,
                                                   atol=_BASE_ATOL)):
      raise ValueError(
          f"{workdir}: the base its config rebuilds (model.checkpoint="
          f"{config.model.get('checkpoint')}) differs from the run's merged export at {path}, "
          "which the run neither trained nor adapted: it was fine-tuned from another base")


def body(params) -> dict:
  """Every param but the classifier head, flat by '/' paths."""
  return {k: v for k, v in traverse_util.flatten_dict(params, sep="/").items()
          if k.split("/")[0] != "head"}


def save_peft_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                  transformers_version: str | None = None, labels: Sequence[str] | None = None,
                  dtype: str = "float32", target: str = "transformers") -> str:
  """A finished LoRA run as ``out/base`` (``save_hf`` of its base model) and ``out/lora`` (PEFT).

  The base is rebuilt from the run's ``config.json`` as the run built it (checkpoint, image size,
  pooling, a fresh head); the adapters and head come from ``export/adapters.safetensors``. In
  PyTorch: ``PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(
  out/"base"), out/"lora")``. With ``target="timm"`` the base is a timm directory (``save_timm``)
  and the adapter names timm's modules: ``PeftModel.from_pretrained(timm.create_model(
  "local-dir:" + out/"base", pretrained=True), out/"lora")``. Both are written into one directory
  renamed into place, so ``out`` never pairs a new adapter with an old base. ``labels`` /
  ``dtype``: the base's. Returns the class the adapter applies to.
  """
  workdir, out = pathlib.Path(workdir).expanduser(), pathlib.Path(out).expanduser()
  config = build.run_config(workdir)
  exported = workdir / "export" / "adapters.safetensors"
  if not exported.is_file():
    raise FileNotFoundError(f"{workdir} is not a finished run with exported adapters (no "
                            f"{exported})")
  trainable, spec = load_adapters(exported)
  _, base = run_model(workdir, config)
  archs = []
  timm = target == "timm"

  def write(tmp: pathlib.Path) -> None:
    archs.append(checkpoints.save_peft(
        tmp / "lora", trainable, spec, base, transformers_version=transformers_version,
        base_model_name_or_path=str((out / "base").resolve()), target=target))
    save = checkpoints.save_timm if timm else checkpoints.save_hf
    save(tmp / "base", base, labels=labels, dtype=dtype)

  base_files = checkpoints.timm_vit.FILES if timm else checkpoints.hf_export.FILES
  files = tuple(f"base/{f}" for f in base_files) + tuple(
      f"lora/{f}" for f in checkpoints.peft_lora.FILES)
  checkpoints.hf_export.write_dir(out, files, write)
  return archs[0]


def main(argv: Sequence[str] | None = None) -> None:
  """Converts a checkpoint (or a LoRA run) for PyTorch; ``argv`` without the program name."""
  p = argparse.ArgumentParser(prog="python -m hydra_jax.export",
                              description="Writes a checkpoint as a Hugging Face or timm "
                              "directory or a big_vision .npz, or a LoRA run as a transformers "
                              "base model plus a PEFT adapter.")
  p.add_argument("source", help="with --hf / --timm / --npz: any checkpoint checkpoints.load "
                 "reads (e.g. merged.safetensors); with --peft: a finished LoRA run's workdir")
  out = p.add_mutually_exclusive_group(required=True)
  out.add_argument("--hf", help="directory to write (an earlier export is replaced)")
  out.add_argument("--timm", help="timm directory to write (an earlier export is replaced)")
  out.add_argument("--npz", help="big_vision .npz file to write (inputs in [-1, 1]; an earlier "
                   "file is replaced)")
  out.add_argument("--peft", help="directory to write base/ and lora/ into")
  p.add_argument("--dtype", default="float32", choices=checkpoints.hf_export.DTYPES,
                 help="tensor dtype of the model (with --peft: of base/; the adapter is float32)")
  p.add_argument("--labels", default=None, help="class names, comma-separated "
                 "(--hf default: LABEL_i)")
  p.add_argument("--no-head", action="store_true", help="--hf / --timm / --npz: leave the "
                 "head out (write the features model, e.g. a CLIP tower for transformers)")
  p.add_argument("--peft-target", default="transformers",
                 choices=checkpoints.peft_lora.TARGETS, help="--peft: the base model's library "
                 "(timm: base/ is a timm directory, the adapter names timm's modules)")
  p.add_argument("--transformers-version", default=None, help="--peft: write the module names "
                 "of this transformers version (default: the installed one)")
  args = p.parse_args(argv)
  try:
    _convert(p, args)
  except (ValueError, OSError) as e:  # refusals and bad paths name the reason
    p.error(str(e))


def _convert(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  labels = args.labels.split(",") if args.labels else None
  if args.peft and args.no_head:
    p.error("--no-head applies to --hf / --timm / --npz (a LoRA run's head is the adapter's)")
  if args.peft:
    arch = save_peft_run(args.source, args.peft, transformers_version=args.transformers_version,
                         labels=labels, dtype=args.dtype, target=args.peft_target)
    print(f"wrote {args.peft}/base ({arch}) and {args.peft}/lora (PEFT LoRA)")
    return
  if args.npz:
    if args.labels or args.dtype != "float32":
      p.error("--npz writes float32 params only (no --labels, no --dtype)")
    checkpoints.save_npz(args.npz, checkpoints.load(args.source, reset_head=args.no_head))
    print(f"wrote {args.npz} (big_vision ViT, inputs in [-1, 1])")
    return
  save, directory = (checkpoints.save_timm, args.timm) if args.timm else (checkpoints.save_hf,
                                                                          args.hf)
  arch = save(directory, checkpoints.load(args.source, reset_head=args.no_head), labels=labels,
              dtype=args.dtype)
  print(f"wrote {directory} ({arch})")


if __name__ == "__main__":
  main()
