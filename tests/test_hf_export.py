"""Hugging Face export: transformers (PyTorch) loads what ``save_hf`` writes and computes what the
ViT computes; hydra_jax reads it back; models without a transformers counterpart are refused."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from hydra_jax import adapters, checkpoints, export
from hydra_jax.checkpoints import hf_export
from hydra_jax.models import ViT

TINY = dict(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4, posemb_grid=(4, 4),
            ln_eps=1e-6)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pretrained(seed: int, num_classes: int | None = 3, **fields) -> checkpoints.Pretrained:
  """A tiny ViT with every param random (norms, layer scales and head too)."""
  model = dict(TINY, **fields)
  variables = ViT(num_classes=num_classes, **model).init(
      jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  leaves, tree = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree.unflatten(
      tree, [rng.normal(size=x.shape).astype(np.float32) * 0.2 for x in leaves])
  # only the given fields, as a random-init run records them: the rest are the ViT's defaults
  return checkpoints.Pretrained(params, model, MEAN, STD, "test")


def _images(batch: int = 2) -> np.ndarray:
  return np.random.default_rng(1).normal(size=(batch, 16, 16, 3)).astype(np.float32)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _load_torch(path, arch: str):
  """transformers' class ``arch`` from ``path``; every tensor used, none missing or misshaped."""
  assert json.loads((path / "config.json").read_text())["architectures"] == [arch]
  model, info = getattr(transformers, arch).from_pretrained(
      path, output_loading_info=True, dtype=torch.float32)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def _torch(model, images):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))


def _apply(pre, images, method=None):
  model = checkpoints.build_model(pre)
  return np.asarray(model.apply({"params": pre.params}, images, method=method))


CLASSIFIERS = {  # ViT fields -> the transformers class computing the same logits
    "vit": (dict(pool="tok"), "ViTForImageClassification"),
    "vit_layer_scale_folded": (dict(pool="tok", layer_scale=True, gelu_approximate=True),
                               "ViTForImageClassification"),
    "dinov2": (dict(pool="tok+gap", layer_scale=True), "Dinov2ForImageClassification"),
    "dinov2_scales_of_one": (dict(pool="tok+gap"), "Dinov2ForImageClassification"),
    "siglip": (dict(pool="gap", class_token=False, gelu_approximate=True),
               "SiglipForImageClassification"),
}


@pytest.mark.parametrize("case", sorted(CLASSIFIERS))
def test_classifier_matches_transformers(case, tmp_path):
  fields, arch = CLASSIFIERS[case]
  pre = _pretrained(seed=len(case), **fields)
  assert checkpoints.save_hf(tmp_path / "hf", pre, labels=["a", "b", "c"]) == arch
  model = _load_torch(tmp_path / "hf", arch)
  assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
  images = _images()
  assert _rel(_torch(model, images).logits, _apply(pre, images)) < 1e-5
  back = checkpoints.load(tmp_path / "hf")  # and hydra_jax reads the export
  assert back.model["pool"] == fields["pool"] and (back.mean, back.std) == (MEAN, STD)
  assert _rel(_apply(back, images), _apply(pre, images)) < 1e-5


BACKBONES = {  # headless: ViT fields, the class, what to compare (ours, theirs)
    "siglip_map": (dict(pool="map", class_token=False, gelu_approximate=True),
                   "SiglipVisionModel", ("features", "pooler_output")),
    "dinov2": (dict(pool="tok", layer_scale=True), "Dinov2Model",
               ("encode", "last_hidden_state")),
    "vit_pre_logits": (dict(pool="tok", representation_size=24), "ViTModel",
                       ("features", "pooler_output")),
}


@pytest.mark.parametrize("case", sorted(BACKBONES))
def test_backbone_matches_transformers(case, tmp_path):
  fields, arch, (ours, theirs) = BACKBONES[case]
  pre = _pretrained(seed=len(case), num_classes=None, **fields)
  assert checkpoints.save_hf(tmp_path / "hf", pre) == arch
  images = _images()
  ref = getattr(_torch(_load_torch(tmp_path / "hf", arch), images), theirs)
  assert _rel(ref, _apply(pre, images, ours)) < 1e-5


