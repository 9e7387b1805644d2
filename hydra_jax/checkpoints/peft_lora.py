"""LoRA adapters as Hugging Face PEFT adapter directories, written and read.

``save_peft`` writes what ``peft.PeftModel.from_pretrained(model, directory)`` loads onto the
transformers model that ``save_hf`` writes for the same base; ``load_peft`` reads a PEFT LoRA
adapter of a ViT / DINOv2 / SigLIP / CLIP model as hydra_jax LoRA factors (to merge, weigh,
evaluate or keep training it in JAX; a two-tower model's text-tower LoRA is left out, with a
warning). A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.

The factors map one to one: ``lora_A.weight`` is A^T (r, d_in), ``lora_B.weight`` is B^T
(d_out, r), PEFT's ``lora_alpha / r`` is ``alpha / rank`` and its ``lora_dropout`` (on the input)
is LoRA's dropout. Factor biases (``AdapterSpec(bias=True)``) fold exactly into
``lora_B.bias = a B + b`` (PEFT's ``lora_bias``). A trained head is a ``modules_to_save``
classifier. Where ``save_hf`` folds LayerScale into the attention-out / MLP-out layer (a
non-DINOv2 class), the same scale multiplies that layer's ``lora_B`` (``load_peft`` divides it
back out onto a base with LayerScale). PEFT's ``r`` is the largest layer rank; layers of other
ranks (e.g. after ``adapters.add``) go to ``rank_pattern``, their B scaled by their rank / ``r``
(PEFT scales each layer by ``lora_alpha`` / its own rank). SigLIP's MAP-head attention is a torch
``MultiheadAttention``, which never runs a LoRA on its ``out_proj``: refused both ways.

On timm's VisionTransformer (``save_peft(..., target="timm")`` for the model ``save_timm``
writes; ``load_peft`` of an adapter naming ``blocks.i.attn.qkv``, ...) a block's query, key and
value are one packed ``attn.qkv`` layer: its LoRA is theirs with A concatenated and B
block-diagonal. On load each part keeps the rank columns its B uses (a ``save_peft`` export reads
back as it was written; a PEFT-trained qkv LoRA becomes three sharing A); a part whose B and bias
are zero is not adapted, unless every part is (an untrained LoRA: PEFT adapts all three).

PEFT names modules as the running transformers model does, and transformers renamed them (the
checkpoint files kept the old names): ViT's attention became ``attention.q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj`` and its MLP ``mlp.fc1`` / ``fc2`` in blocks ``layers.i`` in 5.9 (before:
``encoder.layer.i.attention.attention.query``, ..., ``intermediate.dense``, ``output.dense``);
DINOv2's attention likewise in 5.18; ``SiglipVisionModel`` dropped its ``vision_model.`` prefix
in 5.6. An adapter saved under one naming does not load under the other, so ``save_peft``
writes the names of one transformers version (default: the installed one, else the newest
naming) and ``load_peft`` reads any of them.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import pathlib
import re

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hydra_jax.adapters import spec as spec_lib
from hydra_jax.adapters import transform
from hydra_jax.checkpoints import common, hf, hf_export, timm_vit
from hydra_jax.checkpoints.hf import ATT, FAMILY_BLOCK, FAMILY_TOP, MAP, MLP
from hydra_jax.checkpoints.hf_export import BLOCK as _BLOCK
from hydra_jax.models import ARCHITECTURE_DEFAULTS

FILES = ("adapter_config.json", "adapter_model.safetensors")
TARGETS = ("transformers", "timm")
_LINEAR_BLOCK = (ATT + "query", ATT + "key", ATT + "value", ATT + "out", MLP + "Dense_0",
                 MLP + "Dense_1")
# (SigLIP's MAP head is a torch.nn.MultiheadAttention: it reads out_proj.weight directly, so a
# PEFT LoRA on its out_proj never runs; its packed query / key / value have no module of their own)
_LINEAR_TOP = ("head", "pre_logits", MAP + MLP + "Dense_0", MAP + MLP + "Dense_1")
_NEW_ATTENTION = {ATT + "query": "attention.q_proj", ATT + "key": "attention.k_proj",
                  ATT + "value": "attention.v_proj", ATT + "out": "attention.o_proj"}
# family -> (first transformers version with the new block module names, those names)
_RENAMED = {"vit": ((5, 9), {**_NEW_ATTENTION, MLP + "Dense_0": "mlp.fc1",
                             MLP + "Dense_1": "mlp.fc2"}),
            "dinov2": ((5, 18), _NEW_ATTENTION)}
_SIGLIP_VISION_UNPREFIXED = (5, 6)
# every block module name of every naming -> the ViT's module
_BLOCK_ALIASES = {**hf._BLOCK_MODULES,
                  **{new: vit for _, names in _RENAMED.values() for vit, new in names.items()}}
_BLOCK_KEY = re.compile(r"(?:encoder\.)?layers?\.(\d+)\.(.+)")
_LORA_KEY = re.compile(r"(.+)\.lora_(A|B)\.(weight|bias)")
_PEFT_PREFIX = "base_model.model."


def _version(given: str | None) -> tuple[int, int]:
  """(major, minor) of ``given``, else of the installed transformers, else the newest naming."""
  if given is None:
    try:
      given = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
      return (999, 0)
  m = re.match(r"(\d+)\.(\d+)", given)
  if m is None:
    raise ValueError(f"transformers_version {given!r} is not a version like '5.23.0'")
  return int(m[1]), int(m[2])


def module_name(path: str, family: str, arch: str, version: tuple[int, int]) -> str:
  """The transformers module (as PEFT names it) of the ViT's linear layer ``path``.

  Raises:
    ValueError: ``path`` is not a layer PEFT's LoRA adapts as a ``torch.nn.Linear`` in ``arch``
      (the patch embedding is a convolution; the MAP head packs query / key / value).
  """
  prefix = hf_export.PREFIX.get(arch, "")
  if arch == "SiglipVisionModel" and version >= _SIGLIP_VISION_UNPREFIXED:
    prefix = ""
  if path.startswith(_BLOCK):
    block, module = path[len(_BLOCK):].split("/", 1)
    if module in _LINEAR_BLOCK:
      since, names = _RENAMED.get(family, (None, {}))
      renamed = since is not None and version >= since
      name = names.get(module, FAMILY_BLOCK[family][module]) if renamed else (
          FAMILY_BLOCK[family][module])
      blocks = "layers" if (family, renamed) == ("vit", True) else (
          "encoder.layers" if family in hf.PLURAL_LAYERS else "encoder.layer")
      return f"{prefix}{blocks}.{block}.{name}"
  elif path in _LINEAR_TOP and path in FAMILY_TOP[family]:
    name = FAMILY_TOP[family][path]
    return name if name == "classifier" else prefix + name
  raise ValueError(f"layer {path} has no torch.nn.Linear in transformers' {arch} that PEFT's LoRA "
                   f"runs; expected a block's query, key, value, out, Dense_0 or Dense_1, or one "
                   f"of {[p for p in _LINEAR_TOP if p in FAMILY_TOP[family]]}")


def _layer_scale(base: common.Pretrained, layer_path: tuple[str, ...], family: str):
  """The LayerScale after a block's out / Dense_1 layer where transformers' ``family`` has none
  (``save_hf`` folds it into the layer there, so the layer's lora_B carries it too); else None."""
  if family in ("dinov2", "timm") or not "/".join(layer_path).startswith(_BLOCK):
    return None
  scale = {"out": "LayerScale_0", "Dense_1": "LayerScale_1"}.get(layer_path[-1])
  block = base.params[layer_path[0]][layer_path[1]]
  return np.asarray(block[scale]["scale"]) if scale in block else None


def _packed(parts: tuple[str, ...], got: dict):
  """One PEFT module's A (d_in, r), B (r, d_out) and lora_B bias from the factors ``got`` of the
  ViT layers ``parts`` it packs (r: their ranks summed): A concatenated, B block-diagonal (a part
  without factors gets zero columns)."""
  d_in = next(iter(got.values()))[0].shape[0]
  width = next(iter(got.values()))[1].shape[1]  # packed parts have equal widths
  rank = sum(pa.shape[1] for pa, _, _ in got.values())
  a = np.zeros((d_in, rank), np.float32)
  b = np.zeros((rank, width * len(parts)), np.float32)
  bias = np.zeros(width * len(parts), np.float32)
  row = 0
  for i, part in enumerate(parts):
    if part in got:
      pa, pb, pbias = got[part]
      r = pa.shape[1]
      a[:, row:row + r] = pa
      b[row:row + r, i * width:(i + 1) * width] = pb
      bias[i * width:(i + 1) * width] = pbias
      row += r
  return a, b, bias


def save_peft(directory, trainable, spec: spec_lib.AdapterSpec, base: common.Pretrained, *,
              transformers_version: str | None = None,
              base_model_name_or_path: str | None = None, target: str = "transformers") -> str:
  """Writes LoRA adapters (and a trained head) as a PEFT adapter directory.

  For ``target="timm"`` the adapter applies to timm's VisionTransformer as ``save_timm(base)``
  writes it: a block's adapted query / key / value share timm's packed ``attn.qkv`` (the MAP
  head's key / value its ``attn_pool.kv``), as one LoRA of their ranks summed (A concatenated,
  B block-diagonal, zeros for a part not adapted).

  Args:
    directory: the directory to write (an earlier PEFT export there is replaced).
    trainable: ``{"adapters": ..., "params": ...}`` as a run trains it (``export.load_adapters``
      reads one back); ``params`` may hold the head and nothing else.
    spec: the adapters' spec; kind "lora".
    base: the frozen model the adapters belong to; ``save_hf(base)`` writes the transformers
      model to load them onto (with a head when the adapters or the base have one).
    transformers_version: the version whose module names to write (see the module docstring).
    base_model_name_or_path: recorded in ``adapter_config.json`` (where the base model lives).
    target: "transformers" (the model ``save_hf`` writes) or "timm" (``save_timm``).

  Returns:
    The transformers class (timm: "VisionTransformer") the adapter applies to.

  Raises:
    ValueError: not LoRA, no adapted layer, trained params besides the head, or a layer PEFT
      cannot adapt.
  """
  if spec.kind != "lora":
    raise ValueError(f"PEFT has no {spec.kind!r} adapter; only kind 'lora' exports to PEFT "
                     "(merge the adapters and export the model with save_hf instead)")
  version = _version(transformers_version) if target == "transformers" else None
  trainable = jax.device_get(trainable)
  trained = traverse_util.flatten_dict(trainable.get("params", {}), sep="/")
  extra = sorted({k.rsplit("/", 1)[0] for k in trained} - {"head"})
  if extra:
    raise ValueError(f"trained params {extra} besides the head: a PEFT export carries the LoRA "
                     "factors and the head only (export the merged model with save_hf instead)")
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
  model = {**ARCHITECTURE_DEFAULTS, **base.model}
  has_head = "head" in base.params or bool(trained)
  if target == "timm":
    timm_vit.model_args(model, 1 if has_head else None)  # refuses what timm does not compute
    family, arch = "timm", "VisionTransformer"
  else:
    family, arch = hf_export.target(model, has_head=has_head)
  if family == "clip":  # its module names moved (vision_model. dropped) in an unverified release
    raise ValueError("PEFT adapters for transformers' CLIP classes are not written (their module "
                     "names changed within transformers 5); write them for timm instead "
                     "(target='timm', --peft-target timm)")
  layers = list(transform.adapted_layers(base.params, trainable.get("adapters", {}), spec))
  if not layers:  # PEFT refuses an adapter that targets no module
    raise ValueError("nothing to export as a PEFT adapter: the adapters tree is empty" + (
        " (a trained head alone: export the merged model, save_hf)" if trained else ""))
  modules = {}  # PEFT module -> its ViT layers (packed in timm) and each one's (A, B, bias)
  for layer, _, f in layers:
    if family == "timm":
      name, parts = timm_vit.timm_module(layer.name)
    elif model["swiglu"] and layer.name.startswith(_BLOCK) and MLP in layer.name:
      raise ValueError(f"layer {layer.name}: transformers names a SwiGLU MLP's layers differently "
                       "across versions (weights_in / weights_out; gate_proj, up_proj, down_proj); "
                       "export these adapters for timm (target='timm', --peft-target timm)")
    else:
      name, parts = module_name(layer.name, family, arch, version), (layer.name,)
    a, b = np.asarray(f["A"], np.float32), np.asarray(f["B"], np.float32)
    bias = np.asarray(f["a"], np.float32) @ b if "a" in f else np.zeros(b.shape[1], np.float32)
    bias = bias + (np.asarray(f["b"], np.float32) if "b" in f else 0.0)
    if (scale := _layer_scale(base, layer.path, family)) is not None:
      b, bias = b * scale, bias * scale  # s (x A B + c) = x A (B s) + c s
    modules.setdefault(name, (parts, {}))[1][layer.name] = (a, b, bias)
  packed = {name: _packed(parts, got) for name, (parts, got) in modules.items()}
  ranks = {name: a.shape[1] for name, (a, _, _) in packed.items()}
  rank = max(ranks.values(), default=spec.rank)
  tensors, targets, with_bias = {}, [], any("a" in f or "b" in f for _, _, f in layers)
  for name, (a, b, bias) in packed.items():
    down = ranks[name] / rank  # PEFT scales a module by lora_alpha / its own rank
    key = _PEFT_PREFIX + name
    tensors[key + ".lora_A.weight"] = a.T
    tensors[key + ".lora_B.weight"] = (b * down).T
    if with_bias:
      tensors[key + ".lora_B.bias"] = bias * down
    targets.append(name)
  if trained:
    head = {**{k.split("/")[-1]: np.asarray(v) for k, v in
               traverse_util.flatten_dict(base.params.get("head", {}), sep="/").items()},
            **{k.split("/")[-1]: np.asarray(v) for k, v in trained.items()}}
    if "head" in [layer.name for layer, _, _ in layers]:
      raise ValueError("the head is both LoRA-adapted and trained; PEFT keeps one or the other")
    head_module = "head" if family == "timm" else "classifier"
    tensors[f"{_PEFT_PREFIX}{head_module}.weight"] = head["kernel"].T
    tensors[f"{_PEFT_PREFIX}{head_module}.bias"] = head["bias"]
  config = dict(
      peft_type="LORA", task_type=None, base_model_name_or_path=base_model_name_or_path,
      r=int(rank), lora_alpha=float(spec.scaling * rank), lora_dropout=float(spec.dropout),
      target_modules=targets, bias="none", lora_bias=with_bias, use_rslora=False,
      use_dora=False, fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
      modules_to_save=[head_module] if trained else None, alpha_pattern={},
      rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank})
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}

  def write(tmp: pathlib.Path) -> None:
    save_file(tensors, str(tmp / FILES[1]), metadata={"format": "pt"})
    (tmp / FILES[0]).write_text(json.dumps(config, indent=2) + "\n")

  hf_export.write_dir(directory, FILES, write)
  return arch


