"""Writes hydra_jax/checkpoints/timm_architectures.json from the installed timm's registry.

A timm checkpoint's tensors do not record the head count, the GELU variant, the LayerNorm eps or
the pooling; timm takes them from the architecture's name. This lists, for every registered
architecture whose model hydra_jax's ViT computes exactly (timm's VisionTransformer with plain
blocks, a learned position embedding, an MLP with exact, tanh or quick (CLIP's) GELU or timm's
SwiGLUPacked, one final LayerNorm before or after the pooling, a LayerNorm or nothing before the
blocks, no q/k norm or patch-embedding norm), the fields the loader cannot read off the tensors.
Each model is built on torch's meta device (no
memory, no weights): about six minutes for timm 1.0.

  pip install --no-deps timm && python scripts/timm_architectures.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from timm_import import import_timm  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "hydra_jax/checkpoints/timm_architectures.json"


def _identity(module) -> bool:
  return module is None or isinstance(module, nn.Identity)


def describe(model, timm) -> dict | None:
  """The loader's fields of a timm model, or None when hydra_jax's ViT cannot compute it."""
  from timm.layers import AttentionPoolLatent, GELUTanh, GluMlp, Mlp, PatchEmbed, QuickGELU
  from timm.models.vision_transformer import Attention, Block, VisionTransformer

  if type(model) is not VisionTransformer or type(model.patch_embed) is not PatchEmbed:
    return None
  if model.pos_embed is None or not _identity(model.patch_embed.norm):
    return None
  if not (_identity(model.norm_pre) or isinstance(model.norm_pre, nn.LayerNorm)):
    return None
  if _identity(model.norm) == _identity(model.fc_norm):
    return None  # one final norm, on the tokens (norm) or on the pooled features (fc_norm)
  block = model.blocks[0]
  if type(block) is not Block or type(block.attn) is not Attention:
    return None
  mlp = block.mlp
  swiglu = (type(mlp) is GluMlp and type(mlp.act) is nn.SiLU and not mlp.gate_last
            and mlp.chunk_dim == -1)  # timm's SwiGLUPacked
  if type(mlp) is not Mlp and not swiglu:
    return None
  if not all(_identity(m) for m in (block.attn.q_norm, block.attn.k_norm, block.attn.norm,
                                    mlp.norm)):
    return None
  act = type(mlp.act)
  if swiglu:
    gelu = "exact"  # unused: hydra_jax's MAP head would be GELU, but a SwiGLU model has none here
  elif act is GELUTanh or (act is nn.GELU and mlp.act.approximate == "tanh"):
    gelu = "tanh"
  elif act is nn.GELU and mlp.act.approximate == "none":
    gelu = "exact"
  elif act is QuickGELU:
    gelu = "quick"
  else:
    return None
  final = model.fc_norm if _identity(model.norm) else model.norm
  norms = (block.norm1, block.norm2, final,
           *([] if _identity(model.norm_pre) else [model.norm_pre]))
  if not all(isinstance(n, nn.LayerNorm) and n.eps == block.norm1.eps for n in norms):
    return None  # timm's LayerNorm subclasses nn.LayerNorm (same function); the ViT has one eps
  pool = model.global_pool
  # hydra_jax's "map" reads the class token and registers, its "gap" leaves them out
  if model.num_prefix_tokens and model.attn_pool is not None and not model.pool_include_prefix:
    return None
  if model.num_prefix_tokens and pool == "avg" and model.pool_include_prefix:
    return None
  if model.attn_pool is not None:
    head = model.attn_pool
    if (type(head) is not AttentionPoolLatent or head.pos_embed is not None or head.latent_len != 1
        or head.mlp is None or not _identity(head.q_norm) or _identity(head.q)):
      return None
  elif pool not in ("token", "avg", ""):
    return None
  if swiglu and model.attn_pool is not None:
    return None  # timm's MAP head MLP would be SiLU, hydra_jax's is GELU
  row = dict(num_heads=block.attn.num_heads, gelu=gelu, ln_eps=block.norm1.eps,
             global_pool=pool, pool_include_prefix=bool(model.pool_include_prefix),
             no_embed_class=bool(model.no_embed_class))
  return dict(row, mlp="swiglu") if swiglu else row


def main() -> None:
  timm = import_timm()
  table = {}
  for name in timm.list_models():
    try:
      with torch.device("meta"):
        model = timm.create_model(name)
    except Exception as e:  # a few entrypoints need extra packages or arguments
      print(f"skipped {name}: {type(e).__name__}: {e}", file=sys.stderr)
      continue
    if (row := describe(model, timm)) is not None:
      table[name] = row
  OUT.write_text(json.dumps({"timm": timm.__version__, "architectures": table}, indent=0,
                            sort_keys=True) + "\n")
  print(f"{len(table)} architectures from timm {timm.__version__} -> {OUT}")


if __name__ == "__main__":
  main()
