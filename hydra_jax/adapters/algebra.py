"""Adapter arithmetic: scale, negate, add (exact, by concatenating ranks), weighted sums, and
``combine`` for any mix of kinds against the same frozen weights.

Every weight change of lora, sequential and hydra is linear in the up-projections (``B*``, ``b*``)
and a sum of rank-r products, so

- ``scale(ad, c)`` multiplies every ``B*`` and ``b*`` by c: its delta is c times the delta;
- ``add(x, y)`` concatenates ``A*`` / ``a*`` along the rank (last) axis and ``B*`` along the rank
  axis (-2) and sums ``b*``: its delta is exactly the sum of the deltas (for Hydra's sequential
  branch too, since ``W (A1 B1 + A2 B2) = W [A1 A2] [B1; B2]``), at the sum of the ranks.

HydraLoRA's heads are mixed by input-dependent routers, which do not add; ``add`` refuses it
(``scale`` works: the routers are untouched). Use ``combine`` with fixed routing to mix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from hydra_jax.adapters import transform
from hydra_jax.adapters.spec import AdapterSpec


def _map_layers(fn, adapters: Mapping) -> dict:
  out: dict[str, Any] = {}
  for path, f in transform.factor_dicts(adapters):
    transform.set_path(out, path, fn(f))
  return out


def scale(adapters: Mapping, c: float, spec: AdapterSpec) -> dict:
  """Adapters whose weight change is ``c`` times that of ``adapters``."""
  del spec  # the same rule holds for every kind
  return _map_layers(lambda f: {k: v * c if k[0] in "Bb" else v for k, v in f.items()}, adapters)


def negate(adapters: Mapping, spec: AdapterSpec) -> dict:
  """Adapters whose weight change is ``-delta(W)``.

  Merging them on top of ``merge(W, adapters)`` undoes a lora; for Hydra's sequential branch,
  which acts on the merged W, use ``unmerge`` instead.
  """
  return scale(adapters, -1.0, spec)


_RANK_AXIS = {"A": -1, "a": -1, "B": -2}  # a factor's initial -> its rank axis; the rest add


def _without_axis(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
  return shape if axis is None else shape[:len(shape) + axis] + shape[len(shape) + axis + 1:]


def _add_factors(path, fx: Mapping, fy: Mapping) -> dict:
  if set(fx) != set(fy):
    raise ValueError(f"cannot add adapters of layer {'/'.join(path)} with different factors: "
                     f"{sorted(fx)} vs {sorted(fy)}")
  out = {}
  for k in fx:
    axis = _RANK_AXIS.get(k[0])
    sx, sy = jnp.shape(fx[k]), jnp.shape(fy[k])
    if _without_axis(sx, axis) != _without_axis(sy, axis):
      raise ValueError(f"cannot add adapters of layer {'/'.join(path)}: factor {k} has shapes "
                       f"{sx} and {sy}, which differ beyond the rank axis")
    out[k] = fx[k] + fy[k] if axis is None else jnp.concatenate([fx[k], fy[k]], axis=axis)
  return out


def add(x: Mapping, y: Mapping, spec: AdapterSpec) -> dict:
  """Adapters whose weight change is exactly the sum of ``x``'s and ``y``'s (ranks add up).

  Layers adapted in only one of them are carried over unchanged (a new dict of the same factors:
  editing the result leaves ``x`` and ``y`` as they were).

  Raises:
    ValueError: for hydralora (routers do not add), or factor sets that differ.
  """
  if spec.kind == "hydralora":
    raise ValueError("add() is undefined for hydralora: each adapter routes tokens with its own "
                     "input-dependent router; use combine(params, [...]) with fixed routing")
  fx, fy = dict(transform.factor_dicts(x)), dict(transform.factor_dicts(y))
  out: dict[str, Any] = {}
  for path in list(fx) + [p for p in fy if p not in fx]:
    both = path in fx and path in fy
    value = _add_factors(path, fx[path], fy[path]) if both else dict(fx.get(path, fy.get(path)))
    transform.set_path(out, path, value)
  return out


def weighted_sum(items: Sequence[tuple[float, Mapping]], spec: AdapterSpec) -> dict:
  """``sum_i w_i * adapters_i`` as one adapter tree (rank = sum of the ranks).

  Args:
    items: [(weight, adapters), ...], all of the kind of ``spec``.
    spec: their common spec.
  """
  if not items:
    raise ValueError("weighted_sum needs at least one (weight, adapters) pair")
  total = scale(items[0][1], items[0][0], spec)
  for w, adapters in items[1:]:
    total = add(total, scale(adapters, w, spec), spec)
  return total


def combine(params: Mapping, items: Sequence[tuple], *, routing=None) -> dict:
  """``W + sum_i w_i * delta_i(W)`` for adapters of any kinds, each against the same base W.

  Args:
    params: the frozen param tree.
    items: [(weight, spec, adapters), ...]; a 4th element gives that item's HydraLoRA routing
      ((N,) or {path: (N,)}), else ``routing`` applies.
    routing: default fixed routing weights for HydraLoRA items.

  Returns:
    the combined param tree (float32 arithmetic, cast back to each leaf's dtype).
  """
  if not items:
    raise ValueError("combine needs at least one (weight, spec, adapters) item")
  total: dict[str, Any] = {}
  for item in items:
    w, spec, adapters = item[:3]
    r = item[3] if len(item) > 3 else routing
    for path, d in transform.factor_dicts(transform.delta(params, adapters, spec, routing=r)):
      acc = dict(transform.factor_dicts(total)).get(path)
      new = {k: w * v + (acc[k] if acc else 0.0) for k, v in d.items()}
      transform.set_path(total, path, new)
  return transform.apply_delta(params, total)
