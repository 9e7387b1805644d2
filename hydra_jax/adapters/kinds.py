"""The math of each adapter kind, written once and used by both the weight and activation paths.

A layer computes ``y0 = x @ W + b`` with W flattened to (d_in, d_out). Each kind's ``outputs``
function returns its branches' contributions for inputs x and frozen outputs y0; the adapted
layer is ``y = y0 + sum(branches)``. Every branch is affine in (x, y0), so the merge follows from
the SAME function (``layer_delta``): ``dW = sum(outputs(x=I, y0=W))`` with the factor biases
left out, and ``db = sum(outputs(x=0, y0=b))``.

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
from typing import Any

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


def _branch(z, f, tag: str, *, affine: bool, drop: Callable) -> jax.Array:
  """f(z) = drop(z @ A + a) @ B + b for the factors ``A{tag}`` etc.; biases only if affine."""
  h = _mm(z, f["A" + tag])
  if affine and "a" + tag in f:
    h = h + f["a" + tag].astype(h.dtype)
  y = drop(h) @ f["B" + tag].astype(h.dtype)
  if affine and "b" + tag in f:
    y = y + f["b" + tag].astype(y.dtype)
  return y


def _hydra(f, x, y0, spec, *, affine, drop, routing, disable):
  """Hydra and sequential: parallel branch on the input, sequential branch on the output."""
  del routing
  s, out = spec.scaling, {}
  for name, tag, z in (("parallel", "_p", x), ("sequential", "_s", y0)):
    if "A" + tag in f and name not in disable:
      out[name] = s * _branch(z, f, tag, affine=affine, drop=lambda h, n=name: drop(n, h))
  return out, None


def _lora(f, x, y0, spec, *, affine, drop, routing, disable):
  del y0, routing
  if "lora" in disable:
    return {}, None
  z = None if x is None else drop("lora", x)
  return {"lora": spec.scaling * _branch(z, f, "", affine=affine, drop=lambda h: h)}, None


def _hydralora(f, x, y0, spec, *, affine, drop, routing, disable):
  """Shared A, N heads B_i weighted per token by the router (or by fixed ``routing`` (N,))."""
  del y0
  probs = None
  if routing is None:
    if x is None:
      raise ValueError("HydraLoRA's router depends on the input; merging it needs fixed "
                       "routing weights (merge(..., routing=...))")
    probs = hydralora.router_probs(x, f["router"])
    routing = hydralora.top_k_weights(probs, spec.top_k)
  h = _mm(None if x is None else drop("x", x), f["A"])
  if affine and "a" in f:
    h = h + f["a"].astype(h.dtype)
  out = {}
  for i in range(f["B"].shape[0]):
    if f"head_{i}" in disable:
      continue
    y = h @ f["B"][i].astype(h.dtype)
    if affine and "b" in f:
      y = y + f["b"][i].astype(y.dtype)
    out[f"head_{i}"] = spec.scaling * routing[..., i:i + 1].astype(y.dtype) * y
  return out, probs


OUTPUTS = {"hydra": _hydra, "sequential": _hydra, "lora": _lora, "hydralora": _hydralora}


def outputs(f, x, y0, spec: AdapterSpec, *, affine: bool = True, drop: Drop = no_drop,
            routing=None, disable=()):
  """Branch contributions of one layer's adapter.

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
  return OUTPUTS[spec.kind](f, x, y0, spec, affine=affine, drop=drop, routing=routing,
                            disable=disable)


def layer_delta(f, w: jax.Array, b: jax.Array, spec: AdapterSpec, *, routing=None):
  """(dW (d_in, d_out), db (d_out,)) of one layer, float32, from ``outputs`` itself."""
  w, b = w.astype(jnp.float32), b.astype(jnp.float32)
  lin, _ = outputs(f, None, w, spec, affine=False, routing=routing)
  off, _ = outputs(f, jnp.zeros((w.shape[0],), jnp.float32), b, spec, routing=routing)
  return sum(lin.values(), jnp.zeros_like(w)), sum(off.values(), jnp.zeros_like(b))


def output_lowrank(f, spec: AdapterSpec):
  """(U, V) with the output-dependent part of dW equal to ``W @ U @ V``, or None (for unmerge)."""
  if spec.kind in ("hydra", "sequential") and "A_s" in f:
    return spec.scaling * f["A_s"].astype(jnp.float32), f["B_s"].astype(jnp.float32)
  return None


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
