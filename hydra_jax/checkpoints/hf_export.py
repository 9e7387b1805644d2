"""A ViT back out as a Hugging Face ``save_pretrained`` directory that ``transformers`` loads.

The target is the one ``transformers`` class that computes the same function, read off the
pooling (a merged fine-tune has exactly the base architecture, so it always has one):

  with a head   pool "tok"        ViTForImageClassification     (class token)
                pool "tok+gap"    Dinov2ForImageClassification  ([class token, mean patch token])
                pool "gap"        SiglipForImageClassification  (mean of all tokens; no class token)
  no head       no class token    SiglipVisionModel             (its MAP head with pool "map")
                LayerScale        Dinov2Model
                otherwise         ViTModel  (``pre_logits`` is its pooler; without one, load it
                                  with ``add_pooling_layer=False``)

An ``fc_norm`` model (the final LayerNorm on the pooled feature) pooled "tok" exports as the
same class with that norm on every token (LayerNorm is per token: the class token's is the same).

Register tokens make it ``Dinov2WithRegistersForImageClassification`` (pool "tok+gap") or
``Dinov2WithRegistersModel`` (no head).

A LayerNorm before the blocks (CLIP's) makes it ``CLIPVisionModel`` (no head) or
``CLIPVisionModelWithProjection`` (a bias-free head: CLIP's projection): a class token pooled "tok",
the final norm on it (``post_layernorm``), the patch embedding's bias folded into the patches'
position entries (CLIP's convolution has none). transformers has no classifier over CLIP's
pooled class token, so a trained classification head is refused (export it to timm).

LayerScale is folded into the linear layer before it where the target has none (exact); DINOv2
targets without it get scales of one; q/k/v biases are always written. The directory holds
``config.json``, ``model.safetensors`` and a ``preprocessor_config.json`` (bicubic resize to the
model's input size, its mean / std); it is built beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from hydra_jax.checkpoints import common, hf
from hydra_jax.checkpoints.hf import ATT, FAMILY_BLOCK, FAMILY_TOP, MAP, MLP, POOL_KEY, SWIGLU_BLOCK
from hydra_jax.models import ARCHITECTURE_DEFAULTS

DTYPES = ("float32", "bfloat16", "float16")
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
PREFIX = {"ViTForImageClassification": "vit.", "Dinov2ForImageClassification": "dinov2.",
          "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.",
           "SiglipForImageClassification": "vision_model.", "SiglipVisionModel": "vision_model.",
          "CLIPVisionModel": "vision_model.", "CLIPVisionModelWithProjection": "vision_model."}
BLOCK = "Transformer/encoderblock_"  # the ViT's block path prefix


def target(model: dict, *, has_head: bool) -> tuple[str, str]:
  """(family, transformers class) computing the same function as ``ViT(**model)``.

  Raises:
    ValueError: the model has no transformers counterpart (its pooling, pre-logits layer, final
      norm or SwiGLU MLP; a pre-norm outside CLIP's shape).
  """
  if model.get("pre_norm"):
    return _clip_target(model, has_head=has_head)
  family, arch = _target(model, has_head=has_head)
  if model.get("swiglu") and family != "dinov2":
    if arch == "ViTModel" and not model.get("representation_size"):
      return "dinov2", "Dinov2Model"  # LayerScale of ones
    raise ValueError("SwiGLU MLPs exist in transformers only in DINOv2 (use_swiglu_ffn): a class "
                     f"token, no pre_logits, and a head over pool 'tok+gap' or no head (got "
                     f"pool={model['pool']!r}{', a head' if has_head else ''}): export to timm")
  return family, arch


def _clip_target(model: dict, *, has_head: bool) -> tuple[str, str]:
  """CLIP's classes (a LayerNorm before the blocks): a class token pooled "tok" and nothing else
  the ViT adds; the head is the bias-free projection (``save_hf`` checks the bias)."""
  extra = {f: model.get(f) for f in ("num_registers", "swiglu", "representation_size")
           if model.get(f)}
  if not model["class_token"] or model["pool"] != "tok" or extra:
    raise ValueError(f"a LayerNorm before the blocks exists in transformers only in CLIP, which "
                     f"has a class token pooled 'tok' and no registers, SwiGLU or pre_logits (got "
                     f"class_token={model['class_token']}, pool={model['pool']!r}"
                     f"{''.join(f', {k}={v}' for k, v in extra.items())}): export to timm instead "
                     f"(save_timm, --timm)")
  return "clip", "CLIPVisionModelWithProjection" if has_head else "CLIPVisionModel"


def _target(model: dict, *, has_head: bool) -> tuple[str, str]:
  pool, cls, rep = model["pool"], model["class_token"], model.get("representation_size")
  if model.get("fc_norm") and pool != "tok":  # over the class token it is the final norm
    raise ValueError(f"fc_norm (the final LayerNorm after the pooling, as timm's avg-pooled "
                     f"models have) exists in no transformers vision model except over pool "
                     f"'tok' (got pool={pool!r}): export to timm instead (save_timm, --timm; PEFT "
                     f"adapters: target='timm', --peft-target timm)")
  if model.get("num_registers"):
    if cls and not rep and (pool == "tok+gap" if has_head else pool != "map"):
      return "dinov2", ("Dinov2WithRegistersForImageClassification" if has_head
                        else "Dinov2WithRegistersModel")
    raise ValueError(f"register tokens exist in transformers only in DINOv2 with registers: a "
                     f"class token, no pre_logits, and a head over pool 'tok+gap' or no head "
                     f"(got pool={pool!r}, class_token={cls}, "
                     f"{'a head' if has_head else 'no head'}, representation_size={rep})")
  if rep and (has_head or pool != "tok"):
    raise ValueError(f"pre_logits (representation_size={rep}) exists in transformers only as "
                     f"ViTModel's pooler over the class token: export without a head, pool 'tok' "
                     f"(got pool={pool!r}{', with a head' if has_head else ''})")
  if has_head:
    if pool == "tok":
      return "vit", "ViTForImageClassification"
    if pool == "tok+gap":
      return "dinov2", "Dinov2ForImageClassification"
    if pool == "gap" and not cls:
      return "siglip", "SiglipForImageClassification"
    raise ValueError(f"no transformers classifier pools like pool={pool!r} "
                     f"({'with' if cls else 'without'} a class token); expected a head over pool "
                     f"'tok' (ViT), 'tok+gap' (DINOv2) or 'gap' without a class token (SigLIP)")
  if not cls:
    return "siglip", "SiglipVisionModel"
  if pool == "map":
    raise ValueError("transformers has no MAP head over a class-token model (SigLIP has no "
                     "class token); export with another pool")
  return ("dinov2", "Dinov2Model") if model["layer_scale"] and not rep else ("vit", "ViTModel")


def layer_scale(flat: dict, depth: int, *, keep: bool) -> dict:
  """Keeps LayerScale (ones where absent) or folds it into the out / Dense_1 layer before it."""
  flat = dict(flat)
  for i in range(depth):
    for scale_name, layer in (("LayerScale_0", ATT + "out"), ("LayerScale_1", MLP + "Dense_1")):
      path = f"{BLOCK}{i}/{scale_name}/scale"
      scale = flat.pop(path, None)
      if keep:
        width = flat[f"{BLOCK}{i}/{layer}/bias"].shape[-1]
        flat[path] = np.ones(width, np.float32) if scale is None else scale
      elif scale is not None:  # s * (x W + b) = x (W s) + b s
        for leaf in ("kernel", "bias"):
          flat[f"{BLOCK}{i}/{layer}/{leaf}"] = flat[f"{BLOCK}{i}/{layer}/{leaf}"] * scale
  return flat


def norm_every_token(flat: dict) -> dict:
  """An fc_norm model pooled "tok" -> the same function with the final norm on every token
  (LayerNorm is per token: the class token's is the same)."""
  return {k.replace("pooled_norm/", "Transformer/encoder_norm/"): v for k, v in flat.items()}


def fold_patch_bias(flat: dict) -> dict:
  """The patch embedding's bias moved into the patches' position entries, for targets whose patch
  convolution has none (CLIP's, timm's pre-norm models): both are added to every patch token, and
  resampling the position embedding keeps a constant added row constant."""
  flat = dict(flat)
  bias, pos = flat.pop("embedding/bias"), flat["pos_embedding"]
  num_cls = int("cls" in flat)
  flat["pos_embedding"] = np.concatenate([pos[:, :num_cls], pos[:, num_cls:] + bias], axis=1)
  return flat


def to_torch(name: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One ViT param (module name, leaf) -> (HF leaf, torch layout); the inverse of hf.to_flax."""
  if "LayerScale" in name:
    return "lambda1", value
  if hf.is_layer_norm(name):
    return ("weight" if leaf == "scale" else "bias"), value
  if name == "embedding":  # flax (p, p, C, D) -> torch conv (D, C, p, p)
    return ("weight", value.transpose(3, 2, 0, 1)) if leaf == "kernel" else ("bias", value)
  if leaf == "bias":  # q/k/v (H, Dh) -> (H * Dh,)
    return "bias", value.reshape(-1)
  if name.endswith(("/query", "/key", "/value")):  # (D, H, Dh) -> (D, H * Dh)
    value = value.reshape(value.shape[0], -1)
  elif name.endswith("/out"):  # (H, Dh, D) -> (H * Dh, D)
    value = value.reshape(-1, value.shape[-1])
  return "weight", value.T  # flax (in, out) -> torch (out, in)


def _tensors(flat: dict, family: str, arch: str, swiglu: bool) -> dict[str, np.ndarray]:
  """The ViT's flat params -> HF state dict names and layouts of ``arch``."""
  prefix = PREFIX.get(arch, "")
  block_names = {**FAMILY_BLOCK[family], **(SWIGLU_BLOCK if swiglu else {})}
  layer = "encoder.layers" if family in hf.PLURAL_LAYERS else "encoder.layer"
  out, packed = {}, {}
  for path, value in flat.items():
    name, _, leaf = path.rpartition("/")
    if path == "cls" and family == "clip":
      out[prefix + "embeddings.class_embedding"] = value.reshape(-1)
    elif path == "cls":
      out[prefix + "embeddings.cls_token"] = value
    elif path == "registers":
      out[prefix + "embeddings.register_tokens"] = value
    elif path == "pos_embedding" and family in hf.PLURAL_LAYERS:  # an nn.Embedding: (N, D)
      out[prefix + "embeddings.position_embedding.weight"] = value[0]
    elif path == "pos_embedding":
      out[prefix + "embeddings.position_embeddings"] = value
    elif path == MAP + "probe":
      out[prefix + "head.probe"] = value
    elif name.startswith(MAP + ATT) and not name.endswith("/out"):  # torch packs q, k, v
      packed.setdefault(leaf, {})[name.rsplit("/", 1)[1]] = to_torch(name, leaf, value)[1]
    elif name.startswith(BLOCK):
      block, module = name[len(BLOCK):].split("/", 1)
      hf_leaf, array = to_torch(name, leaf, value)
      out[f"{prefix}{layer}.{block}.{block_names[module]}.{hf_leaf}"] = array
    else:
      hf_leaf, array = to_torch(name, leaf, value)
      module = FAMILY_TOP[family][name]
      top = module in ("classifier", "visual_projection")  # outside the (vision) model
      out[("" if top else prefix) + f"{module}.{hf_leaf}"] = array
  for leaf, parts in packed.items():
    out[f"{prefix}head.attention.in_proj_{'weight' if leaf == 'kernel' else 'bias'}"] = (
        np.concatenate([parts["query"], parts["key"], parts["value"]]))
  if family == "dinov2":  # only used in masked pre-training; written so nothing is missing
    out[prefix + "embeddings.mask_token"] = np.zeros((1, flat["cls"].shape[-1]), np.float32)
  return out


def _config(family: str, arch: str, model: dict, num_classes: int | None,
            labels: Sequence[str] | None, dtype: str) -> dict:
  """config.json of ``arch`` for ``ViT(**model)``."""
  gh, gw = model["posemb_grid"]
  if gh != gw and family != "vit":  # ViT's config takes (H, W); the others read their grid square
    raise ValueError(f"transformers' {family} configs take a square image_size; the posemb grid "
                     f"is {(gh, gw)} (load with a square image_size before exporting)")
  width, mlp, p = model["width"], model["mlp_dim"], model["patch_size"]
  config = dict(hidden_size=width, num_hidden_layers=model["depth"], num_channels=3,
                num_attention_heads=model["num_heads"],
                image_size=gh * p if gh == gw else [gh * p, gw * p],
                patch_size=model["patch_size"], layer_norm_eps=model["ln_eps"],
                hidden_act="quick_gelu" if model.get("quick_gelu") else
                "gelu_pytorch_tanh" if model["gelu_approximate"] else "gelu")
  if family == "dinov2":
    if model.get("swiglu"):
      ratio = _swiglu_ratio(width, mlp)
    elif mlp % width:
      raise ValueError(f"DINOv2 configs take an integer mlp_ratio; mlp_dim {mlp} is not a "
                       f"multiple of the width {width}")
    else:
      ratio = mlp // width
    config.update(model_type="dinov2", mlp_ratio=ratio, layerscale_value=1.0,
                  use_swiglu_ffn=bool(model.get("swiglu")), qkv_bias=True)
    if model.get("num_registers"):
      config.update(model_type="dinov2_with_registers",
                    num_register_tokens=model["num_registers"])
  elif family == "clip":
    config.update(model_type="clip_vision_model", intermediate_size=mlp)
    if num_classes:  # the projection's width (no classes: CLIP's head is not a classifier)
      config.update(projection_dim=num_classes)
      num_classes = None
  elif family == "vit":
    config.update(model_type="vit", intermediate_size=mlp, qkv_bias=True)
    if model.get("representation_size"):  # the pooler: tanh(Dense(class token))
      config.update(pooler_output_size=model["representation_size"], pooler_act="tanh")
  else:
    config.update(model_type="siglip_vision_model", intermediate_size=mlp,
                  vision_use_head=model["pool"] == "map")
    if arch == "SiglipForImageClassification":
      config = dict(model_type="siglip", vision_config=config)
  config.update(architectures=[arch], dtype=dtype)
  if num_classes:
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
      raise ValueError(f"labels has {len(names)} names; the head has {num_classes} classes")
    if len(set(names)) != len(names):
      raise ValueError(f"labels has repeated names: {names}; label2id needs each once")
    config.update(id2label={str(i): n for i, n in enumerate(names)},
                  label2id={n: i for i, n in enumerate(names)})
  elif labels is not None:
    raise ValueError(f"labels given ({len(labels)} names) but the model has no classification "
                     "head to name the classes of")
  return config


def _swiglu_ratio(width: int, mlp: int) -> int:
  """The (integer) mlp_ratio from which transformers' DINOv2 builds a SwiGLU MLP of ``mlp``
  hidden units: two thirds of width * ratio, rounded up to a multiple of 8 (giant: 4)."""
  for ratio in range(1, 4 * mlp // width + 2):
    if (int(width * ratio * 2 / 3) + 7) // 8 * 8 == mlp:
      return ratio
  raise ValueError(f"transformers' DINOv2 builds a SwiGLU MLP of width * mlp_ratio * 2/3 hidden "
                   f"units rounded up to a multiple of 8, for an integer mlp_ratio; none gives "
                   f"this model's {mlp} at width {width}: export to timm instead")


def _preprocessor(model: dict, mean, std) -> dict:
  (gh, gw), p = model["posemb_grid"], model["patch_size"]
  return dict(image_processor_type="ViTImageProcessor", do_resize=True, resample=3,  # bicubic
              size={"height": gh * p, "width": gw * p}, do_rescale=True, rescale_factor=1 / 255,
              do_normalize=True, image_mean=list(mean), image_std=list(std))


def write_dir(directory, files: tuple[str, ...], write: Callable[[pathlib.Path], None]) -> None:
  """Builds a directory of ``files`` beside ``directory`` (``write(tmp)``), then renames it there.

  ``files`` are '/'-paths relative to the directory (e.g. "base/config.json"). An earlier export
  at ``directory`` (holding only ``files``) is replaced; a directory holding anything else, or a
  file, is refused; a failed ``write`` leaves ``directory`` as it was.
  """
  out = pathlib.Path(directory).expanduser()
  out = out.resolve() if out.is_symlink() else out  # replace what the link points to
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} is a file; expected a directory to write the export into")
  if out.exists():
    extra = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if not p.is_dir() and str(p.relative_to(out)) not in files)
    if extra:
      raise FileExistsError(f"{out} exists and holds {extra} besides an export's {list(files)}; "
                            "refusing to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    write(tmp)
    if out.exists():
      old = out.with_name(f".{out.name}.{os.getpid()}.old")
      os.replace(out, old)
      os.replace(tmp, out)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _clip_flat(flat: dict) -> dict:
  """The ViT's params as CLIP's tower holds them: the final norm on the pooled class token, no
  bias after the patch embedding (it joins the patches' position entries) or the projection.

  Raises:
    ValueError: a head with a bias (a classifier: transformers' CLIP has none over the pooled
      class token; ``_config`` refuses class names for its projection).
  """
  if "head/kernel" in flat and np.any(flat["head/bias"]):
    raise ValueError("transformers' CLIP has no classifier over the pooled class token (its head "
                     "is the bias-free projection; CLIPForImageClassification averages the "
                     "un-normalised patch tokens): export the model without its head (--no-head; "
                     "checkpoints.load(..., reset_head=True)) or to timm (save_timm, --timm)")
  return fold_patch_bias({k.replace("Transformer/encoder_norm/", "pooled_norm/"): v
                          for k, v in flat.items() if k != "head/bias"})


def save_hf(directory, pretrained: common.Pretrained, *, labels: Sequence[str] | None = None,
            dtype: str = "float32") -> str:
  """Writes ``pretrained`` (e.g. a merged fine-tune) as a transformers model directory.

  Args:
    directory: the directory to write; an earlier export there is replaced.
    pretrained: params in the ViT layout and the model fields describing them.
    labels: class names for ``id2label`` (default ``LABEL_i``); one per head output.
    dtype: tensor dtype in the file, one of ``DTYPES``.

  Returns:
    The transformers class name written to ``config.json`` ``architectures``.

  Raises:
    ValueError: the model has no transformers counterpart, or a bad ``labels`` / ``dtype``.
  """
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
  flat = common.flat_float32(pretrained.params)
  model = {**ARCHITECTURE_DEFAULTS, **pretrained.model}  # e.g. a random-init run records few fields
  num_classes = flat["head/kernel"].shape[-1] if "head/kernel" in flat else None
  family, arch = target(model, has_head=num_classes is not None)
  config = _config(family, arch, model, num_classes, labels, dtype)
  if num_classes is None and model["class_token"]:  # transformers' class pools nothing itself
    config[POOL_KEY] = model["pool"]  # what the features were trained on: load_hf reads it back
  flat = layer_scale(flat, model["depth"], keep=family == "dinov2")
  if family == "clip":
    flat = _clip_flat(flat)
  elif model.get("fc_norm"):  # pool "tok" (target refuses the others)
    flat = norm_every_token(flat)
  tensors = {k: np.ascontiguousarray(v.astype(jnp.dtype(dtype)))
             for k, v in _tensors(flat, family, arch, bool(model.get("swiglu"))).items()}

  def write(tmp: pathlib.Path) -> None:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor(model, pretrained.mean, pretrained.std), indent=2) + "\n")

  write_dir(directory, FILES, write)
  return arch
