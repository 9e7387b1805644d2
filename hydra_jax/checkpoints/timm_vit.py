"""timm ``VisionTransformer`` checkpoints, both ways.

Read: a timm Hub directory (``config.json`` naming an ``architecture``, and ``model.safetensors``:
what ``timm`` downloads and ``push_to_hub`` / ``save_for_hf`` write), or a bare state-dict
``.safetensors`` file (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...). Write
(``save_timm``): such a directory, which PyTorch loads with
``timm.create_model("local-dir:DIR", pretrained=True)``.

Names: ``cls_token`` -> cls, ``reg_token`` -> registers, ``pos_embed`` -> pos_embedding,
``patch_embed.proj`` -> embedding, ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}`` -> block i's LayerNorm_0, query/key/value (packed in that order
along qkv's output), out, LayerScale_0, LayerNorm_1, Dense_0, Dense_1, LayerScale_1; ``norm`` ->
encoder_norm, ``fc_norm`` (the final norm after the pooling) -> pooled_norm, ``head`` -> head;
``attn_pool.{latent, q, kv, proj, norm, mlp}`` -> MAPHead_0's probe, query, key/value (packed),
out, LayerNorm_0, MlpBlock_0.

Position embeddings: timm's ``no_embed_class`` models add theirs to the patch tokens only (their
class token gets a zero entry here); the others also hold entries for the class token and the
registers (a register's entry is a constant: it is added into the register token); at another
grid they are resampled as timm's ``resample_abs_pos_embed`` does (bicubic, antialiased). Pools:
"token" -> "tok", "avg" -> "gap" (both leave the class token and registers out), "map" -> "map";
timm's MAP head reads the patch tokens only unless ``pool_include_prefix``, hydra_jax's reads every
token, so a MAP head over a model with a class token or registers needs it.

A packed SwiGLU MLP (timm's ``SwiGLUPacked``, DINOv2 giant's: fc1 puts out [gate, value], twice
what fc2 reads) is the ViT's ``swiglu``.

The tensors do not say the head count, exact or tanh GELU, the LayerNorm eps or the pooling; timm
takes them from the architecture. Here they come from ``config.json``'s ``model_args`` first, then
``timm_architectures.json`` (every architecture of timm's registry this ViT computes exactly, as
``scripts/timm_architectures.py`` read it), else timm's defaults with a warning naming each
(64-wide heads, exact GELU, eps 1e-6, pool "token" with a class token, "avg" without).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from hydra_jax.checkpoints import common, hf, hf_export
from hydra_jax.checkpoints.hf import ATT, MAP, MLP
from hydra_jax.models import ARCHITECTURE_DEFAULTS

ARCHITECTURES = pathlib.Path(__file__).with_name("timm_architectures.json")
WEIGHTS = "model.safetensors"
FILES = ("config.json", WEIGHTS)
# The timm architecture whose entrypoint ``save_timm`` names; its model_args override every field.
EXPORT_ARCHITECTURE = "vit_base_patch16_224"
TIMM_LN_EPS = 1e-6  # timm's VisionTransformer LayerNorm (not configurable from a config file)
POOLS = {"token": "tok", "avg": "gap", "map": "map"}
# resample_abs_pos_embed's default, in checkpoint_filter_fn and dynamic_img_size alike
POSEMB_RESAMPLE = "bicubic_antialias"
# timm act_layer name -> the ViT's activation fields
_ACTS = {"gelu": {}, "gelu_tanh": dict(gelu_approximate=True), "quick_gelu": dict(quick_gelu=True)}
_ROW_ACTS = {"exact": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}  # the JSON's "gelu"
_SWIGLU_ACTS = ("silu", "swish")  # the act_layer of timm's SwiGLUPacked MLP
# The architecture ``save_timm`` names for a model with LayerNorm eps 1e-5 (its entrypoint's).
CLIP_ARCHITECTURE, CLIP_LN_EPS = "vit_base_patch16_clip_224", 1e-5
# The architecture ``save_timm`` names for a SwiGLU model (its entrypoint's MLP is SwiGLUPacked).
SWIGLU_ARCHITECTURE = "vit_giant_patch14_dinov2"
_UNSUPPORTED = {  # a key fragment -> the timm feature hydra_jax's ViT does not compute
    "dist_token": "a distillation token (DeiT distilled)",
    "head_dist.": "a distillation head (DeiT distilled)",
    ".q_norm.": "qk_norm", ".k_norm.": "qk_norm",
    ".attn.norm.": "scale_attn_norm", ".mlp.norm.": "scale_mlp_norm",
    ".mlp.fc1_g.": "an unpacked gated MLP (timm's SwiGLU: fc1_g, fc1_x)",
    ".mlp.fc1_x.": "an unpacked gated MLP (timm's SwiGLU: fc1_g, fc1_x)",
    "patch_embed.norm.": "a patch-embedding norm", "patch_embed.backbone.": "a hybrid CNN stem",
    "attn_pool.pos_embed": "a position embedding in the MAP head",
    ".attns.": "parallel blocks", ".ffns.": "parallel blocks",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)")
_BLOCK_MODULES = {"norm1": "LayerNorm_0", "attn.proj": ATT + "out", "ls1": "LayerScale_0",
                  "norm2": "LayerNorm_1", "mlp.fc1": MLP + "Dense_0", "mlp.fc2": MLP + "Dense_1",
                  "ls2": "LayerScale_1"}
_TOP = {"patch_embed.proj": "embedding", "norm_pre": "embedding_norm",
        "norm": "Transformer/encoder_norm",
        "fc_norm": "pooled_norm", "head": "head",
        "attn_pool.q": MAP + ATT + "query", "attn_pool.proj": MAP + ATT + "out",
        "attn_pool.norm": MAP + "LayerNorm_0", "attn_pool.mlp.fc1": MAP + MLP + "Dense_0",
        "attn_pool.mlp.fc2": MAP + MLP + "Dense_1"}
_PACKED = {"attn.qkv": ("query", "key", "value"), "attn_pool.kv": ("key", "value")}
_TIMM_MODULES = {**{v: k for k, v in _BLOCK_MODULES.items()}, **{v: k for k, v in _TOP.items()}}


@functools.cache
def architectures() -> dict[str, dict]:
  """timm architecture -> the fields its tensors do not record (``timm_architectures.json``)."""
  return json.loads(ARCHITECTURES.read_text())["architectures"]


def _config(root: pathlib.Path) -> dict | None:
  """A timm ``config.json`` in ``root`` (one naming an ``architecture``), else None."""
  file = root / "config.json"
  if not file.is_file():
    return None
  config = json.loads(file.read_text())
  return config if "architecture" in config and "model_type" not in config else None


def timm_source(path: pathlib.Path) -> tuple[pathlib.Path, dict | None] | None:
  """(weights file, its config.json or None) when ``path`` is a timm checkpoint, else None.

  Raises:
    ValueError: a timm directory without ``model.safetensors``.
  """
  if path.is_dir():
    if (config := _config(path)) is None:
      return None
    if not (path / WEIGHTS).is_file():
      raise ValueError(f"{path}: a timm directory without {WEIGHTS} (hydra_jax reads no torch "
                       "pickles: convert pytorch_model.bin with safetensors.torch.save_file)")
    return path / WEIGHTS, config
  if path.suffix != ".safetensors":
    return None
  if (config := _config(path.parent)) is not None:
    return path, config
  with safe_open(str(path), "np") as f:
    return (path, None) if "patch_embed.proj.weight" in f.keys() else None  # noqa: SIM118


def _fields(config: dict | None, width: int, tensors: dict, source: str, swiglu: bool) -> dict:
  """num_heads, act (the activation's ViT fields), ln_eps, pool, pool_include_prefix,
  no_embed_class (None: infer from the shapes) and img_size (None: unknown) of the timm model, by
  the rule in the docstring.
  ``swiglu``: its MLP's fc1 puts out twice what fc2 reads (a packed gated MLP)."""
  class_token, has_head = "cls_token" in tensors, "head.weight" in tensors
  # timm's default pool: the class token where there is one, unless fc_norm says "avg" (timm
  # gives fc_norm only to avg-pooled models unless told otherwise)
  token_pooled = class_token and "fc_norm.weight" not in tensors
  args = dict((config or {}).get("model_args") or {})
  if config and "global_pool" in config:
    args.setdefault("global_pool", config["global_pool"])
  row = architectures().get(config["architecture"], {}) if config else {}
  act = args.get("act_layer")
  if act is None and row.get("mlp") == "swiglu":
    act = "silu"
  elif act is None and "gelu" in row:
    act = _ROW_ACTS[row["gelu"]]
  acts = _SWIGLU_ACTS if swiglu else tuple(_ACTS)
  if act is not None and act not in acts:
    raise ValueError(f"{source}: timm act_layer {act!r} is not supported with "
                     f"{'a packed gated (SwiGLU) MLP' if swiglu else 'a plain MLP'}; expected one "
                     f"of {acts}")
  pool = args.get("global_pool", row.get("global_pool"))
  assumed = []
  if "num_heads" not in args and "num_heads" not in row:
    if width % 64:
      raise ValueError(f"{source}: the head count cannot be read off a bare file and width "
                       f"{width} is not a multiple of timm's usual 64-wide heads; put a timm "
                       "config.json beside it with model_args.num_heads")
    assumed.append(f"num_heads={width // 64} (64-wide heads)")
  if act is None:
    assumed.append("SwiGLUPacked: silu(first half of fc1) * second half" if swiglu
                   else "exact GELU")
  ln_eps = row.get("ln_eps")
  if ln_eps is None:  # timm's pre-norm (CLIP) architectures all normalise with eps 1e-5
    ln_eps = CLIP_LN_EPS if "norm_pre.weight" in tensors else TIMM_LN_EPS
    assumed.append(f"LayerNorm eps {ln_eps:g}" + (" (a pre-norm model: CLIP's)"
                                                  if ln_eps == CLIP_LN_EPS else ""))
  if pool is None and "attn_pool.latent" in tensors:
    pool = "map"  # the only pool with a MAP head
  elif pool is None:
    pool = "token" if token_pooled else "avg"
    assumed.append(f"global_pool={pool!r}")
  if assumed:
    what = (f"architecture {config['architecture']!r} is not among the timm architectures "
            "hydra_jax's ViT computes (timm_architectures.json)" if config
            else "no timm config.json beside it")
    logging.warning("%s: %s; assuming timm's defaults: %s", source, what, ", ".join(assumed))
  if pool not in POOLS and (pool != "" or has_head):  # "": every token out, no head
    raise ValueError(f"{source}: timm global_pool {pool!r} is not supported; expected one of "
                     f"{tuple(POOLS)} ('' only without a head)")
  empty_pool = "tok" if token_pooled else "gap"
  if pool == "":
    logging.warning("%s: timm global_pool '' puts out every token; hydra_jax's ViT pools them "
                    "(%s) for the head you give it", source, empty_pool)
  size = args.get("img_size") or ((config or {}).get("pretrained_cfg") or {}).get(
      "input_size", [None])[1:] or None
  return dict(
      num_heads=args.get("num_heads", row.get("num_heads", width // 64)),
      act=_ACTS.get(act or "gelu", {}), ln_eps=ln_eps,
      pool=POOLS.get(pool, empty_pool),  # "": pooled for a new head
      pool_include_prefix=bool(args.get("pool_include_prefix",
                                        row.get("pool_include_prefix", False))),
      no_embed_class=args.get("no_embed_class", row.get("no_embed_class")),
      img_size=None if size is None else tuple(np.broadcast_to(size, 2).tolist()))


def rename(key: str, value: np.ndarray, heads: int) -> list[tuple[str, np.ndarray]]:
  """One timm tensor -> its (ViT path, array) pairs; unknown keys pass through for the check."""
  if key in ("cls_token", "reg_token", "pos_embed"):
    return [(key, value)]  # placed by _position
  if key == "attn_pool.latent":
    return [(MAP + "probe", value)]
  block = _BLOCK.fullmatch(key)
  module, _, leaf = key.rpartition(".")
  if block:
    module, leaf = block.group(2), block.group(3)
  prefix = f"{hf_export.BLOCK}{block.group(1)}/" if block else ""
  if module in _PACKED:
    base = prefix + (ATT if block else MAP + ATT)
    names = _PACKED[module]
    return [hf.to_flax(base + n, leaf, part, heads)
            for n, part in zip(names, np.split(value, len(names)), strict=True)]
  if block and module in _BLOCK_MODULES:
    return [hf.to_flax(prefix + _BLOCK_MODULES[module], leaf, value, heads)]
  if not block and module in _TOP:
    return [hf.to_flax(_TOP[module], leaf, value, heads)]
  return [(key, value)]


def _square(n: int) -> bool:
  return n >= 1 and math.isqrt(n) ** 2 == n


def _position(flat: dict, no_embed_class: bool | None, grid_tokens: int | None,
              source: str) -> dict:
  """Places timm's class token, registers and position embedding as the ViT holds them.

  Whether the position embedding has entries for the class token and registers is, unless
  given, read off its length: against ``grid_tokens`` when the image size is known, else as
  whichever of (with, without) leaves a square patch grid (with, timm's default, when both do).
  """
  pos = flat.pop("pos_embed", None)
  if pos is None:
    raise ValueError(f"{source}: no pos_embed (a timm model without a learned position "
                     "embedding is not supported)")
  cls = flat.pop("cls_token", None)
  registers = flat.pop("reg_token", None)
  num_cls = 0 if cls is None else 1
  prefix = num_cls + (0 if registers is None else registers.shape[1])
  if no_embed_class is None and grid_tokens is not None:
    no_embed_class = bool(prefix) and pos.shape[1] == grid_tokens
  elif no_embed_class is None:
    no_embed_class = bool(prefix) and _square(pos.shape[1]) and not _square(pos.shape[1] - prefix)
    if prefix and _square(pos.shape[1]) and _square(pos.shape[1] - prefix):
      logging.warning("%s: pos_embed's %d entries fit a square grid with and without entries for "
                      "the %d class / register tokens; read as with (timm's default). A timm "
                      "config.json with the image size decides", source, pos.shape[1], prefix)
  if no_embed_class:
    pos = np.concatenate([np.zeros((1, prefix, pos.shape[-1]), pos.dtype), pos], axis=1)
  if registers is not None:
    flat["registers"] = registers + pos[:, num_cls:prefix]
  if cls is not None:
    flat["cls"] = cls
  flat["pos_embedding"] = np.concatenate([pos[:, :num_cls], pos[:, prefix:]], axis=1)
  return flat


def load_timm(weights: pathlib.Path, config: dict | None) -> common.Pretrained:
  """A timm state dict (and its config.json, if any) -> ``Pretrained`` (not yet finalized)."""
  source = str(weights.parent if config else weights)
  tensors = hf.read_tensors(weights)
  for key in tensors:
    for fragment, feature in _UNSUPPORTED.items():
      if fragment in key:
        raise ValueError(f"{source}: {key!r} belongs to {feature}, which hydra_jax's ViT does "
                         "not compute")
  if "patch_embed.proj.weight" not in tensors:
    raise ValueError(f"{source}: no 'patch_embed.proj.weight'; expected a timm VisionTransformer")
  width = tensors["patch_embed.proj.weight"].shape[0]
  fc1, fc2 = (tensors.get(f"blocks.0.mlp.{n}.weight") for n in ("fc1", "fc2"))
  if fc1 is not None and fc2 is not None and fc1.shape[0] not in (fc2.shape[1], 2 * fc2.shape[1]):
    raise ValueError(f"{source}: blocks.0.mlp.fc1 puts out {fc1.shape[0]} features and fc2 reads "
                     f"{fc2.shape[1]}; expected as many (a GELU MLP) or twice as many (a packed "
                     "SwiGLU MLP)")
  swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
  fields = _fields(config, width, tensors, source, swiglu)
  if "norm.weight" not in tensors and "fc_norm.weight" not in tensors:
    raise ValueError(f"{source}: no final 'norm' nor 'fc_norm' (timm's final_norm=False), which "
                     "hydra_jax's ViT always has")
  heads = fields["num_heads"]
  flat = {}
  for key, value in tensors.items():
    flat.update(rename(key, value, heads))
  flat.setdefault("embedding/bias", np.zeros(width, np.float32))  # pre_norm: a bias-free conv
  for path in [k for k in flat if k.endswith(f"{ATT}query/kernel")]:  # qkv_bias=False
    for name in ("query", "key", "value"):
      flat.setdefault(path.replace("query/kernel", f"{name}/bias"),
                      np.zeros((heads, width // heads), np.float32))
  patch = flat["embedding/kernel"].shape[0]
  grid = None if fields["img_size"] is None else tuple(s // patch for s in fields["img_size"])
  flat = _position(flat, fields["no_embed_class"], grid and grid[0] * grid[1], source)
  prefix = "cls" in flat or "registers" in flat
  if prefix and fields["pool"] == "map" and not fields["pool_include_prefix"]:
    raise ValueError(f"{source}: timm's MAP head here reads only the patch tokens "
                     "(pool_include_prefix=False); hydra_jax's reads the class token and registers "
                     "too")
  if prefix and fields["pool"] == "gap" and fields["pool_include_prefix"]:
    raise ValueError(f"{source}: timm's avg pool here averages the class token and registers in "
                     "(pool_include_prefix=True); hydra_jax's 'gap' averages the patch tokens only")
  extra = {}
  patches = flat["pos_embedding"].shape[1] - int("cls" in flat)
  if grid is not None and grid[0] * grid[1] == patches:
    extra["posemb_grid"] = grid
  elif not _square(patches):
    raise ValueError(f"{source}: {patches} patch positions make no square grid; a timm "
                     "config.json beside the weights giving model_args.img_size or "
                     "pretrained_cfg.input_size tells the grid")
  model = common.infer_model(flat, source, ln_eps=fields["ln_eps"], pool=fields["pool"],
                             **fields["act"], posemb_resample=POSEMB_RESAMPLE, **extra)
  pretrained = ((config or {}).get("pretrained_cfg") or {})
  if "mean" in pretrained and "std" in pretrained:
    mean, std = tuple(pretrained["mean"]), tuple(pretrained["std"])
  else:
    logging.warning("%s: no mean/std recorded; assuming timm's ViT default 0.5 / 0.5", source)
    mean = std = common.HALF
  return common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), model, mean, std,
                           f"timm:{source}")


def _timm_place(path: str) -> tuple[str, tuple[str, ...]] | None:
  """A ViT module -> (its timm module, the ViT modules packed there in order); None: timm has no
  such module. A block's query / key / value share ``blocks.i.attn.qkv``, the MAP head's key /
  value ``attn_pool.kv``; every other module is alone in its timm module."""
  module = path.rpartition("/")[0]
  if path.startswith(hf_export.BLOCK):
    index, rest = path[len(hf_export.BLOCK):].split("/", 1)
    if rest in (ATT + "query", ATT + "key", ATT + "value"):
      return f"blocks.{index}.attn.qkv", tuple(f"{module}/{n}" for n in _PACKED["attn.qkv"])
    return (f"blocks.{index}.{_TIMM_MODULES[rest]}", (path,)) if rest in _TIMM_MODULES else None
  if path in (MAP + ATT + "key", MAP + ATT + "value"):
    return "attn_pool.kv", tuple(f"{module}/{n}" for n in _PACKED["attn_pool.kv"])
  return (_TIMM_MODULES[path], (path,)) if path in _TIMM_MODULES else None


def timm_module(path: str) -> tuple[str, tuple[str, ...]]:
  """A ViT linear layer -> (its timm ``nn.Linear``, the ViT layers packed there in order).

  Raises:
    ValueError: ``path`` is not one of the ViT's linear layers in timm.
  """
  place = _timm_place(path)
  if place is None or "Layer" in path or hf.is_layer_norm(path) or path == "embedding":
    raise ValueError(f"layer {path} is not a torch.nn.Linear in timm's VisionTransformer; "
                     "expected a block's query, key, value, out, Dense_0 or Dense_1, the head, or "
                     "a MAP-head linear layer")
  return place


def vit_layers(module: str) -> tuple[str, ...]:
  """A timm ``nn.Linear`` module name -> the ViT layers it holds (several where timm packs)."""
  block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
  if block and block[2] == "attn.qkv":
    return tuple(f"{hf_export.BLOCK}{block[1]}/{ATT}{n}" for n in _PACKED["attn.qkv"])
  if block and block[2] in _BLOCK_MODULES and not block[2].startswith(("norm", "ls")):
    return (f"{hf_export.BLOCK}{block[1]}/{_BLOCK_MODULES[block[2]]}",)
  if module == "attn_pool.kv":
    return tuple(f"{MAP}{ATT}{n}" for n in _PACKED["attn_pool.kv"])
  if module in _TOP and not hf.is_layer_norm(_TOP[module]) and module != "patch_embed.proj":
    return (_TOP[module],)
  if module == "patch_embed.proj":
    raise ValueError("patch_embed.proj is the patch embedding, a convolution: hydra_jax's LoRA "
                     "adapts linear layers (target timm's 'attn.proj', not 'proj', which also "
                     "matches it)")
  raise ValueError(f"module {module!r} is not a linear layer of timm's VisionTransformer "
                   "hydra_jax knows")


def model_args(model: dict, num_classes: int | None) -> dict:
  """timm VisionTransformer arguments computing ``ViT(**model)``."""
  pool = {v: k for k, v in POOLS.items()}.get(model["pool"])
  if pool is None:
    raise ValueError(f"timm has no pool {model['pool']!r}; export a model pooled 'tok', 'gap' "
                     "or 'map'")
  if model.get("representation_size"):
    raise ValueError("timm's VisionTransformer has no pre_logits layer (representation_size="
                     f"{model['representation_size']}); load with drop_pre_logits=True first")
  swiglu = bool(model.get("swiglu"))
  if swiglu and pool == "map":
    raise ValueError("timm's MAP head builds its MLP like the blocks' (SwiGLU here), hydra_jax's "
                     "is GELU: export a SwiGLU model pooled 'tok' or 'gap'")
  width = model["width"]
  mlp = model["mlp_dim"] * (2 if swiglu else 1)  # SwiGLUPacked's fc1 puts out gate and value
  ratio = mlp / width
  if int(width * ratio) != mlp:  # timm builds int(width * mlp_ratio) hidden units
    ratio = (mlp + 0.5) / width
  p, (gh, gw) = model["patch_size"], model["posemb_grid"]
  prefix = int(model["class_token"]) + model.get("num_registers", 0)
  return dict(
      img_size=gh * p if gh == gw else [gh * p, gw * p], patch_size=p, embed_dim=width,
      depth=model["depth"], num_heads=model["num_heads"], mlp_ratio=ratio, qkv_bias=True,
      class_token=model["class_token"], reg_tokens=model.get("num_registers", 0),
      no_embed_class=False, global_pool=pool, fc_norm=bool(model.get("fc_norm")),
      pre_norm=bool(model.get("pre_norm")), init_values=1.0 if model["layer_scale"] else None,
      act_layer=("silu" if swiglu else "quick_gelu" if model.get("quick_gelu")
                 else "gelu_tanh" if model["gelu_approximate"] else "gelu"),
      pool_include_prefix=pool == "map" and prefix > 0, num_classes=num_classes or 0)


def _tensors(flat: dict, model: dict) -> dict[str, np.ndarray]:
  """The ViT's flat params -> timm's state dict."""
  out, packed = {}, {}
  num_cls = int(model["class_token"])
  width = flat["embedding/kernel"].shape[-1]
  registers = model.get("num_registers", 0)
  for path, value in flat.items():
    name, _, leaf = path.rpartition("/")
    if path in ("cls", "registers", "pos_embedding"):
      continue
    if path == MAP + "probe":
      out["attn_pool.latent"] = value
      continue
    torch_leaf, array = hf_export.to_torch(name, leaf, value)
    module, parts = _timm_place(name)
    key = f"{module}.{'gamma' if torch_leaf == 'lambda1' else torch_leaf}"
    if len(parts) > 1:  # timm packs q, k, v (the MAP head: k, v) along the output
      packed.setdefault(key, (parts, {}))[1][name] = array
    else:
      out[key] = array
  for key, (parts, arrays) in packed.items():
    out[key] = np.concatenate([arrays[p] for p in parts])
  pos = flat["pos_embedding"]
  out["pos_embed"] = np.concatenate(
      [pos[:, :num_cls], np.zeros((1, registers, width), pos.dtype), pos[:, num_cls:]], axis=1)
  if num_cls:
    out["cls_token"] = flat["cls"]
  if registers:
    out["reg_token"] = flat["registers"]
  return out


def _export_architecture(model: dict) -> tuple[str, float]:
  """The timm entrypoint ``config.json`` names for ``model`` and its LayerNorm eps (the one
  field its model_args cannot set): SwiGLU needs DINOv2 giant's, eps 1e-5 (CLIP) a CLIP one's."""
  if model["swiglu"]:
    return SWIGLU_ARCHITECTURE, TIMM_LN_EPS
  if model["ln_eps"] == CLIP_LN_EPS:
    return CLIP_ARCHITECTURE, CLIP_LN_EPS
  return EXPORT_ARCHITECTURE, TIMM_LN_EPS


def save_timm(directory, pretrained: common.Pretrained, *, labels: Sequence[str] | None = None,
              dtype: str = "float32") -> str:
  """Writes ``pretrained`` (e.g. a merged fine-tune) as a timm directory.

  ``timm.create_model("local-dir:DIR", pretrained=True)`` builds timm's VisionTransformer from
  ``config.json`` (``architecture`` is timm's ``vit_base_patch16_224`` entrypoint, for a SwiGLU
  model ``vit_giant_patch14_dinov2``, whose MLP is SwiGLUPacked, for LayerNorm eps 1e-5 (CLIP)
  ``vit_base_patch16_clip_224``; ``model_args`` give every other field) and loads
  ``model.safetensors`` into it.

  Args:
    directory: the directory to write; an earlier export there is replaced.
    pretrained: params in the ViT layout and the model fields describing them.
    labels: class names (``label_names``), one per head output.
    dtype: tensor dtype in the file, one of ``hf_export.DTYPES``.

  Returns:
    The architecture written to ``config.json``.

  Raises:
    ValueError: a model timm's VisionTransformer does not compute ("tok+gap" pooling, a
      pre_logits layer), or a bad ``labels`` / ``dtype``.
  """
  if dtype not in hf_export.DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {hf_export.DTYPES}")
  flat = common.flat_float32(pretrained.params)
  model = {**ARCHITECTURE_DEFAULTS, **pretrained.model}
  num_classes = flat["head/kernel"].shape[-1] if "head/kernel" in flat else None
  args = model_args(model, num_classes)
  if labels is not None and (num_classes is None or len(labels) != num_classes):
    raise ValueError(f"labels has {len(labels)} names; the model has "
                     f"{num_classes or 'no'} head outputs")
  architecture, eps = _export_architecture(model)
  if model["ln_eps"] != eps:
    logging.warning("timm's %s normalises with LayerNorm eps %g; this model's is %g (outputs "
                    "differ in the last digits)", architecture, eps, model["ln_eps"])
  h, w = model["posemb_grid"][0] * args["patch_size"], model["posemb_grid"][1] * args["patch_size"]
  config = dict(
      architecture=architecture, num_classes=num_classes or 0, num_features=model["width"],
      global_pool=args["global_pool"], model_args=args,
      pretrained_cfg=dict(input_size=[3, h, w], fixed_input_size=True, interpolation="bicubic",
                          crop_pct=1.0, crop_mode="center", mean=list(pretrained.mean),
                          std=list(pretrained.std), num_classes=num_classes or 0,
                          first_conv="patch_embed.proj", classifier="head"))
  if labels is not None:
    config["label_names"] = list(labels)
  if model.get("pre_norm"):  # timm's pre-norm models build their patch embedding without a bias
    flat = hf_export.fold_patch_bias(flat)
  tensors = {k: np.ascontiguousarray(v.astype(jnp.dtype(dtype)))
             for k, v in _tensors(flat, model).items()}

  def write(tmp: pathlib.Path) -> None:
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

  hf_export.write_dir(directory, FILES, write)
  return architecture
