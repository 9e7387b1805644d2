"""Google ``.npz`` checkpoints: google-research/vision_transformer and big_vision.

vision_transformer files use pre-Linen module numbering (``MultiHeadDotProductAttention_1``,
``LayerNorm_0|2``, ``MlpBlock_3``) and keep the position embedding at
``Transformer/posembed_input/pos_embedding`` with a row for the class token. big_vision files use
Linen numbering, a top-level ``pos_embedding`` (1, N, D) added *before* the class token is
concatenated (stored here with a zero class-token row: the same function), may have no ``cls``
(pool "gap"), may pool with a ``MAPHead_0`` (SigLIP; pool "map") and, when trained with
``scan=True``, stack the blocks on a leading depth axis under ``Transformer/encoderblock/``.
Both use tanh GELU, LayerNorm eps 1e-6 and [-1, 1] inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from hydra_jax.checkpoints import common

_VIT_POSEMB = "Transformer/posembed_input/pos_embedding"
_VIT_MODULES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                "LayerNorm_0": "LayerNorm_0", "LayerNorm_2": "LayerNorm_1",
                "MlpBlock_3": "MlpBlock_0"}
_VIT_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/([^/]+)/(.*)")
_SCANNED = "Transformer/encoderblock/"
_GOOGLE_FIELDS = dict(ln_eps=1e-6, gelu_approximate=True)


def read_npz(path) -> dict[str, np.ndarray]:
  """All arrays of an npz file; of a big_vision train checkpoint only ``params/`` (the prefix
  dropped; optimizer state and the rest are not the model), and of a two-tower file (SigLIP,
  LiT: ``img/`` and ``txt/``) only the image tower."""
  with np.load(path, allow_pickle=False) as f:
    names = f.files
    if any(k.startswith("params/") for k in names):  # a train checkpoint: also opt/, chrono/...
      names = [k for k in names if k.startswith("params/")]
    arrays = {k.removeprefix("params/"): f[k] for k in names}
  if any(k.startswith("img/") for k in arrays):
    arrays = {k.removeprefix("img/"): v for k, v in arrays.items() if k.startswith("img/")}
  return arrays


def is_vision_transformer(arrays: Mapping) -> bool:
  return _VIT_POSEMB in arrays


def is_big_vision(arrays: Mapping) -> bool:
  return "embedding/kernel" in arrays


def _rename_vision_transformer(key: str) -> str:
  if key == _VIT_POSEMB:
    return "pos_embedding"
  m = _VIT_BLOCK.fullmatch(key)
  if m and m.group(2) in _VIT_MODULES:
    return f"Transformer/encoderblock_{m.group(1)}/{_VIT_MODULES[m.group(2)]}/{m.group(3)}"
  return key  # unknown keys pass through so the strict check reports them


def load_vision_transformer(arrays: Mapping[str, np.ndarray], source: str) -> common.Pretrained:
  """google-research/vision_transformer arrays -> ``Pretrained`` (not yet finalized)."""
  flat = {_rename_vision_transformer(k): v for k, v in arrays.items()}
  model = common.infer_model(flat, source, **_GOOGLE_FIELDS)
  return common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), model, common.HALF,
                           common.HALF,
                           f"vision_transformer:{source}")


def _unscan(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits ``Transformer/encoderblock/...`` (depth, ...) into ``encoderblock_{i}/...``."""
  flat = {}
  for key, value in arrays.items():
    if key.startswith(_SCANNED):
      rest = key[len(_SCANNED):]
      for i, block_value in enumerate(value):
        flat[f"Transformer/encoderblock_{i}/{rest}"] = block_value
    else:
      flat[key] = value
  return flat


def load_big_vision(arrays: Mapping[str, np.ndarray], source: str) -> common.Pretrained:
  """big_vision arrays (scanned or not, with or without ``cls``) -> ``Pretrained``."""
  flat = _unscan(arrays)
  if "pos_embedding" not in flat:
    raise ValueError(f"{source}: a big_vision ViT without a stored pos_embedding (posemb "
                     "'sincos2d' computes it); only learned position embeddings are supported")
  pos = flat["pos_embedding"]
  if "cls" in flat:
    # big_vision adds posemb to the patch tokens only; a zero cls row is the same function.
    flat["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  model = common.infer_model(flat, source, **_GOOGLE_FIELDS)
  return common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), model, common.HALF,
                           common.HALF,
                           f"big_vision:{source}")
