"""Weight-space functions over (frozen params, adapters): init, delta, merge, unmerge.

The adapters tree mirrors the param tree down to each adapted MODULE, whose dict holds that
layer's factors (see ``kinds``), e.g. ``adapters["Transformer"]["encoderblock_0"]["MlpBlock_0"]
["Dense_1"] == {"A_p", "B_p", "a_p", "b_p", "A_s", "B_s", "a_s", "b_s"}`` for Hydra. Which
layers are adapted, and the ranks, are read from the adapters tree itself, so summed or merged
adapters of other ranks (or other layers) work with the same spec.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from hydra_jax.adapters import kinds
from hydra_jax.adapters.spec import AdapterSpec, Layer, find_layers


def init(spec: AdapterSpec, params: Any, rng: jax.Array) -> dict[str, Any]:
  """Fresh adapters for the layers of ``params`` that ``spec.targets`` select.

  Args:
    spec: the adapter recipe.
    params: the frozen param tree (arrays or ShapeDtypeStructs: only shapes are read).
    rng: PRNG key; each layer gets ``fold_in(rng, layer index)``.

  Returns:
    the adapters tree; the adapted model equals the frozen one until training moves the B's.
  """
  adapters: dict[str, Any] = {}
  for i, layer in enumerate(find_layers(spec, params)):
    set_path(adapters, layer.path, kinds.init_factors(jax.random.fold_in(rng, i), layer, spec))
  return adapters


def factor_dicts(adapters: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple, dict]]:
  """Yields (module path, factor dict) for every adapted layer, in tree order.

  A factor dict is a non-empty dict of arrays; empty dicts adapt nothing.
  """
  nested = [isinstance(v, Mapping) for v in adapters.values()]
  if nested and not any(nested):
    yield prefix, adapters
    return
  if not all(nested):
    raise ValueError(f"adapters at {'/'.join(prefix) or 'the root'} mix arrays and dicts "
                     f"({sorted(adapters)}); expected dicts down to each layer's factors")
  for key, value in adapters.items():
    yield from factor_dicts(value, prefix + (key,))


def get_path(tree: Mapping, path: tuple[str, ...], what: str = "params") -> Any:
  for i, key in enumerate(path):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f"adapted layer {'/'.join(path)} is not in the {what} "
                       f"(no {'/'.join(path[:i + 1])})")
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _replace(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
  """A copy of ``tree`` with ``path`` set to ``value``; only the dicts along the path are copied."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
  return out


def layer_of(path: tuple[str, ...], module: Mapping) -> Layer:
  """The Layer (flattened axes) of a module dict holding ``kernel`` [and ``bias``]."""
  shape = tuple(module["kernel"].shape)
  n_out = len(module["bias"].shape) if "bias" in module else 1
  return Layer(tuple(path), shape[:-n_out], shape[-n_out:])


def _flat(layer: Layer, module: Mapping) -> tuple[jax.Array, jax.Array]:
  w = jnp.reshape(module["kernel"], (layer.d_in, layer.d_out))
  b = jnp.reshape(module["bias"], (layer.d_out,)) if "bias" in module else jnp.zeros(layer.d_out)
  return w, b


def routing_for(routing: Any, layer: Layer, factors: Mapping, *, per_token: bool = False) -> Any:
  """The fixed routing weights of one layer from None, an array or a {path: array} dict.

  Checked against a HydraLoRA layer's N heads (``factors["B"]``: (N, r, d_out)): (N,) weights,
  or with ``per_token`` (on activations) also (..., N), one row per token.
  """
  if routing is None or "router" not in factors:  # only HydraLoRA layers take routing
    return None
  if isinstance(routing, Mapping):
    if layer.name not in routing:
      raise ValueError(f"routing has no weights for layer {layer.name}; keys: {sorted(routing)}")
    routing = routing[layer.name]
  routing = jnp.asarray(routing)
  heads = factors["B"].shape[0]
  if routing.ndim == 0 or routing.shape[-1] != heads or (routing.ndim > 1 and not per_token):
    want = f"(..., {heads}), one weight per head" if per_token else (
        f"({heads},), one weight per head (the weights take one routing; a routing per token "
        "acts on activations: apply_intercepted)")
    raise ValueError(f"routing weights for layer {layer.name} have shape {routing.shape}; "
                     f"expected {want}")
  return routing


def adapted_layers(params: Mapping, adapters: Mapping, spec: AdapterSpec):
  """Yields (Layer, param module, factors) per adapted layer, the factors checked against both."""
  for path, f in factor_dicts(adapters):
    module = get_path(params, path)
    layer = layer_of(path, module)
    kinds.check_factors(f, layer, spec)
    yield layer, module, f


