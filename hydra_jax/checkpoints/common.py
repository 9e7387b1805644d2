"""What every loader shares: the ``Pretrained`` record, strict tree checks, head and posemb options.

A loader turns a file into a ``Pretrained`` whose params use the ViT's '/'-names and whose
``model`` holds the ViT fields read off the shapes; ``finalize`` then applies the user's head and
image-size options and checks the result against ``jax.eval_shape`` of the model it describes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax.models import ARCHITECTURE_DEFAULTS, ViT
from hydra_jax.models import posemb as posemb_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BLOCK = "Transformer/encoderblock_{}"


@dataclasses.dataclass
class Pretrained:
  """A pre-trained ViT: params in the ViT's layout plus what is needed to use them.

  Attributes:
    params: nested param tree ('/'-path layout of ``hydra_jax.models.vit``), float32 arrays.
    model: ViT keyword arguments (no ``num_classes``; ``build_model`` reads it off the head).
    mean: per-channel RGB mean; inputs are ``(rgb01 - mean) / std``.
    std: per-channel RGB std.
    source: where the params came from (format and path).
  """
  params: dict
  model: dict
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  source: str


def flat_float32(params: Mapping) -> dict[str, np.ndarray]:
  """A param tree as {'/'-path: float32 numpy array}: what every writer starts from."""
  return {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(leaf)


def check_tree(expected: Mapping, params: Mapping) -> None:
  """Raises ONE ValueError listing every missing, unexpected and mis-shaped path.

  Args:
    expected: nested tree whose leaves have ``.shape`` (e.g. ``jax.eval_shape`` output) or are
      shape tuples.
    params: nested tree of arrays to check.
  """
  want = {k: _shape(v) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  got = {k: _shape(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  missing = [f"  missing: {k} (expected {want[k]})" for k in sorted(want.keys() - got.keys())]
  unexpected = [f"  unexpected: {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
  misshaped = [f"  mis-shaped: {k}: got {got[k]}, expected {want[k]}"
               for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
  if missing or unexpected or misshaped:
    raise ValueError(
        f"params do not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(misshaped)} mis-shaped\n" + "\n".join(missing + unexpected + misshaped))


def expected_shapes(model: Mapping, num_classes: int | None = None) -> dict:
  """``jax.eval_shape`` of the params of ``ViT(**model, num_classes=num_classes)``."""
  vit = ViT(num_classes=num_classes, **model)
  gh, gw = vit.posemb_grid
  images = jax.ShapeDtypeStruct((1, gh * vit.patch_size, gw * vit.patch_size, 3), jnp.float32)
  return jax.eval_shape(vit.init, jax.random.key(0), images)["params"]


def infer_model(flat: Mapping[str, np.ndarray], source: str, **fields) -> dict:
  """ViT fields read off the shapes of a converted flat tree; ``fields`` add or override.

  Heads come from the query kernel (D, H, Dh); the posemb grid is taken to be square unless
  ``fields`` give ``posemb_grid`` (checked against the position embedding either way); an MLP
  whose Dense_0 puts out twice what Dense_1 reads is SwiGLU (gate and value packed).
  """
  def get(path):
    if path not in flat:
      raise ValueError(f"cannot infer the ViT from {source}: it has no {path!r}")
    return flat[path].shape
  block = _BLOCK.format(0)
  class_token = "cls" in flat
  grid_tokens = get("pos_embedding")[1] - int(class_token)
  side = math.isqrt(grid_tokens)
  grid = tuple(fields.get("posemb_grid", (side, side)))
  if grid[0] * grid[1] != grid_tokens:
    raise ValueError(f"{source}: pos_embedding has {grid_tokens} grid tokens; expected "
                     f"{'a square' if 'posemb_grid' not in fields else grid}")
  pre_logits = flat.get("pre_logits/kernel")
  mlp_dim = get(f"{block}/MlpBlock_0/Dense_1/kernel")[0]
  model = dict(
      patch_size=get("embedding/kernel")[0], width=get("embedding/kernel")[-1],
      depth=len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")}),
      mlp_dim=mlp_dim, swiglu=get(f"{block}/MlpBlock_0/Dense_0/kernel")[1] == 2 * mlp_dim,
      num_heads=get(f"{block}/MultiHeadDotProductAttention_0/query/kernel")[1],
      posemb_grid=grid, class_token=class_token,
      num_registers=flat["registers"].shape[1] if "registers" in flat else 0,
      pool="map" if "MAPHead_0/probe" in flat else "tok" if class_token else "gap",
      representation_size=None if pre_logits is None else pre_logits.shape[1],
      layer_scale=f"{block}/LayerScale_0/scale" in flat, fc_norm="pooled_norm/scale" in flat,
      pre_norm="embedding_norm/scale" in flat)
  model.update(fields)
  return model


def _head_classes(params: Mapping) -> int | None:
  head = params.get("head")
  return int(head["kernel"].shape[-1]) if isinstance(head, Mapping) and "kernel" in head else None


def _set_head(params: dict, expected: Mapping, num_classes, reset_head: bool) -> dict:
  """Keeps the loaded head, drops it, or puts the zero head of ``expected`` in its place."""
  params = dict(params)
  if num_classes is None:
    if reset_head:
      params.pop("head", None)
    return params
  want = expected["head"]
  keep = not reset_head and isinstance(params.get("head"), Mapping) and all(
      _shape(params["head"].get(k, ())) == _shape(want[k]) for k in want)
  if not keep:
    params["head"] = {k: np.zeros(_shape(v), np.float32) for k, v in want.items()}
  return params


def _image_hw(image_size) -> tuple[int, int]:
  """(H, W) of an int or a pair of ints; anything else is refused by name."""
  sizes = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  try:
    h, w = (operator.index(x) for x in sizes)
  except (TypeError, ValueError):
    raise ValueError(f"image_size must be an int or (H, W) ints; got {image_size!r}") from None
  return h, w


def _resample(params: dict, model: dict, image_size) -> tuple[dict, dict]:
  """Resamples pos_embedding once to the grid of ``image_size`` (int or (H, W)), in the
  checkpoint's convention (``model["posemb_resample"]``, "bicubic" where it records none)."""
  h, w = _image_hw(image_size)
  p = model["patch_size"]
  if h < p or w < p or h % p or w % p:
    raise ValueError(f"image_size {(h, w)} is not a positive multiple of the patch size {p}")
  grid = (h // p, w // p)
  pos = posemb_lib.resample_posemb(
      jnp.asarray(params["pos_embedding"]), num_prefix=int(model["class_token"]),
      old_hw=tuple(model["posemb_grid"]), new_hw=grid,
      method=model.get("posemb_resample", posemb_lib.DEFAULT_RESAMPLE))
  return dict(params, pos_embedding=np.asarray(pos, np.float32)), dict(model, posemb_grid=grid)


def _pools(model: Mapping, params: Mapping) -> tuple[str, ...]:
  """The pools a checkpoint can take: "tok" and "tok+gap" need a class token ("tok+gap" no
  fc_norm), "map" its MAP head."""
  cls, fc_norm = model.get("class_token"), model.get("fc_norm")
  return tuple(p for p in ("tok", "gap", "tok+gap", "map")
               if ("tok" not in p or cls) and (p != "tok+gap" or not fc_norm)
               and (p != "map" or "MAPHead_0" in params))


def finalize(raw: Pretrained, *, num_classes=None, reset_head=False, image_size=None,
             pool=None, drop_pre_logits=False) -> Pretrained:
  """Applies the head / image-size options to a converted checkpoint and checks it strictly.

  Args:
    raw: a loader's output (params already renamed into the ViT layout).
    num_classes: give the params a zero-initialised head of this many classes (the loaded head is
      kept only when its shape matches and ``reset_head`` is False).
    reset_head: drop the loaded head (and with ``num_classes`` replace it by a zero head).
    image_size: int or (H, W); resample pos_embedding to that patch grid once, the way the
      checkpoint's own code does (``model["posemb_resample"]``).
    pool: pool the features another way than the checkpoint does ("tok", "gap", "tok+gap"; "map"
      only for a checkpoint with a MAP head); a head whose input width no longer fits is
      replaced by a zero head, and a MAP head the new pooling does not use is dropped.
    drop_pre_logits: remove the tanh ``pre_logits`` layer (the original i21k files'), so the
      head reads the pooled features directly (as timm loads those files); the head follows.

  Returns:
    A ``Pretrained`` with float32 numpy params that match ``build_model`` of it exactly.

  Raises:
    ValueError: a bad option (named), or params that do not fit the model (every path listed).
  """
  if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
      num_classes, (int, np.integer)) or num_classes < 1):
    raise ValueError(f"num_classes must be None (keep the checkpoint's head) or an int >= 1; "
                     f"got {num_classes!r}")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), raw.params)
  model = {**ARCHITECTURE_DEFAULTS, **raw.model}  # a random-init run's export records fewer
  model["posemb_grid"] = tuple(model["posemb_grid"])
  if "posemb_resample" in model:
    try:
      posemb_lib.check_resample(model["posemb_resample"])
    except ValueError as e:
      raise ValueError(f"{raw.source}: {e}") from None
  if pool is not None:
    pools = _pools(model, params)
    if pool == "map" and "MAPHead_0" not in params:
      raise ValueError("pool='map' needs the checkpoint's MAP head (MAPHead_0, as SigLIP files "
                       f"have); {raw.source} has none: pool with one of {pools}")
    if pool == "tok+gap" and model.get("fc_norm"):
      raise ValueError(f"pool='tok+gap' concatenates two features; {raw.source} normalises one "
                       "pooled feature (fc_norm, as timm's avg-pooled models do): pool with one "
                       f"of {pools} (config: model.pool)")
    if pool != model["pool"] and model.get("representation_size") and not drop_pre_logits:
      raise ValueError(f"pool={pool!r} changes the features that pre_logits (the i21k files' tanh "
                       f"layer, pooled {model['pool']!r}) reads; drop it with "
                       "drop_pre_logits=True (config: model.pre_logits=False)")
    model["pool"] = pool
    if pool != "map":
      params.pop("MAPHead_0", None)
  if drop_pre_logits:
    params.pop("pre_logits", None)
    model["representation_size"] = None
  kept = None if reset_head else _head_classes(params)
  if num_classes is None and (pool is not None or drop_pre_logits):  # a head of the old width
    num_classes = kept  # becomes a zero head of the same classes
  expected = expected_shapes(model, kept if num_classes is None else num_classes)
  params = _set_head(params, expected, num_classes, reset_head)
  check_tree(expected, params)
  if image_size is not None:
    params, model = _resample(params, model, image_size)
  return dataclasses.replace(raw, params=params, model=model, mean=tuple(raw.mean),
                             std=tuple(raw.std))


def build_model(pretrained: Pretrained, *, num_classes: int | None = None, **overrides) -> ViT:
  """The ViT that ``pretrained.params`` fit; it normalises uint8 images as the checkpoint expects.

  Args:
    pretrained: a loaded checkpoint.
    num_classes: head size; None reads it off ``pretrained.params["head"]`` (no head: None).
    **overrides: other ViT fields (e.g. ``dtype``, ``attention``, ``remat``).
  """
  if num_classes is None:
    num_classes = _head_classes(pretrained.params)
  pixels = dict(pixel_mean=tuple(pretrained.mean), pixel_std=tuple(pretrained.std))
  return ViT(num_classes=num_classes, **{**pretrained.model, **pixels, **overrides})
