"""The activation-level path: the unchanged ViT with adapters applied to each layer's activations.

``flax.linen.intercept_methods`` wraps every ``nn.Dense`` / ``nn.DenseGeneral`` call whose
``module.path`` is an adapted layer: the frozen output ``y0`` is computed as usual, then the
kind's ``kinds.outputs`` (the same function the merge uses) adds its branches on the flattened
(..., d_in) -> (..., d_out) activations. It is the path for what a merge cannot express:
dropout inside branches, HydraLoRA's per-token router, recording each branch's output, and
switching branches off for ablations. ``forward`` picks the merge path whenever it is exact.

Router probabilities and recorded outputs are sown into a flax collection (not kept in Python
lists), so the path also works under ``ViT(remat=True)``'s lifted checkpoint. A layer whose parent
module has a ``valid_tokens`` attribute runs on a padded sequence (the ViT's cuDNN attention):
its router probabilities and recorded outputs are cut to the first ``valid_tokens`` tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.adapters import hydralora, kinds, transform
from hydra_jax.adapters.spec import AdapterSpec
from hydra_jax.models import vit

_AUX = "adapter_aux"  # flax collection the interceptor sows router probabilities / branches into


def _dropout_hook(rng: jax.Array, layer_index: int, rate: float) -> kinds.Drop:
  """Inverted dropout; the mask depends on (rng, layer, branch name) only, so it is reproducible."""
  key = jax.random.fold_in(rng, layer_index)

  def drop(name: str, h: jax.Array) -> jax.Array:
    k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    keep = jax.random.bernoulli(k, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))

  return drop


def _flatten(a: jax.Array, axes: tuple[int, ...], size: int) -> jax.Array:
  return a.reshape(a.shape[:a.ndim - len(axes)] + (size,))


def apply_intercepted(model: nn.Module, params: Mapping, adapters: Mapping, spec: AdapterSpec,
                      images: jax.Array, *, rng: jax.Array | None = None, train: bool = False,
                      record: bool = False, disable: Sequence[str] = (), routing: Any = None,
                      method: Any = None, axis_name: str | None = None
                      ) -> tuple[jax.Array, dict[str, Any]]:
  """Runs ``model`` on ``images`` with the adapters applied to activations.

  Args:
    model: the (unchanged) ViT.
    params: its frozen param tree.
    adapters: the adapters tree.
    spec: the adapter spec.
    images: (B, H, W, 3) normalised images.
    rng: PRNG key for dropout; required when ``train`` and ``spec.dropout > 0``.
    train: apply dropout.
    record: return each branch's output per layer in ``aux["branches"]`` (and HydraLoRA's
      router probabilities in ``aux["router_probs"]``, the weights applied, after ``top_k``, in
      ``aux["routing"]``).
    disable: branch names to switch off ("parallel", "sequential", "lora", "head_i").
    routing: HydraLoRA: fixed routing weights ((N,) or {path: (N,)}) instead of the routers.
    method: model method to apply (None: ``__call__``; "encode", "features").
    axis_name: under ``pmap``, the batch axis the balancing loss's statistics average over.

  Returns:
    (model output, aux): aux["balance_loss"] scalar float32 (``spec.balance_weight`` times the
    mean over layers of the Switch loss; 0.0 when there is none); with ``record``:
    aux["branches"][layer '/'-path][branch] (shaped like the layer's output) and
    aux["routing"][layer '/'-path] (..., N).
  """
  adapted = list(transform.adapted_layers(params, adapters, spec))
  factors = {layer.path: f for layer, _, f in adapted}
  layers = {layer.path: layer for layer, _, _ in adapted}
  index = {p: i for i, p in enumerate(factors)}
  dropout = train and spec.dropout > 0
  if dropout and rng is None:
    raise ValueError(f"train=True with dropout {spec.dropout} needs an rng")
  known = {name for f in factors.values() for name in kinds.branch_names(spec, f)}
  if unknown := sorted(set(disable) - known):
    raise ValueError(f"disable names no branch of this {spec.kind} adapter: {unknown}; "
                     f"its branches: {sorted(known)}")
  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if (context.method_name != "__call__" or path not in factors
        or not isinstance(context.module, (nn.Dense, nn.DenseGeneral))):
      return next_fun(*args, **kwargs)
    y0, layer = next_fun(*args, **kwargs), layers[path]
    x = _flatten(args[0], layer.in_shape, layer.d_in)
    y = _flatten(y0, layer.out_shape, layer.d_out)
    drop = _dropout_hook(rng, index[path], spec.dropout) if dropout else kinds.no_drop
    kw = dict(drop=drop, disable=tuple(disable),
              routing=transform.routing_for(routing, layer, factors[path], per_token=True))
    if record:
      out, probs = kinds.outputs(factors[path], x, y, spec, **kw)
      delta = sum(out.values(), jnp.zeros_like(y))
    else:
      delta, probs = kinds.total(factors[path], x, y, spec, **kw)
    seen.add(path)
    valid = getattr(context.module.parent, "valid_tokens", None)
    cut = (lambda a: a) if valid is None else (lambda a: a[:, :valid])  # noqa: E731
    # sown, not appended to a Python list, so that lifted transforms (remat) carry them out
    if probs is not None:
      context.module.sow(_AUX, "probs", cut(probs))
    if record:
      context.module.sow(_AUX, "branches", {k: cut(v.reshape(y0.shape)) for k, v in out.items()})
    return (y + delta).astype(y0.dtype).reshape(y0.shape)

  with nn.intercept_methods(interceptor):
    out, state = model.apply({"params": params}, images, method=method, mutable=[_AUX],
                             rngs=vit.train_rngs(rng, train=train))
  missing = [layers[p].name for p in factors if p not in seen]
  if missing:
    raise ValueError(f"adapted layers {missing} were never called as nn.Dense/nn.DenseGeneral "
                     "modules; the activation path cannot adapt them")
  sown = {p: transform.get_path(state[_AUX], p, _AUX) for p in factors} if state else {}
  probs_all = [v["probs"][0] for v in sown.values() if "probs" in v]
  aux: dict[str, Any] = {"balance_loss": _balance(probs_all, spec, axis_name)}
  if record:
    names = {p: layers[p].name for p in factors}
    aux["branches"] = {names[p]: v["branches"][0] for p, v in sown.items()}
    aux["router_probs"] = {names[p]: v["probs"][0] for p, v in sown.items() if "probs" in v}
    aux["routing"] = {name: hydralora.top_k_weights(probs, spec.top_k)
                      for name, probs in aux["router_probs"].items()}
  return out, aux


def _balance(probs_all: list[jax.Array], spec: AdapterSpec, axis_name: str | None) -> jax.Array:
  if not probs_all or spec.balance_weight == 0:
    return jnp.zeros((), jnp.float32)
  losses = jnp.stack([hydralora.balance_loss(p, axis_name) for p in probs_all])
  return spec.balance_weight * losses.mean()


def merge_path(spec: AdapterSpec, *, train: bool) -> bool:
  """Whether ``forward`` runs the ViT on merged weights (exact: no train-time dropout or router)."""
  return spec.mergeable and not (train and spec.dropout > 0)


def forward(model: nn.Module, params: Mapping, adapters: Mapping, spec: AdapterSpec,
            images: jax.Array, *, rng: jax.Array | None = None, train: bool = False,
            axis_name: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The adapted model's output: THE entry point training and evaluation use.

  Takes the merge path (the unchanged ViT on ``merge(params, adapters)``: the architecture and
  speed of the pre-trained model) whenever it is exact, i.e. no train-time dropout and not
  hydralora; otherwise the activation-level path. ``axis_name``: under ``pmap``, the batch axis
  the load-balancing loss averages its statistics over (``hydralora.balance_loss``).

  Returns:
    (logits (B, C), {"balance_loss": scalar float32}).
  """
  if merge_path(spec, train=train):
    logits = model.apply({"params": transform.merge(params, adapters, spec)}, images,
                         rngs=vit.train_rngs(rng, train=train))
    return logits, {"balance_loss": jnp.zeros((), jnp.float32)}
  logits, aux = apply_intercepted(model, params, adapters, spec, images, rng=rng, train=train,
                                  axis_name=axis_name)
  return logits, {"balance_loss": aux["balance_loss"]}