def test_merged_fine_tune_matches_the_factored_model(tmp_path):
  """Hydra trained on a ViT: merge, export; transformers == the activation-level adapters."""
  pre = _pretrained(seed=3, pool="tok+gap", layer_scale=True)
  spec = adapters.AdapterSpec(kind="hydra")
  factors = adapters.init(spec, pre.params, jax.random.key(0))
  rng = np.random.default_rng(4)  # as if trained: every factor non-zero
  factors = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.3, factors)
  merged = checkpoints.Pretrained(adapters.merge(pre.params, factors, spec), pre.model,
                                  pre.mean, pre.std, "merged")
  checkpoints.save_hf(tmp_path / "hf", merged)
  images = _images()
  factored, _ = adapters.apply_intercepted(checkpoints.build_model(pre), pre.params, factors,
                                           spec, images)
  torch_logits = _torch(_load_torch(tmp_path / "hf", "Dinov2ForImageClassification"), images)
  assert _rel(torch_logits.logits, factored) < 1e-5


def test_preprocessor_config_normalises_like_the_model(tmp_path):
  """transformers' image processor on uint8 images == the ViT's own uint8 normalisation."""
  pre = _pretrained(seed=5)
  checkpoints.save_hf(tmp_path / "hf", pre)
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
  images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  model = _load_torch(tmp_path / "hf", "ViTForImageClassification")
  with torch.no_grad():
    logits = model(pixel_values=pixels).logits
  assert _rel(logits, _apply(pre, images)) < 1e-5


def test_bfloat16_export_and_replacing_an_export(tmp_path):
  pre = _pretrained(seed=6)
  out = tmp_path / "hf"
  checkpoints.save_hf(out, pre)
  checkpoints.save_hf(out, pre, dtype="bfloat16")  # replaces the earlier export in place
  assert sorted(p.name for p in out.iterdir()) == sorted(hf_export.FILES)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
  back = checkpoints.load(out)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32),
                         pre.params)
  np.testing.assert_array_equal(back.params["head"]["kernel"], rounded["head"]["kernel"])
  assert _rel(_apply(back, _images()), _apply(checkpoints.Pretrained(
      rounded, pre.model, MEAN, STD, ""), _images())) < 1e-5


@pytest.mark.parametrize("fields,has_head,match", [
    (dict(pool="map", class_token=False), True, "pools like pool='map'"),
    (dict(pool="gap"), True, "pool='gap' \\(with a class token\\)"),
    (dict(pool="tok", representation_size=8), True, "pre_logits"),
    (dict(pool="map"), False, "MAP head over a class-token model"),
])
def test_models_without_a_transformers_class_are_refused(fields, has_head, match):
  model = dict(dict(class_token=True, representation_size=None, layer_scale=False), **fields)
  with pytest.raises(ValueError, match=match):
    hf_export.target(model, has_head=has_head)


def test_bad_arguments_name_the_problem(tmp_path):
  pre = _pretrained(seed=7)
  with pytest.raises(ValueError, match="labels has 2 names; the head has 3 classes"):
    checkpoints.save_hf(tmp_path / "a", pre, labels=["x", "y"])
  with pytest.raises(ValueError, match="labels has repeated names"):
    checkpoints.save_hf(tmp_path / "a", pre, labels=["x", "y", "x"])
  with pytest.raises(ValueError, match="the model has no classification head"):
    checkpoints.save_hf(tmp_path / "a", _pretrained(seed=7, num_classes=None), labels=["x"])
  with pytest.raises(ValueError, match="unknown dtype 'int8'"):
    checkpoints.save_hf(tmp_path / "a", pre, dtype="int8")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a Hugging Face export"):
    checkpoints.save_hf(tmp_path / "mine", pre)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file; expected a directory"):
    checkpoints.save_hf(tmp_path / "file", pre)


def test_export_cli_converts_a_checkpoint(tmp_path):
  pre = _pretrained(seed=8, pool="tok+gap", layer_scale=True)
  checkpoints.save(tmp_path / "merged.safetensors", pre)
  export.main([str(tmp_path / "merged.safetensors"), "--hf", str(tmp_path / "hf"),
               "--labels", "cat,dog,bird"])
  model = _load_torch(tmp_path / "hf", "Dinov2ForImageClassification")
  assert model.config.id2label[2] == "bird"
  images = _images()
  assert _rel(_torch(model, images).logits, _apply(pre, images)) < 1e-5
