"""Data-dependent analysis: branch outputs, their similarity, routing, and branch ablations.

Every number comes from the activation-level path with ``record=True``: each adapted layer's
branch outputs (the ``s f(.)`` terms added to the frozen output, factor biases included) per
token. Padding rows of the evaluation batches (mask False) are left out of every sum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import adapters as adapters_lib
from hydra_jax import train_lib
from hydra_jax.adapters import transform
from hydra_jax.adapters.spec import AdapterSpec
from hydra_jax.analysis import metrics

Batch = dict[str, np.ndarray]
PAIR = ("parallel", "sequential")


def _pair_stats(x: jax.Array, y: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
  """Weighted (w in {0, 1}) cosine sum and batch-centred moments of token rows (n, d)."""
  n = w.sum()
  cos = jnp.sum(x * y, -1) / jnp.maximum(jnp.linalg.norm(x, axis=-1)
                                         * jnp.linalg.norm(y, axis=-1), 1e-12)
  mx = (w[:, None] * x).sum(0) / jnp.maximum(n, 1.0)
  my = (w[:, None] * y).sum(0) / jnp.maximum(n, 1.0)
  xc, yc = (x - mx) * w[:, None], (y - my) * w[:, None]
  return {"cos_sum": jnp.sum(cos * w), "n": n, "mean_x": mx, "mean_y": my,
          "cxx": xc.T @ xc, "cyy": yc.T @ yc, "cxy": xc.T @ yc}


def batch_stats(model, spec: AdapterSpec, d_out: Mapping[str, int], params, adapters,
                images: jax.Array, mask: jax.Array) -> dict[str, Any]:
  """Per-layer sums over one batch (jit it with ``model``, ``spec``, ``d_out`` bound).

  Args:
    model: the ViT.
    spec: the adapter spec.
    d_out: {layer name: flattened output size}.
    params: full params (frozen + trained head).
    adapters: the adapters tree.
    images: (B, H, W, 3) normalised images.
    mask: (B,) bool, False for padding rows.

  Returns:
    {layer: {"tokens": scalar, "norm_sum": {branch: scalar}, "pair": moments (Hydra),
    "routing": (B, N) per-image mean routing weights (after top_k), "entropy": (B,) mean token
    entropy of the router's probabilities}}.
  """
  _, aux = adapters_lib.apply_intercepted(model, params, adapters, spec, images, record=True)
  m = mask.astype(jnp.float32)
  out = {}
  for name, branches in aux["branches"].items():
    flat = {b: v.astype(jnp.float32).reshape(v.shape[0], -1, d_out[name])
            for b, v in branches.items()}
    tokens = next(iter(flat.values())).shape[1]
    w = jnp.repeat(m, tokens)  # (B * T,)
    s = {"tokens": w.sum(),
         "norm_sum": {b: jnp.sum(jnp.linalg.norm(v, axis=-1).ravel() * w) for b, v in flat.items()}}
    if all(b in flat for b in PAIR):
      x, y = (flat[b].reshape(-1, d_out[name]) for b in PAIR)
      s["pair"] = _pair_stats(x, y, w)
    if name in aux["routing"]:
      r, p = (aux[k][name].astype(jnp.float32) for k in ("routing", "router_probs"))
      r, p = (x.reshape(x.shape[0], -1, x.shape[-1]) for x in (r, p))
      s["routing"] = r.mean(1)  # the weights applied (after top_k)
      s["entropy"] = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), -1).mean(1)  # the router's
    out[name] = s
  return out


def _moments(p: Mapping) -> metrics.Moments:
  f = lambda k: np.asarray(p[k], np.float64)
  return metrics.Moments(float(p["n"]), f("mean_x"), f("mean_y"), f("cxx"), f("cyy"), f("cxy"))


def output_stats(model, params, adapters, spec: AdapterSpec,
                 batches: Iterable[Batch]) -> dict[str, dict[str, Any]]:
  """Branch-output statistics of every adapted layer over ``batches``.

  Returns:
    {layer: {"output_norm": {branch: mean over tokens of ||branch output||_2},
    and for Hydra "cosine" (mean per-token cosine of parallel vs sequential output), "cka"
    (linear CKA of the two (tokens, d_out) outputs), "cosine_of_means" (cosine of the two
    branches' mean outputs: their constant parts, e.g. factor biases); for HydraLoRA
    "routing" (M, N) per-image mean weights, "entropy" (M,), "labels" (M,)}}.
  """
  d_out = {transform.layer_of(p, transform.get_path(params, p)).name:
           transform.layer_of(p, transform.get_path(params, p)).d_out
           for p, _ in transform.factor_dicts(adapters)}
  step = jax.jit(functools.partial(batch_stats, model, spec, d_out))
  acc: dict[str, dict[str, Any]] = {}
  for batch in batches:
    stats = jax.device_get(step(params, adapters, batch["image"], batch["mask"]))
    keep = np.asarray(batch["mask"], bool)
    for name, s in stats.items():
      a = acc.setdefault(name, {"tokens": 0.0, "norm_sum": {}, "routing": [], "entropy": [],
                                "labels": [], "cos_sum": 0.0, "moments": None})
      a["tokens"] += float(s["tokens"])
      for b, v in s["norm_sum"].items():
        a["norm_sum"][b] = a["norm_sum"].get(b, 0.0) + float(v)
      if "pair" in s:
        a["cos_sum"] += float(s["pair"]["cos_sum"])
        mom = _moments(s["pair"])
        a["moments"] = mom if a["moments"] is None else a["moments"].merge(mom)
      if "routing" in s:
        a["routing"].append(s["routing"][keep])
        a["entropy"].append(s["entropy"][keep])
        a["labels"].append(np.asarray(batch["label"])[keep])
  return {name: _finish(a) for name, a in acc.items()}


def _finish(a: Mapping) -> dict[str, Any]:
  n = max(a["tokens"], 1.0)
  out: dict[str, Any] = {"output_norm": {b: v / n for b, v in a["norm_sum"].items()}}
  if a["moments"] is not None:
    out["cosine"] = a["cos_sum"] / n
    out["cka"] = a["moments"].cka()
    mom = a["moments"]
    out["cosine_of_means"] = float(metrics.cosine_per_row(mom.mean_x[None], mom.mean_y[None])[0])
  if a["routing"]:
    out["routing"] = np.concatenate(a["routing"])
    out["entropy"] = np.concatenate(a["entropy"])
    out["labels"] = np.concatenate(a["labels"])
  return out


def router_usage(routing: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean weight per head (N,), mean weight per head per true class (C, N); NaN rows if absent)."""
  per_class = np.full((num_classes, routing.shape[1]), np.nan)
  for c in range(num_classes):
    if np.any(labels == c):
      per_class[c] = routing[labels == c].mean(0)
  return routing.mean(0), per_class


def heads_by_usage(adapters: Mapping, stats: Mapping[str, Mapping]) -> tuple[dict, dict,
                                                                             dict[str, list]]:
  """HydraLoRA with each layer's heads renumbered by mean routing weight, most used first.

  A layer's head numbers are arbitrary (permuting its B_i, b_i and router columns together gives
  the same model), so head i of one layer has nothing to do with head i of another; by rank they
  compare: "head_0 off" in every layer switches off each layer's most used head.

  Args:
    adapters: HydraLoRA adapters.
    stats: ``output_stats`` of them ("routing" (M, N) per layer).
  Returns:
    (adapters, stats with "routing" columns and "output_norm" heads in the new order, {layer:
    the old head numbers in the new order}).
  """
  order = {name: np.argsort(-s["routing"].mean(0), kind="stable") for name, s in stats.items()}
  out: dict = {}
  for path, f in transform.factor_dicts(adapters):
    o = order["/".join(path)]
    f = {k: (v[:, o] if k == "router" else v[o] if k in ("B", "b") else v) for k, v in f.items()}
    transform.set_path(out, path, f)
  stats = {name: {**s, "routing": s["routing"][:, order[name]],
                  "output_norm": {f"head_{j}": s["output_norm"][f"head_{i}"]
                                  for j, i in enumerate(order[name])}}
           for name, s in stats.items()}
  return out, stats, {name: o.tolist() for name, o in order.items()}


def _zero_keys(spec: AdapterSpec, branch: str) -> tuple[tuple[str, ...], int | None]:
  """(factor names to zero, head index or None) that switch ``branch`` off exactly."""
  if spec.kind in ("hydra", "sequential") and branch in PAIR:
    tag = "_p" if branch == "parallel" else "_s"
    return ("B" + tag, "b" + tag), None
  if spec.kind == "lora" and branch == "lora":
    return ("B", "b"), None
  if spec.kind == "hydralora" and branch.startswith("head_"):
    return ("B", "b"), int(branch[len("head_"):])
  raise ValueError(f"branch {branch!r} is not a branch of adapter kind {spec.kind!r}")


def ablate(adapters: Mapping, spec: AdapterSpec, branch: str,
           select: Callable[[str], bool] = lambda name: True) -> dict:
  """A copy of ``adapters`` with ``branch`` switched off in the layers ``select``(name) picks.

  Zeroing the branch's up-projection (and its output bias) removes exactly its contribution:
  ``s ((z A + a) B + b)`` with B = 0 and b = 0 is 0, whatever A, a and z.
  """
  keys, head = _zero_keys(spec, branch)
  out: dict = {}
  for path, f in transform.factor_dicts(adapters):
    f = dict(f)
    if select("/".join(path)):
      for k in keys:
        if k in f:
          f[k] = jnp.asarray(f[k]).at[head].set(0) if head is not None else jnp.zeros_like(f[k])
    transform.set_path(out, path, f)
  return out


def ablation_plans(names: Sequence[str], spec: AdapterSpec, branches: Sequence[str],
                   depth: int, layer_info: Callable) -> list[tuple[str, str, str, frozenset]]:
  """The ablations to run: per branch, all layers, each layer type, early / late half of depth.

  Args:
    names: adapted layer '/'-names.
    spec: the adapter spec.
    branches: branch names (HydraLoRA heads get the all-layers ablation only).
    A set of layers two groups share is ablated once, under the first group's name.
    depth: number of transformer blocks.
    layer_info: name -> (block index or None, layer type).

  Returns:
    [(branch, group, description, frozenset of the layer names switched off)].
  """
  groups = [("all", frozenset(names))]
  if spec.kind != "hydralora":
    for kind in sorted({layer_info(n)[1] for n in names}):
      groups.append((kind, frozenset(n for n in names if layer_info(n)[1] == kind)))
    half = depth // 2
    block = {n: layer_info(n)[0] for n in names}  # None: outside the blocks (MAP head, head)
    groups += [(_blocks(0, half - 1), frozenset(n for n, b in block.items()
                                                if b is not None and b < half)),
               (_blocks(half, depth - 1), frozenset(n for n, b in block.items()
                                                    if b is not None and b >= half))]
  kept: dict[frozenset, str] = {}  # each set of layers once, under its first group's name
  for g, sel in groups:
    if sel:
      kept.setdefault(sel, g)
  return [(b, g, f"{b} off, {g}", sel) for b in branches for sel, g in kept.items()]


def _blocks(first: int, last: int) -> str:
  return f"block {first}" if first == last else f"blocks {first}-{last}"


def run_ablations(model, params, adapters, spec: AdapterSpec, batches: Sequence[Batch],
                  plans) -> list[dict[str, Any]]:
  """Accuracy of the full adapted model, then with each plan's branch off in its layers."""
  fwd = jax.jit(lambda p, a, x: adapters_lib.forward(model, p, a, spec, x)[0])
  acc = lambda a: train_lib.evaluate(lambda b: fwd(params, a, b["image"]), iter(batches))
  rows = [{"branch": "none", "group": "-", "label": "full model", "layers": 0,
           "accuracy": acc(adapters)}]
  for branch, group, label, sel in plans:
    ablated = ablate(adapters, spec, branch, lambda n, sel=sel: n in sel)
    rows.append({"branch": branch, "group": group, "label": label, "layers": len(sel),
                 "accuracy": acc(ablated)})
  return rows
