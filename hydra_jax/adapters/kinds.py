"""The math of each adapter kind, written once and used by both the weight and activation paths.

A layer computes ``y0 = x @ W + b`` with W flattened to (d_in, d_out). Each kind writes its
branches once, as terms ``h @ up + bias`` of inputs x and frozen outputs y0; the adapted layer is
``y = y0 + sum(branches)``. ``outputs`` evaluates the branches one by one (for recording and
ablations), ``total`` their sum as a single matmul (for training). Every branch is affine in
(x, y0), so the merge follows from the SAME function (``layer_delta``):
``dW = total(x=I, y0=W)`` with the factor biases left out, and ``db = total(x=0, y0=b)``.

A low-rank branch is ``f(z) = drop(z @ A + a) @ B + b``. Factors per layer (float32):

- hydra:      A_p (d_in, r_p), B_p (r_p, d_out), A_s (d_out, r_s), B_s (r_s, d_out), and with
              ``bias`` a_p (r_p,), b_p (d_out,), a_s (r_s,), b_s (d_out,).
              ``y = y0 + s f_p(x) + s f_s(y0)``; dropout between A and B in each branch.
- sequential: hydra's ``_s`` factors only.
- lora:       A (d_in, r), B (r, d_out) [a (r,), b (d_out,)]; ``y = y0 + alpha/r drop(x) A B``.
- hydralora:  A (d_in, r), B (N, r, d_out), router (d_in, N) [a (r,), b (N, d_out)];
              ``y = y0 + alpha/r sum_i w_i(x) drop(x) A B_i``, ``w = top_k(softmax(x W_g))``.

Naming convention the algebra relies on: ``A*`` / ``a*`` hold the rank on their LAST axis
(down-projections), ``B*`` hold it on axis -2 and ``B*`` / ``b*`` are the outputs (up-projections).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hydra_jax.adapters import hydralora
from hydra_jax.adapters.spec import AdapterSpec, Layer

Drop = Callable[[str, jax.Array], jax.Array]  # (branch name, activations) -> dropped activations


def no_drop(name: str, h: jax.Array) -> jax.Array:
  del name
  return h


def _mm(z: jax.Array | None, m: jax.Array) -> jax.Array:
  """z @ m, where z None stands for the identity (the weight-space path)."""
  return m if z is None else z @ m.astype(z.dtype)


class Term(NamedTuple):
  """One branch as ``h @ up + bias``: every branch ends in an up-projection.

  h: (..., r) low-rank activations, already scaled, dropped and routed; up: (r, d_out);
  bias: (d_out,) or None. Branches sharing the up-projection's input side concatenate into one
  product (``total``): one (..., sum r) @ (sum r, d_out) matmul writes the layer's full-width
  delta once instead of once per branch.
  """
  h: jax.Array
  up: jax.Array
  bias: jax.Array | None


def _down(z, f, tag: str, *, affine: bool) -> jax.Array:
  """z @ A + a for the factors ``A{tag}`` / ``a{tag}``; the bias only if affine."""
  h = _mm(z, f["A" + tag])
  if affine and "a" + tag in f:
    h = h + f["a" + tag].astype(h.dtype)
  return h


def _bias(f, name: str, scale: float, affine: bool) -> jax.Array | None:
  return scale * f[name] if affine and name in f else None


_HYDRA_BRANCHES = (("parallel", "_p"), ("sequential", "_s"))  # branch name, factor suffix


def _hydra(f, x, y0, spec, *, affine, drop, routing, disable):
  """Hydra and sequential: s drop(x A_p + a_p) B_p + s b_p and the same on y0 with ``_s``."""
  del routing
  s, terms = spec.scaling, {}
  for (name, tag), z in zip(_HYDRA_BRANCHES, (x, y0), strict=True):
    if "A" + tag in f and name not in disable:
      h = s * drop(name, _down(z, f, tag, affine=affine))
      terms[name] = Term(h, f["B" + tag], _bias(f, "b" + tag, s, affine))
  return terms, None


def _lora(f, x, y0, spec, *, affine, drop, routing, disable):
  del y0, routing
  if "lora" in disable:
    return {}, None
  z = None if x is None else drop("lora", x)
  h = spec.scaling * _down(z, f, "", affine=affine)
  return {"lora": Term(h, f["B"], _bias(f, "b", spec.scaling, affine))}, None


def _hydralora(f, x, y0, spec, *, affine, drop, routing, disable):
  """Shared A, N heads B_i weighted per token by the router (or by fixed ``routing`` (N,)).

  Head i is ``s w_i (drop(x) A + a) B_i + s w_i b_i``: its per-token bias rides along as one
  more column of h (``s w_i``) and one more row of up (``b_i``).
  """
  del y0
  probs = None
  if routing is None:
    if x is None:
      raise ValueError("HydraLoRA's router depends on the input; merging it needs fixed "
                       "routing weights (merge(..., routing=...))")
    probs = hydralora.router_probs(x, f["router"])
    routing = hydralora.top_k_weights(probs, spec.top_k)
  h = _down(None if x is None else drop("x", x), f, "", affine=affine)
  terms = {}
  for i in range(f["B"].shape[0]):
    if f"head_{i}" in disable:
      continue
    w = spec.scaling * routing[..., i:i + 1].astype(h.dtype)
    if affine and "b" in f:
      w = jnp.broadcast_to(w, h.shape[:-1] + (1,))
      terms[f"head_{i}"] = Term(jnp.concatenate([w * h, w], -1),
                                jnp.concatenate([f["B"][i], f["b"][i][None]], 0), None)
    else:
      terms[f"head_{i}"] = Term(w * h, f["B"][i], None)
  return terms, probs


TERMS = {"hydra": _hydra, "sequential": _hydra, "lora": _lora, "hydralora": _hydralora}


def _terms(f, x, y0, spec: AdapterSpec, *, affine: bool, drop: Drop, routing, disable):
  return TERMS[spec.kind](f, x, y0, spec, affine=affine, drop=drop, routing=routing,
                          disable=disable)


def _product(h: jax.Array, up: jax.Array, biases) -> jax.Array:
  y = h @ up.astype(h.dtype)
  for b in biases:
    y = y + b.astype(y.dtype)
  return y


def branch_names(spec: AdapterSpec, f) -> tuple[str, ...]:
  """The names ``outputs`` gives one layer's branches (what ``disable`` switches off)."""
  if spec.kind == "hydralora":
    return tuple(f"head_{i}" for i in range(f["B"].shape[0]))
  if spec.kind == "lora":
    return ("lora",)
  return tuple(name for name, tag in _HYDRA_BRANCHES if "A" + tag in f)


