"""Weight-space analysis of each adapted layer: every branch's dW, its norm, spectrum, alignment.

Each branch's weight change is read off the adapter math itself (``kinds.outputs`` in weight
space, factor biases left out), so it is the dW the merge adds:

- hydra:      ``parallel`` dW_par = s A_p B_p, ``sequential`` dW_seq = s W A_s B_s;
- sequential: ``sequential`` only;  lora: ``lora`` dW = alpha/r A B;
- hydralora:  ``head_i`` dW_i = alpha/r A B_i, unrouted (the router weights each token's use).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from hydra_jax.adapters import kinds, transform
from hydra_jax.adapters.spec import AdapterSpec
from hydra_jax.analysis import metrics

_BLOCK = re.compile(r"encoderblock_(\d+)")
_RTOL = 1e-5  # singular values below this fraction of s_1 are round-off of float32 factors
_SHORT = {"MultiHeadDotProductAttention_0": "attn", "MlpBlock_0": "mlp"}


def layer_info(name: str) -> tuple[int | None, str]:
  """(block index or None, short layer type) of a '/'-path, e.g. (3, "mlp/Dense_1")."""
  parts = name.split("/")
  block = next((int(m.group(1)) for p in parts if (m := _BLOCK.fullmatch(p))), None)
  if block is None:
    return None, name
  rest = parts[[i for i, p in enumerate(parts) if _BLOCK.fullmatch(p)][0] + 1:]
  return block, "/".join(_SHORT.get(p, p) for p in rest)


def branch_deltas(f: Mapping, w, spec: AdapterSpec) -> dict[str, np.ndarray]:
  """Each branch's weight change of one layer.

  Args:
    f: the layer's factor dict.
    w: (d_in, d_out) frozen kernel (flattened).
    spec: the adapter spec.

  Returns:
    {branch name: dW (d_in, d_out) float64}.
  """
  routing = jnp.ones(f["B"].shape[0]) if spec.kind == "hydralora" else None
  out, _ = kinds.outputs(f, None, jnp.asarray(w, jnp.float32), spec, affine=False,
                         routing=routing)
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def flat_kernels(params: Mapping, adapters: Mapping):
  """Yields (layer '/'-name, (d_in, d_out) frozen kernel, factor dict) per adapted layer."""
  for path, f in transform.factor_dicts(adapters):
    module = transform.get_path(params, path)
    layer = transform.layer_of(path, module)
    yield layer.name, np.asarray(module["kernel"], np.float64).reshape(layer.d_in, layer.d_out), f


def _spectrum(dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(singular values, orthonormal basis of the column space), round-off directions dropped."""
  u, s, _ = np.linalg.svd(dw, full_matrices=False)
  keep = s > _RTOL * s[0] if s.size and s[0] > 0 else np.zeros(s.shape, bool)
  return s[keep], u[:, keep]


def _alignment(dw, cols, u_k, v_k, w_left: np.ndarray) -> dict[str, float]:
  """Energy of dW in W's top-k input / output subspaces and the principal angles (input side)."""
  angles = metrics.principal_angles(cols, u_k) if cols.shape[1] else np.array([np.nan])
  return {
      "energy_left": metrics.subspace_energy(dw, u_k, side="left"),
      "energy_right": metrics.subspace_energy(dw, v_k, side="right"),
      "energy_range_w": metrics.subspace_energy(dw, w_left, side="left"),
      "angle_min": float(np.min(angles)),
      "angle_mean": float(np.mean(angles)),
  }


def analyze_layer(name: str, w, f: Mapping, spec: AdapterSpec, *, top_fraction: float) -> dict:
  """Norms, spectra and alignment of every branch of one layer.

  Args:
    name: the layer's '/'-path.
    w: (d_in, d_out) frozen kernel.
    f: its factor dict.
    spec: the adapter spec.
    top_fraction: W's "top" singular subspaces keep this fraction of min(d_in, d_out) directions.

  Returns:
    {"name", "block", "type", "d_in", "d_out", "k", "baseline_left" (k/d_in),
    "baseline_right" (k/d_out), "w_energy" (W's own share of energy in its top k: what
    dW = W M scores for an isotropic random M), "w_norm", "rank_w", "branches": {branch: {"norm",
    "singular_values", "effective_rank", "energy_left", "energy_right", "energy_range_w",
    "angle_min", "angle_mean"}}}.
  """
  w = np.asarray(w, np.float64)
  k = metrics.top_k(top_fraction, w.shape)
  u_all, v_all, s_w = metrics.singular_bases(w, min(w.shape))
  u_k, v_k = u_all[:, :k], v_all[:, :k]
  w_left = u_all[:, s_w > _RTOL * s_w[0]]  # range(W), the input side
  block, kind = layer_info(name)
  out = {"name": name, "block": block, "type": kind, "d_in": w.shape[0], "d_out": w.shape[1],
         "k": k, "baseline_left": k / w.shape[0], "baseline_right": k / w.shape[1],
         "w_energy": float(np.sum(s_w[:k] ** 2) / np.sum(s_w ** 2)),
         "w_norm": metrics.frobenius(w), "rank_w": w_left.shape[1], "branches": {}}
  for branch, dw in branch_deltas(f, w, spec).items():
    s, cols = _spectrum(dw)
    out["branches"][branch] = {"norm": metrics.frobenius(dw), "singular_values": s.tolist(),
                               "effective_rank": metrics.effective_rank(s),
                               **_alignment(dw, cols, u_k, v_k, w_left)}
  return out


def head_similarity(f: Mapping) -> np.ndarray:
  """HydraLoRA: (N, N) cosine between the heads' flattened dW_i = A B_i (the scale cancels)."""
  a, b = np.asarray(f["A"], np.float64), np.asarray(f["B"], np.float64)
  flat = np.stack([(a @ b_i).ravel() for b_i in b])
  norms = np.maximum(np.linalg.norm(flat, axis=1), 1e-30)
  return (flat @ flat.T) / np.outer(norms, norms)


def analyze_weights(params: Mapping, adapters: Mapping, spec: AdapterSpec, *,
                    top_fraction: float = 0.1) -> list[dict[str, Any]]:
  """``analyze_layer`` for every adapted layer (plus "head_similarity" for HydraLoRA)."""
  layers = []
  for name, w, f in flat_kernels(params, adapters):
    row = analyze_layer(name, w, f, spec, top_fraction=top_fraction)
    if spec.kind == "hydralora":
      row["head_similarity"] = head_similarity(f).tolist()
    layers.append(row)
  # block order, attention before MLP as in the forward pass
  return sorted(layers, key=lambda r: (r["block"] is None, r["block"] or 0,
                                       not r["type"].startswith("attn"), r["name"]))
