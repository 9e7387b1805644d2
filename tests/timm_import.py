"""Imports timm where torchvision cannot be installed (tests and table generation only).

timm imports torchvision at module level for its data transforms and FrozenBatchNorm2d, never in
the VisionTransformer forward. No CPU build of torchvision exists for this machine's PyTorch (the
PyPI wheels link CUDA libraries), so where ``import torchvision`` fails, placeholder modules stand
in for it: every name they are asked for is a fresh class that refuses to be instantiated, so any
code that really uses torchvision fails loudly. A working torchvision is always used as is.
"""

from __future__ import annotations

import sys
import types


class _Placeholders(type):
  """Each attribute of a placeholder class is a new placeholder class (kept, so it is stable)."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    sub = _Placeholders(name, (cls,), {})
    setattr(cls, name, sub)
    return sub


class _Placeholder(metaclass=_Placeholders):
  def __init__(self, *args, **kwargs):
    raise RuntimeError(f"{type(self).__name__} is torchvision's, which is not installed here")


_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
            "torchvision.datasets", "torchvision.ops", "torchvision.ops.misc", "torchvision.utils",
            "torchvision.models", "torchvision.models.feature_extraction")


def _module(name: str) -> types.ModuleType:
  module = types.ModuleType(name)

  def getattr_(attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    value = _Placeholders(attr, (_Placeholder,), {})
    setattr(module, attr, value)
    return value

  module.__getattr__ = getattr_
  return module


def import_timm():
  """``timm``, importing it over placeholder torchvision modules when torchvision is unusable.

  The placeholders leave ``sys.modules`` once timm is imported: other packages (transformers
  asks ``importlib.util.find_spec("torchvision")``) must keep seeing no torchvision.
  """
  try:
    import torchvision  # noqa: F401
  except Exception:  # missing, or a CUDA build over a CPU torch ("torchvision::nms does not exist")
    for name in _MODULES:
      sys.modules[name] = _module(name)
    try:
      import timm
    finally:
      for name in _MODULES:
        sys.modules.pop(name, None)
  import timm
  return timm