def _vit_module(module: str, key: str) -> str:
  """A transformers module name of any naming -> the ViT's module path."""
  module = hf._PREFIX.sub("", module)
  m = _BLOCK_KEY.fullmatch(module)
  if m and m[2] in _BLOCK_ALIASES:
    return f"{_BLOCK}{m[1]}/{_BLOCK_ALIASES[m[2]]}"
  if module in hf._TOP:
    return hf._TOP[module]
  raise ValueError(f"PEFT tensor {key}: module {module!r} is not a ViT / DINOv2 / SigLIP layer "
                   "hydra_jax knows")


def _timm_named(module: str) -> bool:
  """Whether a LoRA module name is timm's VisionTransformer's (transformers' never are)."""
  return module == "head" or module.startswith(("blocks.", "attn_pool.", "patch_embed."))


def _unpacked(parts: dict) -> dict:
  """The layers of one packed PEFT module, each keeping only the rank columns its B uses.

  A ``save_peft`` export's A holds each layer's columns side by side (B block-diagonal): this
  gives them back. A part whose B rows and bias are all zero is not adapted; where every part is
  zero (a LoRA not yet trained), all are kept whole, as PEFT adapts all of them.
  """
  used = {p: np.any(f["B"] != 0, axis=1) for p, f in parts.items()}
  if not any(u.any() for u in used.values()):
    return parts
  out = {}
  for path, f in parts.items():
    if used[path].any():
      out[path] = dict(f, A=f["A"][:, used[path]], B=f["B"][used[path]])
    elif np.any(f.get("b", 0)):  # a bias alone: kept with its full (unused) rank
      out[path] = f
  return out