def outputs(f, x, y0, spec: AdapterSpec, *, affine: bool = True, drop: Drop = no_drop,
            routing=None, disable=()):
  """Branch contributions of one layer's adapter, one by one.

  Args:
    f: the layer's factor dict.
    x: (..., d_in) layer input, or None for the identity (weight space).
    y0: (..., d_out) frozen layer output (``x @ W + b``), or W itself in weight space.
    spec: the adapter spec (kind, scaling, top_k).
    affine: include factor biases (False gives the linear part, for dW).
    drop: dropout hook, called with the branch name and the activations to drop.
    routing: HydraLoRA fixed routing weights (N,) or (..., N); None uses the router.
    disable: branch names to leave out ("parallel", "sequential", "lora", "head_i").

  Returns:
    ({branch: (..., d_out)}, router probabilities (..., N) or None).
  """
  terms, probs = _terms(f, x, y0, spec, affine=affine, drop=drop, routing=routing,
                        disable=disable)
  return {k: _product(t.h, t.up, [t.bias] if t.bias is not None else []) for k, t in
          terms.items()}, probs


def total(f, x, y0, spec: AdapterSpec, *, affine: bool = True, drop: Drop = no_drop,
          routing=None, disable=()):
  """The sum of ``outputs``' branches as ONE matmul (the branches' h and up concatenated).

  Same arguments as ``outputs``. Returns ((..., d_out) like y0, router probabilities or None).
  """
  terms, probs = _terms(f, x, y0, spec, affine=affine, drop=drop, routing=routing,
                        disable=disable)
  if not terms:
    return jnp.zeros_like(y0), probs
  ts = list(terms.values())
  dtype = ts[0].h.dtype
  h = jnp.concatenate([t.h for t in ts], -1)
  up = jnp.concatenate([t.up.astype(dtype) for t in ts], 0)
  return _product(h, up, [t.bias for t in ts if t.bias is not None]), probs


def layer_delta(f, w: jax.Array, b: jax.Array, spec: AdapterSpec, *, routing=None):
  """(dW (d_in, d_out), db (d_out,)) of one layer, float32 (whatever the factors' dtype)."""
  w, b = w.astype(jnp.float32), b.astype(jnp.float32)
  f = {k: jnp.asarray(v, jnp.float32) for k, v in f.items()}
  dw, _ = total(f, None, w, spec, affine=False, routing=routing)
  db, _ = total(f, jnp.zeros((w.shape[0],), jnp.float32), b, spec, routing=routing)
  return dw, db