def _layer_delta(layer, module, f, spec, routing, *, at_zero=False):
  """(dW, db) flattened; at_zero: against W = 0, b = 0 (the parts that do not depend on W)."""
  if "bias" not in module and any(k[0] in "ab" for k in f):
    raise ValueError(f"layer {layer.name} has no bias to merge the factor biases into; "
                     "use AdapterSpec(bias=False)")
  w, b = _flat(layer, module)
  if at_zero:
    w, b = jnp.zeros(w.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32)
  return kinds.layer_delta(f, w, b, spec, routing=routing_for(routing, layer, f))


def delta(params: Mapping, adapters: Mapping, spec: AdapterSpec, *, routing=None) -> dict:
  """Each adapted layer's weight change, in the layer's own shapes.

  Args:
    params: the frozen param tree.
    adapters: the adapters tree.
    spec: the adapter spec.
    routing: HydraLoRA only: fixed routing weights, (N,) for every layer or {path: (N,)}.

  Returns:
    {module path (nested): {"kernel": dW (kernel shape), "bias": db (bias shape)}}, float32.
  """
  out: dict[str, Any] = {}
  for layer, module, f in adapted_layers(params, adapters, spec):
    dw, db = _layer_delta(layer, module, f, spec, routing)
    d = {"kernel": dw.reshape(module["kernel"].shape)}
    if "bias" in module:
      d["bias"] = db.reshape(module["bias"].shape)
    set_path(out, layer.path, d)
  return out


def apply_delta(params: Mapping, deltas: Mapping) -> dict:
  """params + deltas (a ``delta``-shaped tree), computed in float32, cast to each leaf's dtype."""
  out = params
  for path, d in factor_dicts(deltas):
    module = dict(get_path(params, path))
    for name, change in d.items():
      old = module[name]
      module[name] = (old.astype(jnp.float32) + change).astype(old.dtype)
    out = _replace(out, path, module)
  return out


def merge(params: Mapping, adapters: Mapping, spec: AdapterSpec, *, routing=None) -> dict:
  """The frozen params with every adapter folded in: ``W' = W + dW``, ``b' = b + db``.

  Exact for lora, sequential and hydra (``W' = W + s (A_p B_p + W A_s B_s)``,
  ``b' = b + s (a_p B_p + b_p + (b A_s + a_s) B_s + b_s)``). HydraLoRA's router depends on the
  input, so its merge needs fixed ``routing`` weights (N,) (or {path: (N,)}) and is only an
  APPROXIMATION of the routed model (exact when every token's routing equals those weights).
  Pure jnp: jit-able and differentiable in both arguments.
  """
  return apply_delta(params, delta(params, adapters, spec, routing=routing))


def _woodbury_right(z: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
  """z @ inv(I + u @ v) = z - (z u) inv(I_r + v u) v: an r x r solve, never a d x d inverse."""
  m = jnp.eye(u.shape[1], dtype=u.dtype) + v @ u
  zu_minv = jnp.linalg.solve(m.T, (z @ u).T).T
  return z - zu_minv @ v


def unmerge(merged: Mapping, adapters: Mapping, spec: AdapterSpec, *, routing=None) -> dict:
  """Inverts ``merge``: the frozen params back from merged ones.

  With ``W' = W (I + U V) + P`` and ``b' = b (I + U V) + c`` (U V = s A_s B_s, P = dW at W = 0,
  c = db at b = 0), ``[W; b] = [W' - P; b' - c] (I + U V)^-1`` by the Woodbury identity.
  Fails (singular solve: inf/nan) exactly when ``I + s A_s B_s`` is singular.
  """
  out = merged
  for layer, module, f in adapted_layers(merged, adapters, spec):
    w_m, b_m = _flat(layer, module)
    p, c = _layer_delta(layer, module, f, spec, routing, at_zero=True)
    z = jnp.concatenate([w_m.astype(jnp.float32) - p, (b_m.astype(jnp.float32) - c)[None]])
    lowrank = kinds.output_lowrank(f, spec)
    if lowrank is not None:
      z = _woodbury_right(z, *lowrank)
    new = dict(module)
    new["kernel"] = z[:-1].reshape(module["kernel"].shape).astype(module["kernel"].dtype)
    if "bias" in module:
      new["bias"] = z[-1].reshape(module["bias"].shape).astype(module["bias"].dtype)
    out = _replace(out, layer.path, new)
  return out