def _vit_paths(module: str, key: str, family: str | None) -> tuple[str, ...]:
  """A PEFT module -> the ViT layers it holds (several where timm packs q/k/v)."""
  if family != "timm":
    return (_vit_module(module, key),)
  try:
    return timm_vit.vit_layers(module)
  except ValueError as e:
    raise ValueError(f"PEFT tensor {key}: {e}") from None


def _naming_family(modules: list[str]) -> str | None:
  """The family ("timm" or a transformers one) whose module names ``modules`` use, where the
  names tell."""
  if any(_timm_named(m) for m in modules):
    return "timm"
  for module in modules:
    if module.startswith(("dinov2.", "dinov2_with_registers.")) or re.search(
        r"(^|\.)encoder\.layer\.\d+\.(mlp\.fc|attention\.[qkvo]_proj)", module):
      return "dinov2"
    if module.startswith("vit.") or re.search(
        r"(^|\.)(layers\.\d+\.attention\.|encoder\.layer\.\d+\.(intermediate|output)\.)",
        module):
      return "vit"
    if ".self_attn." in module:
      return "siglip"
  return None


# What hydra_jax's LoRA does not compute: field -> the only value accepted (None: unset / false).
_REFUSED = {"peft_type": "LORA", "use_dora": None, "bias": "none", "fan_in_fan_out": None,
            "alpha_pattern": None, "use_bdlora": None, "use_qalora": None, "velora_config": None,
            "kasa_config": None, "monteclora_config": None, "arrow_config": None,
            "trainable_token_indices": None, "layer_replication": None}