def output_lowrank(f, spec: AdapterSpec):
  """(U, V) with the output-dependent part of dW equal to ``W @ U @ V``, or None (for unmerge)."""
  if spec.kind in ("hydra", "sequential") and "A_s" in f:
    return spec.scaling * f["A_s"].astype(jnp.float32), f["B_s"].astype(jnp.float32)
  return None


# each kind's factor suffixes (one low-rank branch each); "_s" reads the layer's output y0
_SUFFIXES = {"hydra": tuple(tag for _, tag in _HYDRA_BRANCHES), "sequential": ("_s",),
             "lora": ("",), "hydralora": ("",)}


def check_factors(f, layer: Layer, spec: AdapterSpec) -> None:
  """Raises ValueError naming the layer unless ``f`` are ``spec.kind`` factors that fit ``layer``.

  The ranks (and HydraLoRA's number of heads) are read from the factors themselves.
  """
  d_in, d_out = layer.d_in, layer.d_out
  # factor suffix -> width of the branch's input (x: d_in; y0: d_out)
  tags = {t: d_out if t == "_s" else d_in for t in _SUFFIXES[spec.kind]}
  heads = spec.kind == "hydralora"
  present = [t for t in tags if "A" + t in f]
  allowed = {c + t for t in present for c in "ABab"} | ({"router"} if heads else set())
  if (not present or set(f) - allowed or any("B" + t not in f for t in present)
      or (heads and "router" not in f)):
    expected = " and/or ".join(f"A{t}, B{t}{', router' if heads else ''} [a{t}, b{t}]"
                               for t in tags)
    raise ValueError(f"layer {layer.name}: factors {sorted(f)} are not {spec.kind} factors; "
                     f"expected {expected} (adapters and spec of different kinds?)")
  n = (jnp.shape(f["router"])[-1],) if heads else ()
  expected = {"router": (d_in, *n)} if heads else {}
  for t in present:
    r = jnp.shape(f["A" + t])[-1]
    expected.update({"A" + t: (tags[t], r), "a" + t: (r,), "B" + t: (*n, r, d_out),
                     "b" + t: (*n, d_out)})
  for name, value in f.items():
    if tuple(jnp.shape(value)) != expected[name]:
      raise ValueError(f"layer {layer.name}: {spec.kind} factor {name} has shape "
                       f"{tuple(jnp.shape(value))}; expected {expected[name]} (d_in={d_in}, "
                       f"d_out={d_out})")


def _check_rank(layer: Layer, rank: int, limit: int, what: str):
  if rank > limit:
    raise ValueError(f"rank {rank} of the {what} is larger than {limit} for layer {layer.name} "
                     f"(d_in={layer.d_in}, d_out={layer.d_out})")


def init_factors(rng: jax.Array, layer: Layer, spec: AdapterSpec) -> dict[str, Any]:
  """Fresh factors of one layer: the adapted layer equals the frozen one (every B is zero)."""
  d_in, d_out, z = layer.d_in, layer.d_out, jnp.zeros
  xavier = jax.nn.initializers.xavier_uniform()
  kaiming = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # a = sqrt(5)
  k1, k2, k3 = jax.random.split(rng, 3)
  f = {}
  if spec.kind == "hydra":
    _check_rank(layer, spec.rank_parallel, min(d_in, d_out), "parallel branch")
    rp = spec.rank_parallel
    f.update(A_p=xavier(k1, (d_in, rp)), B_p=z((rp, d_out)))
    if spec.bias:
      f.update(a_p=z((rp,)), b_p=z((d_out,)))
  if spec.kind in ("hydra", "sequential"):
    rs = spec.rank_sequential
    _check_rank(layer, rs, d_out, "sequential branch")
    f.update(A_s=xavier(k2, (d_out, rs)), B_s=z((rs, d_out)))
    if spec.bias:
      f.update(a_s=z((rs,)), b_s=z((d_out,)))
    return f
  r = spec.rank
  _check_rank(layer, r, min(d_in, d_out), spec.kind)
  f["A"] = kaiming(k1, (d_in, r))
  n = spec.num_heads
  f["B"] = z((r, d_out)) if spec.kind == "lora" else z((n, r, d_out))
  if spec.kind == "hydralora":
    f["router"] = kaiming(k3, (d_in, n))
  if spec.bias:
    f.update(a=z((r,)), b=z((d_out,)) if spec.kind == "lora" else z((n, d_out)))
  return f
