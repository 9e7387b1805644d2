"""What trains: '/'-path regex labels over a param tree, and freezing through optax.

Patterns are fullmatched against each leaf's '/'-joined path (e.g. ``adapters/.*``,
``params/head/.*``); the first matching pattern wins (it only matters for ``report``). A pattern
that matches nothing is an error, not a silent no-op. Frozen leaves go through
``optax.set_to_zero()`` inside ``optax.partition``: no updates and no optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _patterns(patterns: str | Sequence[str]) -> tuple[str, ...]:
  """The patterns as a tuple, each checked to be a regular expression (errors name it)."""
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"trainable pattern {pattern!r} (train_patterns) is not a regular "
                       f"expression: {e}") from None
  return patterns


def _first_match(tree: Any, patterns: Sequence[str]) -> tuple[list, list, Any]:
  """(paths, index of the first matching pattern or None per leaf, treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [_path_str(p) for p, _ in leaves]
  hits = [next((i for i, pat in enumerate(patterns) if re.fullmatch(pat, p)), None) for p in paths]
  unused = [pat for pat in patterns if not any(re.fullmatch(pat, p) for p in paths)]
  if unused:
    raise ValueError(f"trainable pattern(s) {unused} match no leaf; paths look like "
                     f"{paths[:5]}{' ...' if len(paths) > 5 else ''}")
  return paths, hits, treedef


def labels(tree: Any, patterns: str | Sequence[str]) -> Any:
  """A tree like ``tree`` of "trainable" (some pattern fullmatches the path) or "frozen".

  Raises:
    ValueError: a pattern matches no leaf (it is named).
  """
  _, hits, treedef = _first_match(tree, _patterns(patterns))
  return jax.tree_util.tree_unflatten(treedef, [FROZEN if h is None else TRAINABLE for h in hits])


def split(tree: Mapping, patterns: str | Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding the matched / unmatched leaves only.

  ``join(*split(tree, patterns)) == tree``. Empty sub-dicts are dropped.
  """
  paths, hits, _ = _first_match(tree, _patterns(patterns))
  trainable = {p for p, h in zip(paths, hits, strict=True) if h is not None}
  flat = traverse_util.flatten_dict(dict(tree), sep="/")
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in trainable}, sep="/"),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in trainable},
                                       sep="/"))


def join(trainable: Mapping, frozen: Mapping) -> dict:
  """Deep union of two nested dicts from ``split``.

  Raises:
    ValueError: a leaf path present in both (named).
  """
  out = dict(frozen)
  for k, v in trainable.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
      out[k] = join(v, out[k])
    else:
      raise ValueError(f"join: {k!r} is in both the trainable and the frozen tree")
  return out


def masked(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
  """``tx`` on "trainable" leaves; "frozen" leaves get zero updates and no optimizer state.

  Args:
    tx: the optimizer of the trainable leaves.
    labels: a tree of "trainable"/"frozen" like the params (``optim.labels``), or a function
      params -> such a tree.
  """
  return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def report(tree: Any, patterns: str | Sequence[str]) -> str:
  """A table of how many leaves and parameters each pattern selects (first match wins), totals."""
  pats = _patterns(patterns)
  paths, hits, _ = _first_match(tree, pats)
  sizes = [int(getattr(x, "size", 1)) for x in jax.tree_util.tree_leaves(tree)]
  lines = []
  for i, pat in enumerate(pats):
    n = [s for s, h in zip(sizes, hits, strict=True) if h == i]
    lines.append(f"{pat}: {len(n)} leaves, {sum(n):,} params")
  train = sum(s for s, h in zip(sizes, hits, strict=True) if h is not None)
  total = sum(sizes)
  lines.append(f"trainable: {train:,} of {total:,} params ({100.0 * train / max(total, 1):.4f}%), "
               f"frozen: {total - train:,}")
  return "\n".join(lines)