# initialisations that rewrite the base weights (PEFT re-runs them on load)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _read_config(path: pathlib.Path) -> dict:
  """adapter_config.json, refusing what hydra_jax's LoRA does not compute."""
  config = json.loads(path.read_text())
  for field, want in _REFUSED.items():
    got = config.get(field)
    if (got != want) if want is not None else bool(got):
      raise ValueError(f"{path}: {field}={got!r} is not supported; hydra_jax's LoRA reads "
                       f"{field}={want if want is not None else 'unset'}")
  if float(config.get("lora_alpha", 8)) == 0:  # every layer's update scaled to zero
    raise ValueError(f"{path}: lora_alpha=0 scales every update to zero: the adapter computes "
                     "the base model (load the base alone)")
  init = config.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
    raise ValueError(f"{path}: init_lora_weights={init!r} rewrites the base weights when PEFT "
                     "loads the adapter, which hydra_jax's base does not have; convert it to "
                     "plain LoRA first (peft's save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...))")
  return config


def _saved_module(name: str, key: str, value: np.ndarray, heads: int,
                  family: str | None) -> list[tuple[str, np.ndarray]]:
  """A ``modules_to_save`` tensor -> ViT (path, array) pairs (the checkpoint loader's names, else
  the running model's)."""
  if family == "timm":
    pairs = timm_vit.rename(name, value, heads)
    if pairs == [(name, value)]:
      raise ValueError(f"PEFT tensor {key} is not a param of timm's VisionTransformer that "
                       "hydra_jax knows")
    return pairs
  pairs = hf.rename_key(name, value, heads)
  if not (len(pairs) == 1 and pairs[0][0] == hf._PREFIX.sub("", name)):  # the loader knew it
    return pairs
  module, _, leaf = name.rpartition(".")
  if leaf not in ("weight", "bias"):
    raise ValueError(f"PEFT tensor {key} is neither a LoRA factor (lora_A / lora_B) nor a weight "
                     "or bias of a saved module; hydra_jax reads LoRA adapters only")
  return [hf.to_flax(_vit_module(module, key), leaf, value, heads)]


