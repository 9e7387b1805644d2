"""Google ``.npz`` checkpoints: google-research/vision_transformer and big_vision.

vision_transformer files use pre-Linen module numbering (``MultiHeadDotProductAttention_1``,
``LayerNorm_0|2``, ``MlpBlock_3``) and keep the position embedding at
``Transformer/posembed_input/pos_embedding`` with a row for the class token. big_vision files use
Linen numbering, a top-level ``pos_embedding`` (1, N, D) added *before* the class token is
concatenated (stored here with a zero class-token row: the same function), may have no ``cls``
(pool "gap"), may pool with a ``MAPHead_0`` (SigLIP; pool "map") and, when trained with
``scan=True``, stack the blocks on a leading depth axis under ``Transformer/encoderblock/``.
Both use tanh GELU, LayerNorm eps 1e-6 and [-1, 1] inputs, and resample the position embedding
to another grid linearly, corner-aligned (``posemb_resample="linear_zoom"``).

``save_npz`` writes a ViT back as a big_vision file (``big_vision.models.vit`` loads it; so does
``load`` here): the class token's position embedding added into ``cls``, LayerScale folded into
the layer before it, and the input normalisation folded into the patch embedding so the file
takes [-1, 1] inputs like every big_vision ViT (as big_vision did for its DeiT III files).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from flax import traverse_util

from hydra_jax.checkpoints import common, hf_export, native
from hydra_jax.models import ARCHITECTURE_DEFAULTS

_VIT_POSEMB = "Transformer/posembed_input/pos_embedding"
_VIT_MODULES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                "LayerNorm_0": "LayerNorm_0", "LayerNorm_2": "LayerNorm_1",
                "MlpBlock_3": "MlpBlock_0"}
_VIT_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/([^/]+)/(.*)")
_SCANNED = "Transformer/encoderblock/"
# both code bases resample posemb with scipy.ndimage.zoom(order=1) (``resample_posemb``)
_GOOGLE_FIELDS = dict(ln_eps=1e-6, gelu_approximate=True, posemb_resample="linear_zoom")


def read_npz(path) -> dict[str, np.ndarray]:
  """The model arrays of an npz file, as float32 where they were bfloat16.

  Of a train checkpoint only the params (``params/``, or ``opt/target/`` of the older flax
  optimizer files; the prefix dropped: optimizer state and the rest are not the model), and of a
  two-tower or multimodal file (SigLIP, LiT: ``img/`` and ``txt/``; PaliGemma: ``img/`` and
  ``llm/``) only the image tower. Only the kept arrays are read.
  """
  with np.load(path, allow_pickle=False) as f:
    names = f.files
    for prefix in ("params/", "opt/target/"):
      if any(k.startswith(prefix) for k in names):
        names = {k.removeprefix(prefix): k for k in names if k.startswith(prefix)}
        break
    else:
      names = {k: k for k in names}
    if any(k.startswith("img/") for k in names):
      names = {k.removeprefix("img/"): v for k, v in names.items() if k.startswith("img/")}
    return {k: _float_array(f[v], k, path) for k, v in names.items()}


def _float_array(array: np.ndarray, name: str, path) -> np.ndarray:
  """``array``; a bfloat16 one (numpy stores it as 2-byte void, '|V2') as float32."""
  if array.dtype.kind != "V":
    return array
  if array.dtype.itemsize != 2:
    raise ValueError(f"{path}: array {name!r} has dtype {array.dtype}, which is not an array "
                     "type hydra_jax reads; expected float arrays (or bfloat16 saved as '|V2')")
  return array.view(ml_dtypes.bfloat16).astype(np.float32)


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
  # big_vision's fix_old_checkpoints: m*m + 1 rows are an old file's grid plus the class token's
  # row (its ViT then added posemb after prepending cls: hydra_jax's own layout)
  old_cls_row = math.isqrt(pos.shape[1]) ** 2 + 1 == pos.shape[1]
  if "cls" in flat and not old_cls_row:
    # big_vision adds posemb to the patch tokens only; a zero cls row is the same function.
    flat["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  elif "cls" not in flat and old_cls_row:  # big_vision drops the row when there is no cls
    flat["pos_embedding"] = pos[:, 1:]
  model = common.infer_model(flat, source, **_GOOGLE_FIELDS)
  return common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), model, common.HALF,
                           common.HALF,
                           f"big_vision:{source}")


def _big_vision_refusal(model: dict) -> str | None:
  """Why big_vision's ViT cannot compute ``ViT(**model)``, or None."""
  pool, cls = model["pool"], model["class_token"]
  for field, what in (("pre_norm", "LayerNorm before the blocks"), ("quick_gelu", "quick GELU")):
    if model.get(field):
      return f"it has no {what} (got {field}=True, as in CLIP)"
  if not model["gelu_approximate"] or model["ln_eps"] != 1e-6:
    return (f"its MLPs use tanh GELU and LayerNorm eps 1e-6 (got gelu_approximate="
            f"{model['gelu_approximate']}, ln_eps={model['ln_eps']:g}, as in DINOv2 and "
            f"Hugging Face ViT files)")
  for field, what in (("num_registers", "register tokens"), ("swiglu", "SwiGLU MLPs")):
    if model[field]:
      return f"it has no {what} (got {field}={model[field]})"
  if pool not in ("tok", "gap", "map") or (pool == "tok") != cls:
    return (f"it pools 'tok' over a class token, or 'gap' / 'map' without one (got pool={pool!r}"
            f", class_token={cls})")
  if model["fc_norm"] and pool != "tok":
    return f"its final LayerNorm is on the tokens, before the pooling (got fc_norm, pool={pool!r})"
  gh, gw = model["posemb_grid"]
  if gh != gw:  # (a square grid is never m*m + 1 entries, which big_vision reads as old files)
    return (f"an .npz records no position-embedding grid, and checkpoints.load and big_vision's "
            f"resampling take it as square (got the grid {(gh, gw)}); resample the posemb to a "
            f"square grid (checkpoints.load(..., image_size=...)) first")
  return None


