"""Hugging Face ViT, DINOv2 (also with registers), SigLIP and CLIP checkpoints (a
``save_pretrained`` directory of safetensors).

Keys follow the hub naming that ``save_pretrained`` writes (transformers 4 and 5 alike), with or
without the ``vit.`` / ``dinov2.`` / ``dinov2_with_registers.`` / ``vision_model.`` prefix of the
task and two-tower models. Torch linear weights are (out, in); q/k/v become (D, H, Dh) kernels and
the attention output (H, Dh, D). ``pooler.dense`` (ViTModel's tanh layer on the class token, i.e.
the original i21k ``pre_logits``) becomes ``pre_logits`` and ``classifier`` becomes ``head``; a
DINOv2 classifier over [cls, mean patch] means pool "tok+gap". DINOv2's ``mask_token`` is only
used for masked pre-training and is dropped. DINOv2 with registers (``dinov2_with_registers``) is
DINOv2 plus ``embeddings.register_tokens``, the ViT's ``registers``, and resamples its position
embedding with antialiasing (``posemb_resample``; the others without); DINOv2 giant's SwiGLU MLP
(``use_swiglu_ffn``: ``mlp.weights_in`` packs gate and value) is the ViT's ``swiglu``. SigLIP
(``siglip_vision_model``, or the vision tower of a ``siglip`` model, whose text tower is dropped)
has no class token; its attention-pooling head becomes ``MAPHead_0`` (pool "map"), the packed
``in_proj`` of that head split into query / key / value; ``SiglipForImageClassification``
classifies the mean of all tokens (pool "gap"), its unused MAP head dropped. CLIP
(``clip_vision_model``, or a ``clip`` model's vision tower) names its blocks as SigLIP does and adds
a class token (``class_embedding``), a LayerNorm before the blocks (``pre_layrnorm``: the ViT's
``embedding_norm``, ``pre_norm``), quick GELU, a final norm on the pooled class token
(``post_layernorm``: ``pooled_norm``) and a bias-free ``visual_projection`` (the ``head``).
``FAMILY_BLOCK`` / ``FAMILY_TOP`` name each family's modules (``hf_export`` writes them back).
Files saved in bfloat16 or float16 load as float32; ``qkv_bias=False`` ViTs get zero q/k/v biases
(the same function).
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for the safetensors reader)
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file

from hydra_jax.checkpoints import common

MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "siglip", "siglip_vision_model", "clip",
               "clip_vision_model")
FAMILY = {"vit": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2", "siglip": "siglip",
          "siglip_vision_model": "siglip", "clip": "clip",
          "clip_vision_model": "clip"}  # model_type -> the module names it shares
_TWO_TOWERS = ("siglip", "clip")  # model_types whose config nests the vision tower's
# hidden_act -> the ViT's activation fields
_ACTS = {"gelu": {}, "gelu_new": dict(gelu_approximate=True),
         "gelu_pytorch_tanh": dict(gelu_approximate=True), "quick_gelu": dict(quick_gelu=True)}
_BLOCK = re.compile(r"encoder\.layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)")
# ViT module-path prefixes (public: the exporter writes the same names back).
ATT = "MultiHeadDotProductAttention_0/"
MLP = "MlpBlock_0/"
_CLIP_LIKE_BLOCK = {"LayerNorm_0": "layer_norm1", "LayerNorm_1": "layer_norm2",
                    ATT + "query": "self_attn.q_proj", ATT + "key": "self_attn.k_proj",
                    ATT + "value": "self_attn.v_proj", ATT + "out": "self_attn.out_proj",
                    MLP + "Dense_0": "mlp.fc1", MLP + "Dense_1": "mlp.fc2"}
# Each family's HF module names, keyed by the ViT's module names: inside a block, then at the top.
FAMILY_BLOCK = {
    "vit": {"LayerNorm_0": "layernorm_before", "LayerNorm_1": "layernorm_after",
            ATT + "query": "attention.attention.query", ATT + "key": "attention.attention.key",
            ATT + "value": "attention.attention.value", ATT + "out": "attention.output.dense",
            MLP + "Dense_0": "intermediate.dense", MLP + "Dense_1": "output.dense"},
    "dinov2": {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2",
               ATT + "query": "attention.attention.query", ATT + "key": "attention.attention.key",
               ATT + "value": "attention.attention.value", ATT + "out": "attention.output.dense",
               MLP + "Dense_0": "mlp.fc1", MLP + "Dense_1": "mlp.fc2",
               "LayerScale_0": "layer_scale1", "LayerScale_1": "layer_scale2"},
    "siglip": _CLIP_LIKE_BLOCK,
    "clip": _CLIP_LIKE_BLOCK,
}
# DINOv2 with use_swiglu_ffn (giant): its files pack [gate, value] in weights_in, as the ViT's
# swiglu Dense_0 (transformers 5 splits it into gate_proj / up_proj on load, packs it on save)
SWIGLU_BLOCK = {MLP + "Dense_0": "mlp.weights_in", MLP + "Dense_1": "mlp.weights_out"}
MAP = "MAPHead_0/"
FAMILY_TOP = {
    "vit": {"Transformer/encoder_norm": "layernorm", "pre_logits": "pooler.dense",
            "embedding": "embeddings.patch_embeddings.projection", "head": "classifier"},
    "dinov2": {"Transformer/encoder_norm": "layernorm", "head": "classifier",
               "embedding": "embeddings.patch_embeddings.projection"},
    "siglip": {"Transformer/encoder_norm": "post_layernorm", "head": "classifier",
               "embedding": "embeddings.patch_embedding",
               MAP + ATT + "out": "head.attention.out_proj",
               MAP + "LayerNorm_0": "head.layernorm",
               MAP + MLP + "Dense_0": "head.mlp.fc1", MAP + MLP + "Dense_1": "head.mlp.fc2"},
    # CLIP's post_layernorm normalises the pooled class token (the ViT's pooled_norm; SigLIP's
    # is the encoder_norm, so _TOP leaves CLIP's out and load_hf moves it); visual_projection
    # (bias-free) maps it into the joint image-text space: the head, as in timm
    "clip": {"embedding_norm": "pre_layrnorm", "pooled_norm": "post_layernorm",
             "embedding": "embeddings.patch_embedding", "head": "visual_projection"},
}
PLURAL_LAYERS = ("siglip", "clip")  # families whose blocks are encoder.layers.i (else layer.i)
_BLOCK_MODULES = {hf: vit for names in (*FAMILY_BLOCK.values(), SWIGLU_BLOCK)
                  for vit, hf in names.items()}
_TOP = {hf: vit for family, names in FAMILY_TOP.items() if family != "clip"
        for vit, hf in names.items()}
_TOP.update(pre_layrnorm="embedding_norm", visual_projection="head")  # CLIP's own names
# two-tower SigLIP and CLIP: not the ViT
_TEXT_TOWER = ("text_model.", "logit_scale", "logit_bias", "text_projection.")
# how each model_type's interpolate_pos_encoding resamples (F.interpolate bicubic; antialiased
# only in DINOv2 with registers); the rest: "bicubic"
POSEMB_RESAMPLE = {"dinov2_with_registers": "bicubic_antialias"}
# config.json key of a headless export's pooling (transformers' headless classes pool nothing:
# the pooling the features were trained on is hydra_jax's to record); unset means "tok"
POOL_KEY = "hydra_jax_pool"
_PREFIX = re.compile(r"^(vit|dinov2|dinov2_with_registers|vision_model)\.")


# transformers' config defaults per family (a saved config may leave them out)
_DEFAULTS = {
    "vit": dict(hidden_size=768, num_attention_heads=12, hidden_act="gelu", layer_norm_eps=1e-12),
    "dinov2": dict(hidden_size=768, num_attention_heads=12, hidden_act="gelu",
                   layer_norm_eps=1e-6),
    "siglip": dict(hidden_size=768, num_attention_heads=12, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, num_attention_heads=12, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5),
}


def hf_dir(path: pathlib.Path) -> pathlib.Path | None:
  """The checkpoint directory if ``path`` is a HF directory (or one of its files).

  Raises:
    ValueError: a HF model directory of a model_type hydra_jax does not read.
  """
  if path.is_file() and path.suffix != ".safetensors":
    return None
  root = path if path.is_dir() else path.parent
  config = root / "config.json"
  if not config.is_file() or not list(root.glob("*.safetensors")):
    return None
  model_type = json.loads(config.read_text()).get("model_type")
  if model_type is None:
    return None
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{root}: Hugging Face model_type {model_type!r} is not supported; "
                     f"expected one of {MODEL_TYPES}")
  return root


def is_layer_norm(name: str) -> bool:
  """Whether the ViT module ``name`` is a LayerNorm (leaves scale, bias; torch weight, bias)."""
  return "LayerNorm" in name or name.endswith(("encoder_norm", "pooled_norm", "embedding_norm"))


def to_flax(name: str, leaf: str, value: np.ndarray, heads: int) -> tuple[str, np.ndarray]:
  """One torch tensor -> (flax path, array)."""
  if leaf in ("lambda1", "gamma"):  # HF, timm LayerScale
    return f"{name}/scale", value
  if is_layer_norm(name):
    return f"{name}/{'scale' if leaf == 'weight' else 'bias'}", value
  if name == "embedding":
    return f"{name}/{'kernel' if leaf == 'weight' else 'bias'}", (
        value.transpose(2, 3, 1, 0) if leaf == "weight" else value)
  if leaf == "bias":
    qkv = name.endswith(("/query", "/key", "/value"))
    return f"{name}/bias", value.reshape(heads, -1) if qkv else value
  kernel = value.T  # torch (out, in) -> flax (in, out)
  if name.endswith(("/query", "/key", "/value")):
    kernel = kernel.reshape(kernel.shape[0], heads, -1)
  elif name.endswith("/out"):
    kernel = kernel.reshape(heads, -1, kernel.shape[1])
  return f"{name}/kernel", kernel


def rename_key(key: str, value: np.ndarray, heads: int) -> list[tuple[str, np.ndarray]]:
  """One HF tensor -> its (flax path, converted array) pairs (none: dropped)."""
  key = _PREFIX.sub("", key)
  if key in ("embeddings.mask_token", "embeddings.position_ids"):  # (CLIP's, in older files)
    return []
  if key == "embeddings.class_embedding":  # CLIP: (D,)
    return [("cls", value.reshape(1, 1, -1))]
  if key == "embeddings.register_tokens":
    return [("registers", value)]
  if key in ("embeddings.cls_token", "embeddings.position_embeddings"):
    return [("cls" if key.endswith("cls_token") else "pos_embedding", value)]
  if key == "embeddings.position_embedding.weight":  # SigLIP: an nn.Embedding (N, D)
    return [("pos_embedding", value[None])]
  if key == "head.probe":
    return [(MAP + "probe", value)]
  if key.startswith("head.attention.in_proj_"):  # torch MultiheadAttention packs q, k, v
    leaf = key.rsplit("_", 1)[1]
    return [to_flax(f"{MAP}{ATT}{n}", leaf, part, heads)
            for n, part in zip(("query", "key", "value"), np.split(value, 3), strict=True)]
  m = _BLOCK.fullmatch(key)
  if m and m.group(2) in _BLOCK_MODULES:
    name = f"Transformer/encoderblock_{m.group(1)}/{_BLOCK_MODULES[m.group(2)]}"
    return [to_flax(name, m.group(3), value, heads)]
  module, _, leaf = key.rpartition(".")
  if module in _TOP:
    return [to_flax(_TOP[module], leaf, value, heads)]
  return [(key, value)]  # unknown keys pass through so the strict check reports them


def _per_channel(file: pathlib.Path, cfg: dict, key: str) -> tuple[float, float, float]:
  """A processor's mean or std as 3 floats (transformers reads a single number for every
  channel)."""
  value = cfg[key]
  values = [value] * 3 if isinstance(value, int | float) else value
  if (not isinstance(values, list) or len(values) != 3
      or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
    raise ValueError(f"{file}: {key}={value!r}; expected a number or 3 numbers (RGB)")
  return tuple(float(v) for v in values)


def _normalisation(root: pathlib.Path, model_type: str) -> tuple[tuple, tuple]:
  """mean/std from preprocessor_config.json (none where it does not normalise), else the
  family's default.

  Raises:
    ValueError: the processor scales pixels other than to [0, 1] (``do_rescale`` off, or a
      ``rescale_factor`` other than 1/255), which the ViT's uint8 input path does not compute.
  """
  pre = root / "preprocessor_config.json"
  if pre.is_file():
    cfg = json.loads(pre.read_text())
    factor = cfg.get("rescale_factor", 1 / 255)
    if not cfg.get("do_rescale", True) or not math.isclose(factor, 1 / 255):
      raise ValueError(f"{pre}: do_rescale={cfg.get('do_rescale', True)}, rescale_factor="
                       f"{factor}; hydra_jax scales uint8 pixels to [0, 1] (do_rescale=true, "
                       "rescale_factor=1/255)")
    if not cfg.get("do_normalize", True):
      return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if "image_mean" in cfg and "image_std" in cfg:
      return _per_channel(pre, cfg, "image_mean"), _per_channel(pre, cfg, "image_std")
  if FAMILY[model_type] == "dinov2":
    return common.IMAGENET_MEAN, common.IMAGENET_STD
  if FAMILY[model_type] == "clip":
    return common.CLIP_MEAN, common.CLIP_STD
  return common.HALF, common.HALF  # ViTImageProcessor's default ([-1, 1])


def read_tensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file; floating ones as float32 (bf16 / fp16 files too).

  numpy knows bfloat16 once ``ml_dtypes`` (a jax dependency) is imported; the file is read on
  the host, never through device arrays.

  Raises:
    ValueError: the file cannot be read (truncated or corrupt); it is named.
  """
  try:
    tensors = load_file(str(file))
  except SafetensorError as e:
    raise ValueError(f"{file} is a safetensors file that cannot be read (truncated or "
                     f"corrupt?): {e}") from e
  return {k: v.astype(np.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
          for k, v in tensors.items()}


def _clip(flat: dict, source: str, keys: set[str]) -> dict:
  """CLIP's tower as the ViT holds it: post_layernorm on the pooled class token (pooled_norm),
  zero biases for its bias-free patch embedding and projection. ``keys``: the file's tensors."""
  if "classifier.weight" in keys:
    raise ValueError(f"{source}: CLIPForImageClassification classifies the mean of the patch "
                     "tokens without a final LayerNorm, which hydra_jax's ViT does not compute; "
                     "load the CLIP model it was made from (a new head trains on its pooled "
                     "class token)")
  flat = {k.replace("Transformer/encoder_norm/", "pooled_norm/"): v for k, v in flat.items()}
  for name in ("embedding", "head"):
    kernel = flat.get(f"{name}/kernel")
    if kernel is not None:
      flat.setdefault(f"{name}/bias", np.zeros(kernel.shape[-1], np.float32))
  return flat


def _grid(image_size, patch_size) -> tuple[int, int]:
  """(H // p, W // p) of a transformers config's int-or-pair image_size and patch_size."""
  (h, w), (ph, pw) = (np.broadcast_to(x, 2).tolist() for x in (image_size, patch_size))
  return h // ph, w // pw


def load_hf(root: pathlib.Path) -> common.Pretrained:
  """A HF ViT / DINOv2 / SigLIP / CLIP directory -> ``Pretrained`` (not yet finalized)."""
  config = json.loads((root / "config.json").read_text())
  model_type = config["model_type"]
  if model_type in _TWO_TOWERS:  # the vision tower's; older files' *_dict overrides (as there)
    config = dict(config.get("vision_config") or {}, **(config.get("vision_config_dict") or {}),
                  model_type=model_type)
  config = {**_DEFAULTS[FAMILY[model_type]], **config}
  act = config["hidden_act"]  # SwiGLU MLPs (use_swiglu_ffn) use SiLU whatever it says
  if act not in _ACTS and not config.get("use_swiglu_ffn", False):
    raise ValueError(f"{root}: unsupported MLP activation hidden_act={act!r}; expected one of "
                     f"{tuple(_ACTS)} (or use_swiglu_ffn=True)")
  heads = config["num_attention_heads"]
  flat, keys = {}, set()
  for file in sorted(root.glob("*.safetensors")):
    for key, value in read_tensors(file).items():
      keys.add(key)
      if key.startswith(_TEXT_TOWER):
        continue
      flat.update(rename_key(key, value, heads))
  if not config.get("qkv_bias", True):  # no q/k/v biases: zeros are the same function
    width = flat["embedding/kernel"].shape[-1]
    for name in [k for k in flat if k.endswith(f"/{ATT}query/kernel")]:
      for qkv in ("query", "key", "value"):
        flat[name.replace("query/kernel", f"{qkv}/bias")] = np.zeros(
            (heads, width // heads), np.float32)
  if "pre_logits/kernel" in flat and config.get("pooler_act", "tanh") != "tanh":
    raise ValueError(f"{root}: pooler_act {config['pooler_act']!r} is not supported; the "
                     "ViT's pre_logits layer is tanh")
  if FAMILY[model_type] == "clip":
    flat = _clip(flat, str(root), keys)
  fields = dict(ln_eps=float(config["layer_norm_eps"]), **_ACTS.get(act, {}),
                posemb_resample=POSEMB_RESAMPLE.get(model_type, "bicubic"))
  if model_type == "vit":  # its posemb lies on the (H/p, W/p) grid of image_size, maybe not square
    fields["posemb_grid"] = _grid(config.get("image_size", 224), config.get("patch_size", 16))
  head = flat.get("head/kernel")
  if head is None and POOL_KEY in config:  # save_hf's headless export of a class-token model
    fields["pool"] = config[POOL_KEY]
  if FAMILY[model_type] == "dinov2" and head is not None and (
      head.shape[0] == 2 * config["hidden_size"]):
    fields["pool"] = "tok+gap"
  if model_type == "siglip" and head is not None:  # SiglipForImageClassification: token mean
    fields["pool"] = "gap"
    flat = {k: v for k, v in flat.items() if not k.startswith(MAP)}
  model = common.infer_model(flat, str(root), **fields)
  if model["swiglu"] != bool(config.get("use_swiglu_ffn", False)):
    raise ValueError(f"{root}: config.json says use_swiglu_ffn={config.get('use_swiglu_ffn')} but "
                     f"the MLP weights are {'packed SwiGLU' if model['swiglu'] else 'plain'}")
  mean, std = _normalisation(root, model_type)
  return common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), model, mean, std,
                           f"hf-{model_type}:{root}")