def load_peft(directory, base: common.Pretrained) -> tuple[dict, spec_lib.AdapterSpec]:
  """A PEFT LoRA adapter directory -> (trainable ``{"adapters", "params"}``, AdapterSpec).

  Args:
    directory: holding ``adapter_config.json`` and ``adapter_model.safetensors`` (any module
      naming; float32, bfloat16 or float16 tensors).
    base: the model the adapter belongs to (e.g. ``checkpoints.load`` of the same transformers
      directory, with ``num_classes`` when the adapter saves a classifier; or the hydra_jax base
      ``save_peft`` exported it from: a LayerScale it folded into lora_B comes back out).

  Returns:
    The factors (per layer ``A``, ``B``, and ``b`` with ``lora_bias``) and any saved modules as
    params; the spec targets exactly the adapted layers. Per-layer ranks (``rank_pattern``) and
    rsLoRA's ``alpha / sqrt(r)`` are folded into B so that one spec computes every layer.

  Raises:
    FileNotFoundError: not a PEFT adapter directory.
    ValueError: a PEFT option, tensor or module hydra_jax does not compute, or shapes that do
      not fit ``base`` (naming the layer).
  """
  root = pathlib.Path(directory).expanduser()
  if not all((root / name).is_file() for name in FILES):
    raise FileNotFoundError(f"{root} is not a PEFT adapter directory; expected {list(FILES)}")
  config = _read_config(root / FILES[0])
  rank, rslora = int(config["r"]), bool(config.get("use_rslora", False))
  alpha = float(config.get("lora_alpha", 8)) * (math.sqrt(rank) if rslora else 1.0)
  spec_scaling = alpha / rank
  heads = {**ARCHITECTURE_DEFAULTS, **base.model}["num_heads"]
  lora, saved, text = {}, {}, set()
  for key, value in hf.read_tensors(root / FILES[1]).items():
    name = key.removeprefix(_PEFT_PREFIX)
    if name.startswith(hf._TEXT_TOWER):  # a two-tower model's (CLIP, SigLIP): not the ViT
      text.add(name)
      continue
    m = _LORA_KEY.fullmatch(name)
    if m and (m[3] == "weight" or m[2] == "B"):  # lora_bias: the bias after B is b
      lora.setdefault(m[1], {})["b" if m[3] == "bias" else m[2]] = (key, value)
    else:
      saved[name] = (key, value)
  if text:
    logging.warning("PEFT adapter %s: %d tensors of the text tower left out (%s, ...): the ViT "
                    "is the image tower", root, len(text), sorted(text)[0])
  if not lora:
    raise ValueError(f"PEFT adapter {root} holds no lora_A / lora_B weights"
                     + (" on the image tower" if text else ""))
  family = _naming_family(list(lora))
  why = {"embedding": "the patch embedding is a convolution",  # (transformers' modules)
         MAP + ATT + "out": "torch's MultiheadAttention reads out_proj.weight without running "
                            "the LoRA (PEFT computes the base model there)"}
  factors = {}
  for module, tensors in lora.items():
    key = next(iter(tensors.values()))[0]
    packed = _vit_paths(module, key, family)
    if family != "timm" and packed[0] in why:
      raise ValueError(f"PEFT tensor {key}: LoRA on {packed[0]} is not supported: "
                       f"{why[packed[0]]}")
    rank_m = tensors["A"][1].shape[0] if "A" in tensors else None  # PEFT scales by alpha / it
    parts = {path: {"r": rank_m} for path in packed}
    for leaf, (key, value) in tensors.items():  # B and b split along the packed outputs
      if leaf != "A" and value.shape[0] % len(packed):
        raise ValueError(f"PEFT tensor {key}: {value.shape[0]} outputs do not split into the "
                         f"{len(packed)} layers timm packs in {module}")
      split = [value] * len(packed) if leaf == "A" else np.split(value, len(packed))
      for path, part in zip(packed, split, strict=True):
        parts[path][leaf] = np.array(part if leaf == "b" else part.T)  # each its own copy
    if len(packed) > 1 and "A" in tensors and "B" in tensors:
      parts = _unpacked(parts)
    factors.update(parts)
  params = {}
  for name, (key, value) in saved.items():
    params.update(_saved_module(name, key, value, heads, family))
  if family is None:  # names both ViTModel and Dinov2Model use (no "vit." / "dinov2." prefix:
    # a headless class, whatever head the base has now): the family the base exports to so
    model = {**ARCHITECTURE_DEFAULTS, **base.model}
    family = hf_export.target(model, has_head=False)[0]
  adapters = {}
  for path, f in factors.items():
    r = f.pop("r")
    if set(f) - {"b"} != {"A", "B"}:
      raise ValueError(f"PEFT adapter {root}: layer {path} has {sorted(f)}; expected lora_A "
                       "and lora_B weights")
    layer_scaling = float(config.get("lora_alpha", 8)) / (math.sqrt(r) if rslora else r)
    up = np.full(f["B"].shape[-1], layer_scaling / spec_scaling, np.float32)
    if (scale := _layer_scale(base, tuple(path.split("/")), family)) is not None:
      up = up / scale  # the adapter was written for the layer with LayerScale folded in
    f["B"] = f["B"] * up
    if "b" in f:
      f["b"] = f["b"] * up
    transform.set_path(adapters, tuple(path.split("/")), f)
  spec = spec_lib.AdapterSpec(
      kind="lora", targets=tuple(re.escape(p) for p in sorted(factors)), rank=rank,
      alpha=alpha, bias=bool(config.get("lora_bias", False)),
      dropout=float(config.get("lora_dropout", 0.0)))
  list(transform.adapted_layers(base.params, adapters, spec))  # shapes checked, layer named
  flat_base = traverse_util.flatten_dict(base.params, sep="/")
  for path, array in params.items():
    want = flat_base.get(path)
    if want is None or np.shape(want) != array.shape:
      raise ValueError(f"PEFT adapter {root}: saved module param {path} {array.shape} does not "
                       f"fit the base ({'absent' if want is None else np.shape(want)})"
                       + ("; load the base with the adapter's num_classes" if path.startswith(
                           "head/") else ""))
  return {"adapters": adapters, "params": traverse_util.unflatten_dict(params, sep="/")}, spec
