"""What to adapt and how: ``AdapterSpec``, its per-kind defaults, and the adapted layers.

Kinds and their defaults (None fields of ``AdapterSpec`` take these values):

=========== ======================================== ==== ======= ===== ====
kind        targets (fullmatch over module '/'-paths) rank scale   alpha bias
=========== ======================================== ==== ======= ===== ====
hydra       every block's attention ``out`` + MLP     2+2  s = 1.0 -     yes
            ``Dense_1`` (the paper's VTAB-1k setup)
sequential  same as hydra                             2    s = 1.0 -     yes
lora        every block's ``query`` and ``value``     8    alpha/r 8     no
hydralora   same as lora, ``num_heads`` = 3 B's       8    alpha/r 8     no
=========== ======================================== ==== ======= ===== ====

HydraLoRA's alpha equals LoRA's (alpha / r = 1), so switching between the two keeps the update's
scale (the paper's code takes alpha as a flag).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from typing import Any

KINDS = ("lora", "sequential", "hydra", "hydralora")
_BLOCK = r"Transformer/encoderblock_\d+/"
HYDRA_TARGETS = (_BLOCK + r"(MultiHeadDotProductAttention_0/out|MlpBlock_0/Dense_1)",)
LORA_TARGETS = (_BLOCK + r"MultiHeadDotProductAttention_0/(query|value)",)
# fields only some kinds read, and their unset value: another value for another kind is refused
_KIND_FIELDS = {"rank_parallel": (("hydra",), None),
                "rank_sequential": (("hydra", "sequential"), None),
                "scale": (("hydra", "sequential"), None), "alpha": (("lora", "hydralora"), None),
                "num_heads": (("hydralora",), 3), "top_k": (("hydralora",), None),
                "balance_weight": (("hydralora",), 0.0)}
_LOG = logging.getLogger(__name__)
_DEFAULTS = {
    "hydra": dict(targets=HYDRA_TARGETS, rank=2, scale=1.0, bias=True),
    "sequential": dict(targets=HYDRA_TARGETS, rank=2, scale=1.0, bias=True),
    "lora": dict(targets=LORA_TARGETS, rank=8, alpha=8.0, bias=False),
    "hydralora": dict(targets=LORA_TARGETS, rank=8, alpha=8.0, bias=False),
}


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """An adapter recipe; None fields take the kind's defaults (see the module docstring).

  Attributes:
    kind: one of ``KINDS``.
    targets: regexes, fullmatched against module '/'-paths (e.g. ``Transformer/encoderblock_0/
      MlpBlock_0/Dense_1``); every pattern must match at least one layer.
    rank: rank of every branch (Hydra: both branches unless ``rank_parallel`` /
      ``rank_sequential`` say otherwise).
    rank_parallel, rank_sequential: Hydra's per-branch ranks.
    scale: Hydra / sequential scale ``s`` shared by the branches.
    alpha: LoRA / HydraLoRA scaling numerator: outputs are scaled by ``alpha / rank``.
    bias: whether each branch carries factor biases ``a`` (after A) and ``b`` (after B).
    dropout: dropout rate between A and B (Hydra, sequential) or on the input (LoRA, HydraLoRA).
    num_heads: HydraLoRA's number N of up-projections B_i.
    top_k: HydraLoRA routes each token to its k most likely heads only (None: all).
    balance_weight: weight of HydraLoRA's Switch-style load-balancing loss.
  """
  kind: str
  targets: tuple[str, ...] | None = None
  rank: int | None = None
  rank_parallel: int | None = None
  rank_sequential: int | None = None
  scale: float | None = None
  alpha: float | None = None
  bias: bool | None = None
  dropout: float = 0.0
  num_heads: int = 3
  top_k: int | None = None
  balance_weight: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {KINDS}")
    unread = unread_fields(self.kind, dataclasses.asdict(self))
    if unread:
      raise ValueError(f"AdapterSpec fields {unread} are not read by kind {self.kind!r}; leave "
                       f"them unset ({ {k: _KIND_FIELDS[k][1] for k in unread} })")
    fill = dict(_DEFAULTS[self.kind])
    if self.kind == "hydra":
      fill.update(rank_parallel=self.rank or 2, rank_sequential=self.rank or 2)
    if self.kind == "sequential":
      fill.update(rank_sequential=self.rank or 2)
    for name, value in fill.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))
    self._validate()

  def _validate(self):
    for name in ("rank", "rank_parallel", "rank_sequential", "num_heads", "top_k"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                or value < 1):
        raise ValueError(f"AdapterSpec.{name} must be an integer >= 1; got {value!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"AdapterSpec.dropout must be in [0, 1); got {self.dropout}")
    if self.top_k is not None and not 1 <= self.top_k <= self.num_heads:
      raise ValueError(f"AdapterSpec.top_k must be in [1, num_heads={self.num_heads}]; "
                       f"got {self.top_k}")
    if self.balance_weight < 0:
      raise ValueError(f"AdapterSpec.balance_weight must be >= 0; got {self.balance_weight}")
    if not self.targets:
      raise ValueError("AdapterSpec.targets must name at least one pattern")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ValueError(f"AdapterSpec.targets pattern {pattern!r} is not a regular expression: "
                         f"{e}") from None

  @property
  def scaling(self) -> float:
    """The factor in front of every branch: ``s`` (Hydra, sequential) or ``alpha / rank``."""
    if self.kind in ("hydra", "sequential"):
      return float(self.scale)
    return float(self.alpha) / float(self.rank)

  @property
  def mergeable(self) -> bool:
    """Whether ``merge`` folds the adapters into the weights exactly.

    HydraLoRA's router depends on the input, so it merges only with fixed routing weights.
    """
    return self.kind != "hydralora"


def fields_read(kind: str) -> tuple[str, ...]:
  """The ``AdapterSpec`` fields ``kind`` reads once filled in (Hydra and sequential read their
  per-branch ranks, which ``rank`` only fills)."""
  return tuple(f.name for f in dataclasses.fields(AdapterSpec)
               if kind in _KIND_FIELDS.get(f.name, (KINDS, None))[0]
               and not (f.name == "rank" and kind in ("hydra", "sequential")))


def unread_fields(kind: str, values: dict[str, Any]) -> dict[str, Any]:
  """The fields of ``values`` set (not to their unset value) that ``kind`` does not read."""
  return {k: values[k] for k, (kinds, unset) in _KIND_FIELDS.items()
          if kind not in kinds and values.get(k, unset) != unset}


def spec_from_config(cfg: Any) -> AdapterSpec:
  """An ``AdapterSpec`` from a ConfigDict (or mapping) with the same field names.

  Unknown fields are an error (a typo should not silently fall back to a default). Fields the
  kind does not read (e.g. a Hydra config's ``scale`` after ``--config.adapter.kind=lora``; the
  command line cannot unset a field) are dropped with a warning naming them.
  """
  values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  known = {f.name for f in dataclasses.fields(AdapterSpec)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown adapter config fields {unknown}; expected a subset of "
                     f"{sorted(known)}")
  if values.get("targets") is not None and not isinstance(values["targets"], str):
    values["targets"] = tuple(values["targets"])
  if values.get("kind") in KINDS and (unread := unread_fields(values["kind"], values)):
    _LOG.warning("adapter fields %s are not read by kind %r: ignored", unread, values["kind"])
    values.update({k: _KIND_FIELDS[k][1] for k in unread})
  return AdapterSpec(**values)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One adapted layer: its module path and the shapes of its kernel's input / output axes.

  The kernel has shape ``in_shape + out_shape`` and the bias ``out_shape``; the adapter works on
  the flattened ``(d_in, d_out)`` matrix (attention: q/k/v (D, H*Dh), out (H*Dh, D)).
  """
  path: tuple[str, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def d_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def d_out(self) -> int:
    return math.prod(self.out_shape)


def _modules(tree: Any, prefix: tuple[str, ...] = ()):
  """Yields (path, module dict) for every sub-dict of ``tree`` holding a ``kernel``."""
  if not hasattr(tree, "items"):
    return
  if "kernel" in tree:
    yield prefix, tree
  for key, value in tree.items():
    yield from _modules(value, prefix + (str(key),))


def find_layers(spec: AdapterSpec, params: Any) -> list[Layer]:
  """The layers of ``params`` that ``spec.targets`` selects, in tree order.

  The output axes of a kernel are those of its bias (the last axis when there is no bias).

  Raises:
    ValueError: a pattern matches no layer (it is named, with the available layers).
  """
  layers, used = [], set()
  modules = list(_modules(params))
  for path, module in modules:
    name = "/".join(path)
    hits = [p for p in spec.targets if re.fullmatch(p, name)]
    if not hits:
      continue
    used.update(hits)
    kernel_shape = tuple(module["kernel"].shape)
    n_out = len(module["bias"].shape) if "bias" in module else 1
    layers.append(Layer(path, kernel_shape[:-n_out], kernel_shape[-n_out:]))
  missing = [p for p in spec.targets if p not in used]
  if missing:
    available = ["/".join(p) for p, _ in modules]
    raise ValueError(f"adapter target pattern(s) {missing} match no layer; layers with a kernel: "
                     f"{available}")
  return layers
