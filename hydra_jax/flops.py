"""Matmul FLOPs of a ViT training step, counted from the shapes.

XLA's ``cost_analysis`` does not count cuBLAS / cuDNN custom calls on GPU, so the bench counts
the algorithmic minimum itself: every matmul of the forward pass, the data gradients from the
loss down to the lowest layer that trains (attention's backward is twice its forward; no flash
recompute), and a full weight gradient for every kernel that gets one (trained kernels, and the
adapted kernels when the adapters are merged into the weights each step). Element-wise work is
not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hydra_jax.models import ViT

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")


def _matmuls(model: ViT, image_size: int) -> list[tuple[str, float]]:
  """(module path, forward FLOPs per image) of every matmul; attention under ".../attention"."""
  grid = image_size // model.patch_size
  n, d, m = grid * grid, model.width, model.mlp_dim
  t = n + int(model.class_token) + model.num_registers
  out = [("embedding", 2.0 * n * model.patch_size**2 * 3 * d)]
  for i in range(model.depth):
    b = f"Transformer/encoderblock_{i}/"
    att = b + "MultiHeadDotProductAttention_0/"
    out += [(att + name, 2.0 * t * d * d) for name in ("query", "key", "value", "out")]
    out += [(att + "attention", 4.0 * t * t * d),
            (b + "MlpBlock_0/Dense_0", 2.0 * t * d * m * (2 if model.swiglu else 1)),  # gate too
            (b + "MlpBlock_0/Dense_1", 2.0 * t * m * d)]
  if model.pool == "map":  # one probe token attends to all t tokens, then the head's MLP
    att = "MAPHead_0/MultiHeadDotProductAttention_0/"
    out += [(att + "query", 2.0 * d * d), (att + "key", 2.0 * t * d * d),
            (att + "value", 2.0 * t * d * d), (att + "attention", 4.0 * t * d),
            (att + "out", 2.0 * d * d), ("MAPHead_0/MlpBlock_0/Dense_0", 2.0 * d * m),
            ("MAPHead_0/MlpBlock_0/Dense_1", 2.0 * m * d)]
  features = d * (2 if model.pool == "tok+gap" else 1)
  if model.representation_size:
    out.append(("pre_logits", 2.0 * features * model.representation_size))
    features = model.representation_size
  if model.num_classes:
    out.append(("head", 2.0 * features * model.num_classes))
  return out


_ORDER = {"query": 0, "key": 0, "value": 0, "attention": 1, "out": 2, "Dense_0": 3, "Dense_1": 4,
          "pre_logits": 5, "head": 6}


def _level(path: str, depth: int) -> int:
  """Position in the forward pass: embedding, each block's matmuls, the MAP head's, pre_logits,
  the head."""
  if path == "embedding":
    return -1
  hit = _BLOCK.match(path)
  block = int(hit.group(1)) if hit else depth  # after the blocks: MAPHead_0, pre_logits, head
  return 10 * block + _ORDER[path.rsplit("/", 1)[-1]]


def train_step_flops(model: ViT, image_size: int, weight_grads: Iterable[str],
                     adapted: Iterable[str] = ()) -> float:
  """FLOPs per image of one training step.

  Args:
    model: the ViT as trained.
    image_size: square input resolution in pixels.
    weight_grads: module paths ("head", "Transformer/encoderblock_3/MlpBlock_0/Dense_1", ...)
      whose kernel gets a full weight gradient.
    adapted: module paths with trained low-rank factors but no full weight gradient (the
      activation-level path); their factors' own FLOPs are negligible and not counted.
    Data gradients flow from the loss down to the lowest module of either kind.
  """
  mods = _matmuls(model, image_size)
  grads, adapted = set(weight_grads), set(adapted)
  unknown = (grads | adapted) - {p for p, _ in mods}
  if unknown:
    raise ValueError(f"weight_grads / adapted name no matmul of the model: {sorted(unknown)}")
  lowest = min((_level(p, model.depth) for p in grads | adapted), default=10 * model.depth + 10)
  total = 0.0
  for path, fwd in mods:
    total += fwd
    if _level(path, model.depth) > lowest:  # a trained matmul lies below: gradient of the input
      total += 2 * fwd if path.endswith("/attention") else fwd
    if path in grads:
      total += fwd
  return total