def save_npz(path, pretrained: common.Pretrained) -> None:
  """Writes ``pretrained`` (e.g. a merged fine-tune) as a big_vision ``.npz``, atomically.

  The file takes inputs in [-1, 1] (big_vision's ``value_range(-1, 1)``): ``pretrained``'s
  mean / std are folded into the patch embedding. In big_vision:
  ``vit.Model(num_classes, patch_size=(p, p), width=..., depth=..., mlp_dim=..., num_heads=...,
  pool_type=pool, rep_size=representation_size or False)`` and ``vit.load(...)``.

  Raises:
    ValueError: the model has parts big_vision's ViT does not compute (exact GELU, registers,
      SwiGLU, a pool it lacks).
  """
  model = {**ARCHITECTURE_DEFAULTS, **pretrained.model}
  if (why := _big_vision_refusal(model)) is not None:
    raise ValueError(f"big_vision's ViT cannot compute this model: {why}; export to "
                     "transformers or timm instead")
  flat = common.flat_float32(pretrained.params)
  flat = hf_export.layer_scale(flat, model["depth"], keep=False)
  if model["fc_norm"]:
    flat = hf_export.norm_every_token(flat)
  if model["class_token"]:  # big_vision adds the position embedding before prepending cls
    flat["cls"] = flat["cls"] + flat["pos_embedding"][:, :1]
    flat["pos_embedding"] = flat["pos_embedding"][:, 1:]
  # (u - mean) / std with u = (z + 1) / 2 is z / (2 std) + (0.5 - mean) / std, per channel
  mean, std = np.asarray(pretrained.mean, np.float32), np.asarray(pretrained.std, np.float32)
  kernel = flat["embedding/kernel"]
  flat["embedding/bias"] = flat["embedding/bias"] + np.einsum("hwcd,c->d", kernel,
                                                              (0.5 - mean) / std)
  flat["embedding/kernel"] = kernel / (2 * std)[:, None]

  def write(tmp) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the tmp name
      np.savez(f, **flat)

  native.write_atomically(path, write)
