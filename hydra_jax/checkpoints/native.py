"""hydra_jax's own format: one safetensors file of '/'-joined params plus JSON metadata.

The metadata (ViT fields, mean/std, source) sits in the safetensors header under the key
``hydra_jax``, so a checkpoint is a single file and is written atomically.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from hydra_jax.checkpoints import common

METADATA_KEY = "hydra_jax"


def _has_safetensors_header(path: pathlib.Path) -> bool:
  """Whether ``path`` starts like a safetensors file: a u64 header length, then a JSON object."""
  with open(path, "rb") as f:
    head = f.read(9)
  return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 2**31 and head[8:] == b"{"


def metadata(path: pathlib.Path) -> dict | None:
  """The hydra_jax metadata of a safetensors file, or None when it has none (or is another format).

  Raises:
    ValueError: a safetensors file that cannot be read (e.g. truncated by an interrupted copy).
  """
  if not _has_safetensors_header(path):
    return None
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
    raise ValueError(f"{path} is a safetensors file that cannot be read (truncated or "
                     f"corrupt?): {e}") from e
  return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def save(path, pretrained: common.Pretrained) -> None:
  """Writes ``pretrained`` to ``path`` (a tmp file, then ``os.replace``).

  Args:
    path: destination file, conventionally ``*.safetensors``.
    pretrained: params (any float arrays, stored float32) and their metadata.
  """
  flat = common.flat_float32(pretrained.params)
  meta = dict(model=pretrained.model, mean=list(pretrained.mean), std=list(pretrained.std),
              source=pretrained.source)
  write_safetensors(path, flat, {METADATA_KEY: json.dumps(meta)})


def write_atomically(path, write: Callable[[pathlib.Path], None]) -> None:
  """``write(tmp)`` to a hidden tmp file beside ``path``, then ``os.replace`` it onto ``path``.

  A failed write leaves any earlier file at ``path`` as it was and no tmp file behind.
  """
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a directory; expected the path of a file to write")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a cache is shared like any file
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes a safetensors file atomically (``write_atomically``)."""
  write_atomically(path, lambda tmp: save_file(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata))


def load_native(path: pathlib.Path, meta: dict) -> common.Pretrained:
  """A native file (with its already-read ``meta``) -> ``Pretrained`` (not yet finalized)."""
  model = dict(meta["model"])
  model["posemb_grid"] = tuple(model["posemb_grid"])
  params = traverse_util.unflatten_dict(load_file(str(path)), sep="/")
  return common.Pretrained(params, model, tuple(meta["mean"]), tuple(meta["std"]), meta["source"])
