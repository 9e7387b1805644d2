"""Hugging Face export: transformers (PyTorch) loads what ``save_hf`` writes and computes what the
ViT computes; hydra_jax reads it back; models without a transformers counterpart are refused.
PEFT: LoRA adapters written by ``save_peft`` load onto that model and compute what hydra_jax's
adapters compute; adapters PEFT saves, ``load_peft`` reads back."""

import json
import re

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from lora_runs import as_if_trained, finished_lora_run
from safetensors.numpy import load_file, save_file

from hydra_jax import adapters, checkpoints, export
from hydra_jax.checkpoints import hf_export, peft_lora
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
    "dinov2_registers": (dict(pool="tok+gap", layer_scale=True, num_registers=4),
                         "Dinov2WithRegistersForImageClassification"),
    # timm's fc_norm over the class token: the final norm on every token computes the same
    "vit_fc_norm_over_the_class_token": (dict(pool="tok", fc_norm=True),
                                         "ViTForImageClassification"),
    "siglip": (dict(pool="gap", class_token=False, gelu_approximate=True),
               "SiglipForImageClassification"),
    # quick GELU without CLIP's pre-norm: every family takes hidden_act="quick_gelu"
    "vit_quick_gelu": (dict(pool="tok", quick_gelu=True), "ViTForImageClassification"),
    "dinov2_quick_gelu": (dict(pool="tok+gap", quick_gelu=True), "Dinov2ForImageClassification"),
    # DINOv2 giant's MLP: use_swiglu_ffn with mlp_ratio 3 (96 * 2/3 = 64 hidden units)
    "dinov2_swiglu": (dict(pool="tok+gap", layer_scale=True, swiglu=True),
                      "Dinov2ForImageClassification"),
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
    "dinov2_registers": (dict(pool="tok", num_registers=2), "Dinov2WithRegistersModel",
                         ("encode", "last_hidden_state")),
    "vit_pre_logits": (dict(pool="tok", representation_size=24), "ViTModel",
                       ("features", "pooler_output")),
    "swiglu_without_layer_scale": (dict(pool="tok", swiglu=True, mlp_dim=48), "Dinov2Model",
                                   ("encode", "last_hidden_state")),
}


@pytest.mark.parametrize("case", sorted(BACKBONES))
def test_backbone_matches_transformers(case, tmp_path):
  fields, arch, (ours, theirs) = BACKBONES[case]
  pre = _pretrained(seed=len(case), num_classes=None, **fields)
  assert checkpoints.save_hf(tmp_path / "hf", pre) == arch
  images = _images()
  ref = getattr(_torch(_load_torch(tmp_path / "hf", arch), images), theirs)
  assert _rel(ref, _apply(pre, images, ours)) < 1e-5


@pytest.mark.parametrize("fields,arch", [(dict(pool="gap"), "ViTModel"),
                                         (dict(pool="tok+gap", layer_scale=True), "Dinov2Model"),
                                         (dict(pool="tok"), "ViTModel")])
def test_a_headless_export_keeps_its_pooling(fields, arch, tmp_path):
  """transformers' headless classes pool nothing: config.json records the pool the features
  were trained on, and loading it back pools the same (it read "tok" before)."""
  pre = _pretrained(seed=5, num_classes=None, **fields)
  assert checkpoints.save_hf(tmp_path / "hf", pre) == arch
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["hydra_jax_pool"] == fields["pool"]
  back = checkpoints.load(tmp_path / "hf")
  assert back.model["pool"] == fields["pool"]
  images = _images()
  assert _rel(_apply(back, images, "features"), _apply(pre, images, "features")) < 1e-5
  assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").hydra_jax_pool == fields[
      "pool"]  # transformers keeps the key (and ignores it)
  assert checkpoints.load(tmp_path / "hf", pool="tok").model["pool"] == "tok"  # still chosen


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


def test_a_non_square_vit_exports_with_its_image_size(tmp_path):
  """transformers' ViT takes image_size [H, W]; DINOv2 reads its grid square, so it refuses."""
  pre = _pretrained(seed=9, pool="tok", posemb_grid=(2, 8))
  checkpoints.save_hf(tmp_path / "hf", pre)
  model = _load_torch(tmp_path / "hf", "ViTForImageClassification")
  assert list(model.config.image_size) == [8, 32]
  images = np.random.default_rng(3).integers(0, 256, (2, 8, 32, 3), dtype=np.uint8)
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  assert tuple(pixels.shape[2:]) == (8, 32)
  with torch.no_grad():
    logits = model(pixel_values=pixels).logits
  assert _rel(logits, _apply(pre, images)) < 1e-5
  assert tuple(checkpoints.load(tmp_path / "hf").model["posemb_grid"]) == (2, 8)
  dino = _pretrained(seed=9, pool="tok+gap", posemb_grid=(2, 8))
  with pytest.raises(ValueError, match="transformers' dinov2 configs take a square image_size"):
    checkpoints.save_hf(tmp_path / "dino", dino)


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
    (dict(pool="tok", num_registers=4), True, "register tokens exist in transformers only in"),
    (dict(pool="gap", class_token=False, fc_norm=True), True, "fc_norm .* pool='gap'.* timm"),
    (dict(pool="tok", swiglu=True), True, "SwiGLU MLPs exist in transformers only in DINOv2"),
])
def test_models_without_a_transformers_class_are_refused(fields, has_head, match):
  model = dict(dict(class_token=True, representation_size=None, layer_scale=False), **fields)
  with pytest.raises(ValueError, match=match):
    hf_export.target(model, has_head=has_head)


def test_bad_arguments_name_the_problem(tmp_path):
  pre = _pretrained(seed=7)
  with pytest.raises(ValueError, match="none gives this model's 40 at width 32"):
    checkpoints.save_hf(tmp_path / "a", _pretrained(7, pool="tok+gap", swiglu=True, mlp_dim=40))
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
  with pytest.raises(FileExistsError, match="besides an export"):
    checkpoints.save_hf(tmp_path / "mine", pre)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file; expected a directory"):
    checkpoints.save_hf(tmp_path / "file", pre)
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  checkpoints.save_hf(tmp_path / "link", pre)  # written where the link points; the link stays
  assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "config.json").is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_cli_converts_a_checkpoint(tmp_path):
  pre = _pretrained(seed=8, pool="tok+gap", layer_scale=True)
  checkpoints.save(tmp_path / "merged.safetensors", pre)
  export.main([str(tmp_path / "merged.safetensors"), "--hf", str(tmp_path / "hf"),
               "--labels", "cat,dog,bird"])
  model = _load_torch(tmp_path / "hf", "Dinov2ForImageClassification")
  assert model.config.id2label[2] == "bird"
  images = _images()
  assert _rel(_torch(model, images).logits, _apply(pre, images)) < 1e-5


# --- PEFT LoRA ---------------------------------------------------------------------------------

_EVERY_LINEAR = (r"Transformer/encoderblock_\d+/"
                 r"(MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_(0|1))",)


def _lora_run(pre, spec, seed: int):
  """(trainable, hydra_jax logits) of LoRA adapters and a head trained on ``pre``; block 0's
  value layer has half the rank (as after ``adapters.add``: PEFT's ``rank_pattern``)."""
  trainable = as_if_trained({"adapters": adapters.init(spec, pre.params, jax.random.key(seed)),
                             "params": {"head": pre.params["head"]}}, seed)
  value = trainable["adapters"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"][
      "value"]
  half = spec.rank // 2
  value["A"], value["B"] = value["A"][:, :half], value["B"][:half]
  if "a" in value:  # the bias after A
    value["a"] = value["a"][:half]
  params = {**pre.params, "head": trainable["params"]["head"]}
  logits, _ = adapters.apply_intercepted(checkpoints.build_model(pre), params,
                                         trainable["adapters"], spec, _images())
  return trainable, np.asarray(logits)


def _peft_logits(base_dir, lora_dir, arch: str):
  model = peft.PeftModel.from_pretrained(_load_torch(base_dir, arch), lora_dir).eval()
  return _torch(model, _images()).logits


PEFT_CASES = {  # ViT fields, the spec's targets and bias
    "vit": (dict(pool="tok"), None, False),
    "vit_layer_scale_folded_bias": (dict(pool="tok", layer_scale=True), _EVERY_LINEAR, True),
    "dinov2": (dict(pool="tok+gap", layer_scale=True), _EVERY_LINEAR, False),
    "vit_fc_norm_over_the_class_token": (dict(pool="tok", fc_norm=True), None, False),
    "dinov2_registers": (dict(pool="tok+gap", layer_scale=True, num_registers=3), None, True),
    "siglip": (dict(pool="gap", class_token=False, gelu_approximate=True), _EVERY_LINEAR, True),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_export_computes_the_factored_model(case, tmp_path):
  """peft on the save_hf model == hydra_jax's activation-level LoRA; load_peft reads it back."""
  fields, targets, bias = PEFT_CASES[case]
  pre = _pretrained(seed=len(case), **fields)
  spec = adapters.AdapterSpec(kind="lora", targets=targets, rank=4, alpha=6.0, bias=bias)
  trainable, ours = _lora_run(pre, spec, seed=1)
  checkpoints.save_hf(tmp_path / "base", pre)
  arch = checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre)
  assert _rel(_peft_logits(tmp_path / "base", tmp_path / "lora", arch), ours) < 1e-5
  # read back onto the exported base (where save_hf folded LayerScale, lora_B carries it too)
  base = checkpoints.load(tmp_path / "base")
  back, back_spec = checkpoints.load_peft(tmp_path / "lora", base)
  assert back_spec.scaling == spec.scaling and back_spec.bias == bias
  np.testing.assert_array_equal(back["params"]["head"]["kernel"],
                                trainable["params"]["head"]["kernel"])
  again, _ = adapters.apply_intercepted(checkpoints.build_model(base),
                                        {**base.params, **back["params"]}, back["adapters"],
                                        back_spec, _images())
  assert _rel(again, ours) < 1e-5
  # and onto the hydra_jax base it was exported from (a folded LayerScale comes back out of B)
  back, back_spec = checkpoints.load_peft(tmp_path / "lora", pre)
  again, _ = adapters.apply_intercepted(checkpoints.build_model(pre),
                                        {**pre.params, **back["params"]}, back["adapters"],
                                        back_spec, _images())
  assert _rel(again, ours) < 1e-5


def test_peft_on_siglips_map_head(tmp_path):
  """The MAP head's MLP adapts; its out_proj (inside torch's MultiheadAttention, which never runs
  a LoRA there) is refused both ways; a saved MAP head (modules_to_save) reads back."""
  pre = _pretrained(seed=16, num_classes=None, pool="map", class_token=False,
                    gelu_approximate=True)
  mlp = adapters.AdapterSpec(kind="lora", targets=(r"Transformer/.*/query",
                                                  r"MAPHead_0/MlpBlock_0/Dense_.*"))
  factors = as_if_trained(adapters.init(mlp, pre.params, jax.random.key(0)), 5)
  ours, _ = adapters.apply_intercepted(checkpoints.build_model(pre), pre.params, factors, mlp,
                                       _images(), method="features")
  checkpoints.save_hf(tmp_path / "base", pre)
  arch = checkpoints.save_peft(tmp_path / "lora", {"adapters": factors}, mlp, pre)
  model = peft.PeftModel.from_pretrained(_load_torch(tmp_path / "base", arch), tmp_path / "lora")
  assert _rel(_torch(model.eval(), _images()).pooler_output, ours) < 1e-5
  out = adapters.AdapterSpec(kind="lora", targets=(r"MAPHead_0/.*/out",))
  with pytest.raises(ValueError, match="MAPHead_0/MultiHeadDotProductAttention_0/out has no "
                     "torch.nn.Linear in transformers' SiglipVisionModel that PEFT's LoRA runs"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": adapters.init(
        out, pre.params, jax.random.key(0))}, out, pre)
  config = peft.LoraConfig(r=2, target_modules=["q_proj", "out_proj"], init_lora_weights=False)
  model = peft.get_peft_model(_load_torch(tmp_path / "base", arch), config)
  model.save_pretrained(tmp_path / "theirs")
  with pytest.raises(ValueError, match="LoRA on MAPHead_0/MultiHeadDotProductAttention_0/out is "
                     "not supported: torch's MultiheadAttention"):
    checkpoints.load_peft(tmp_path / "theirs", pre)
  config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"],
                           init_lora_weights=False)
  model = peft.get_peft_model(_load_torch(tmp_path / "base", arch), config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "modules_to_save" in name:
        param.normal_(0, 0.3)
  model.save_pretrained(tmp_path / "theirs")
  theirs = _torch(model.eval(), _images()).pooler_output
  trainable, spec = checkpoints.load_peft(tmp_path / "theirs", pre)
  assert set(trainable["params"]) == {"MAPHead_0"}
  ours, _ = adapters.apply_intercepted(checkpoints.build_model(pre),
                                       {**pre.params, **trainable["params"]},
                                       trainable["adapters"], spec, _images(), method="features")
  assert _rel(ours, theirs) < 1e-5


CLIP = dict(pre_norm=True, quick_gelu=True, pool="tok", ln_eps=1e-5)


@pytest.mark.parametrize("fields,num_classes", [
    (dict(CLIP, fc_norm=True), 5),  # the projection: CLIPVisionModelWithProjection
    (dict(CLIP, layer_scale=True), None),  # final norm on every token, LayerScale folded
    (dict(CLIP, quick_gelu=False, gelu_approximate=True), None),  # tanh GELU (timm's CLIPs)
])
def test_clip_exports_compute_the_vits_function(fields, num_classes, tmp_path):
  """CLIP's classes: class_embedding, an nn.Embedding position table (the random patch-embedding
  bias folded into the patches' rows), pre_layrnorm, post_layernorm on the pooled class token,
  visual_projection; transformers loads every tensor and computes the ViT's features or head."""
  pre = _pretrained(seed=21, num_classes=num_classes, **fields)
  if num_classes:  # a projection has no bias
    pre.params["head"]["bias"] = np.zeros_like(pre.params["head"]["bias"])
  arch = checkpoints.save_hf(tmp_path / "out", pre)
  assert arch == ("CLIPVisionModelWithProjection" if num_classes else "CLIPVisionModel")
  outputs = _torch(_load_torch(tmp_path / "out", arch), _images())
  theirs = outputs.image_embeds if num_classes else outputs.pooler_output
  assert _rel(theirs, _apply(pre, _images())) < 1e-5  # without a head: the features
  back = checkpoints.load(tmp_path / "out")  # and it reads back as the same function
  assert _rel(_apply(back, _images()), _apply(pre, _images())) < 1e-5


@pytest.mark.parametrize("fields,num_classes,match", [
    (CLIP, 3, "transformers' CLIP has no classifier over the pooled class token"),
    (dict(CLIP, pool="gap", class_token=False), None, "only in CLIP.*\\(got class_token=False, "
                                                      "pool='gap'.* export to timm"),
    (dict(CLIP, num_registers=2), None, "got class_token=True, pool='tok', num_registers=2"),
])
def test_clip_models_transformers_cannot_hold_are_refused(fields, num_classes, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    checkpoints.save_hf(tmp_path / "out", _pretrained(seed=22, num_classes=num_classes, **fields))
  assert not (tmp_path / "out").exists()


def test_export_cli_writes_a_fine_tuned_clips_features_with_no_head(tmp_path, capsys):
  """A CLIP classifier has no transformers class: refused, naming --no-head, which writes the
  tower without the head (features; CLIPVisionModel)."""
  pre = _pretrained(seed=24, num_classes=3, **CLIP)
  checkpoints.save(tmp_path / "merged.safetensors", pre)
  args = [str(tmp_path / "merged.safetensors"), "--hf", str(tmp_path / "hf")]
  with pytest.raises(SystemExit):
    export.main(args)
  assert "--no-head" in capsys.readouterr().err
  export.main([*args, "--no-head"])
  model = _load_torch(tmp_path / "hf", "CLIPVisionModel")
  assert _rel(_torch(model, _images()).pooler_output,
              _apply(pre, _images(), method="features")) < 1e-5
  with pytest.raises(SystemExit):
    export.main([str(tmp_path), "--peft", str(tmp_path / "p"), "--no-head"])
  assert "--no-head applies to --hf / --timm / --npz" in capsys.readouterr().err


def test_peft_for_transformers_clip_is_refused_naming_timm(tmp_path):
  pre = _pretrained(seed=23, num_classes=None, **CLIP)
  spec = adapters.AdapterSpec(kind="lora")
  trainable = {"adapters": as_if_trained(adapters.init(spec, pre.params, jax.random.key(0)), 2)}
  with pytest.raises(ValueError, match="PEFT adapters for transformers' CLIP classes are not "
                                       "written.*target='timm'"):
    checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre)
  assert checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre, target="timm")


def test_load_peft_of_a_two_tower_clip_keeps_the_image_towers_lora(tmp_path, caplog):
  """PEFT's LoRA on both towers of a CLIPModel (q_proj, v_proj match in each): the image
  tower's computes PEFT's image features; the text tower's is left out, said in a warning."""
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4)
  text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=50, bos_token_id=0,
                                     eos_token_id=1)
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)).eval()
  model.save_pretrained(tmp_path / "base")
  config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
  model = peft.get_peft_model(model, config)
  model.save_pretrained(tmp_path / "lora")
  images = _images()
  with torch.no_grad():
    theirs = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  theirs = getattr(theirs, "pooler_output", theirs)  # transformers 5 returns an output object
  pre = checkpoints.load(tmp_path / "base")
  trainable, spec = checkpoints.load_peft(tmp_path / "lora", pre)
  assert len(spec.targets) == 4  # query and value of the two vision blocks
  assert "4 tensors of the text tower left out" in caplog.text
  ours, _ = adapters.apply_intercepted(checkpoints.build_model(pre), pre.params,
                                       trainable["adapters"], spec, images)
  assert _rel(ours, theirs) < 1e-5


def test_load_peft_reads_what_peft_saves_in_either_naming(tmp_path):
  """An adapter made by peft itself (per-layer ranks, rsLoRA, bias) == load_peft in hydra_jax."""
  pre = _pretrained(seed=11)
  checkpoints.save_hf(tmp_path / "base", pre)
  torch.manual_seed(0)
  config = peft.LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj", "fc2"],
                           rank_pattern={"fc2": 2}, use_rslora=True, lora_bias=True,
                           modules_to_save=["classifier"], init_lora_weights=False)
  model = peft.get_peft_model(_load_torch(tmp_path / "base", "ViTForImageClassification"), config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_B.bias" in name or "modules_to_save" in name:
        param.normal_(0, 0.3)
  model.eval().save_pretrained(tmp_path / "lora")
  theirs = _torch(model, _images()).logits
  trainable, spec = checkpoints.load_peft(tmp_path / "lora", pre)
  fc2 = trainable["adapters"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_1"]
  assert fc2["A"].shape == (64, 2) and spec.bias and len(spec.targets) == 6
  ours, _ = adapters.apply_intercepted(checkpoints.build_model(pre),
                                       {**pre.params, **trainable["params"]},
                                       trainable["adapters"], spec, _images())
  assert _rel(ours, theirs) < 1e-5
  # the same adapter under transformers 4's module names (the hub files' names) reads the same
  legacy = {}
  for key, value in load_file(tmp_path / "lora" / "adapter_model.safetensors").items():
    module = re.sub(r"\.(lora_[AB]\.(weight|bias)|weight|bias)$", "", key)
    path = peft_lora._vit_module(module.removeprefix("base_model.model."), key)
    old = peft_lora.module_name(path, "vit", "ViTForImageClassification", (4, 57))
    legacy["base_model.model." + old + key[len(module):]] = value
  assert "base_model.model.vit.encoder.layer.1.output.dense.lora_A.weight" in legacy
  save_file(legacy, tmp_path / "lora" / "adapter_model.safetensors")
  again, _ = checkpoints.load_peft(tmp_path / "lora", pre)
  jax.tree.map(np.testing.assert_array_equal, again, trainable)


def test_load_peft_of_unprefixed_names_reads_them_as_the_headless_class(tmp_path):
  """Names without "vit." / "dinov2." come from ViTModel / Dinov2Model, whatever head the base
  they are loaded onto has (a LayerScale model with a head exports to the ViT class, which
  folds LayerScale into out's lora_B: it was divided out of B here)."""
  pre = _pretrained(seed=13, num_classes=None, pool="tok", layer_scale=True)
  spec = adapters.AdapterSpec(  # attention only: DINOv2's MLP names would tell the family
      kind="lora", targets=(r"Transformer/.*/(query|value|out)",), rank=2)
  trainable = {"adapters": as_if_trained(adapters.init(spec, pre.params, jax.random.key(0)), 2)}
  arch = checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre,
                               transformers_version="5.17.0")
  config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
  assert arch == "Dinov2Model" and "encoder.layer.1.attention.attention.query" in config[
      "target_modules"]
  headed = _pretrained(seed=13, num_classes=3, pool="tok", layer_scale=True)
  model = {**peft_lora.ARCHITECTURE_DEFAULTS, **headed.model}
  assert hf_export.target(model, has_head=True)[0] == "vit"
  for base in (pre, headed):
    back, _ = checkpoints.load_peft(tmp_path / "lora", base)
    jax.tree.map(np.testing.assert_array_equal, back["adapters"], trainable["adapters"])


@pytest.mark.parametrize("fields,arch,version,name", [
    (dict(pool="tok"), "ViTForImageClassification", "5.8.0",
     "vit.encoder.layer.1.attention.attention.query"),
    (dict(pool="tok"), "ViTForImageClassification", "5.9.0", "vit.layers.1.attention.q_proj"),
    (dict(pool="tok+gap"), "Dinov2ForImageClassification", "5.17.0",
     "dinov2.encoder.layer.1.attention.attention.query"),
    (dict(pool="tok+gap"), "Dinov2ForImageClassification", "5.18.0",
     "dinov2.encoder.layer.1.attention.q_proj"),
    (dict(pool="map", class_token=False), "SiglipVisionModel", "5.5.0",
     "vision_model.encoder.layers.1.self_attn.q_proj"),
    (dict(pool="map", class_token=False), "SiglipVisionModel", "5.6.0",
     "encoder.layers.1.self_attn.q_proj"),
])
def test_peft_module_names_follow_the_transformers_version(fields, arch, version, name, tmp_path):
  """Names as each version's modeling code defines them (read from the released sources)."""
  pre = _pretrained(seed=12, num_classes=None if arch == "SiglipVisionModel" else 3, **fields)
  spec = adapters.AdapterSpec(kind="lora")
  trainable = {"adapters": as_if_trained(adapters.init(spec, pre.params, jax.random.key(0)), 2)}
  assert checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre,
                               transformers_version=version) == arch
  config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
  assert name in config["target_modules"] and config["modules_to_save"] is None
  keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
  assert f"base_model.model.{name}.lora_B.weight" in keys
  back, _ = checkpoints.load_peft(tmp_path / "lora", pre)
  jax.tree.map(np.testing.assert_array_equal, back["adapters"], trainable["adapters"])


def test_peft_export_refuses_what_peft_cannot_hold(tmp_path):
  pre = _pretrained(seed=13)
  hydra = adapters.AdapterSpec(kind="hydra")
  with pytest.raises(ValueError, match="PEFT has no 'hydra' adapter"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": adapters.init(
        hydra, pre.params, jax.random.key(0))}, hydra, pre)
  lora = adapters.AdapterSpec(kind="lora")
  factors = adapters.init(lora, pre.params, jax.random.key(0))
  norm = {"Transformer": {"encoder_norm": pre.params["Transformer"]["encoder_norm"]}}
  with pytest.raises(ValueError, match=r"trained params \['Transformer/encoder_norm'\]"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": factors, "params": norm}, lora, pre)
  conv = adapters.AdapterSpec(kind="lora", targets=("embedding",))
  with pytest.raises(ValueError, match="layer embedding has no torch.nn.Linear"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": adapters.init(
        conv, pre.params, jax.random.key(0))}, conv, pre)
  with pytest.raises(ValueError, match="not a version like"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": factors}, lora, pre,
                          transformers_version="latest")
  swiglu = _pretrained(seed=13, pool="tok+gap", swiglu=True)
  mlp = adapters.AdapterSpec(kind="lora", targets=(r"Transformer/.*/MlpBlock_0/Dense_1",))
  with pytest.raises(ValueError, match="SwiGLU MLP's layers differently.*target='timm'"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": adapters.init(
        mlp, swiglu.params, jax.random.key(0))}, mlp, swiglu)
  with pytest.raises(ValueError, match="the adapters tree is empty \\(a trained head alone: "
                                       "export the merged model"):
    checkpoints.save_peft(tmp_path / "x", {"adapters": {}, "params": {
        "head": pre.params["head"]}}, lora, pre)
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, "use_dora=True is not supported"),
    ("bias", "all", "bias='all' is not supported"),
    ("peft_type", "IA3", "peft_type='IA3' is not supported"),
    ("alpha_pattern", {"query": 2}, "alpha_pattern=\\{'query': 2\\} is not supported"),
    ("use_bdlora", {"nblocks": 2}, "use_bdlora=.* is not supported"),
    ("kasa_config", {"x": 1}, "kasa_config=.* is not supported"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4' rewrites the base"),
    ("init_lora_weights", "olora", "init_lora_weights='olora' rewrites the base"),
    ("lora_alpha", 0, "lora_alpha=0 scales every update to zero"),
])
def test_load_peft_refuses_options_it_does_not_compute(field, value, match, tmp_path):
  pre = _pretrained(seed=14)
  spec = adapters.AdapterSpec(kind="lora")
  checkpoints.save_peft(tmp_path / "lora", {"adapters": adapters.init(
      spec, pre.params, jax.random.key(0))}, spec, pre)
  path = tmp_path / "lora" / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
  with pytest.raises(ValueError, match=match):
    checkpoints.load_peft(tmp_path / "lora", pre)


def test_load_peft_names_tensors_that_are_not_lora(tmp_path):
  pre = _pretrained(seed=17)
  spec = adapters.AdapterSpec(kind="lora")
  checkpoints.save_peft(tmp_path / "lora", {"adapters": adapters.init(
      spec, pre.params, jax.random.key(0))}, spec, pre)
  path = tmp_path / "lora" / "adapter_model.safetensors"
  tensors = load_file(path)
  key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
  save_file({**tensors, key.replace("lora_A.weight", "velora_A"): np.zeros(4, np.float32)}, path)
  with pytest.raises(ValueError, match="velora_A is neither a LoRA factor"):
    checkpoints.load_peft(tmp_path / "lora", pre)


def test_load_peft_names_a_base_that_does_not_fit(tmp_path):
  pre = _pretrained(seed=15)
  spec = adapters.AdapterSpec(kind="lora")
  trainable, _ = _lora_run(pre, spec, seed=3)
  checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre)
  wider = _pretrained(seed=15, width=48, num_heads=4)
  with pytest.raises(ValueError, match="encoderblock_0/MultiHeadDotProductAttention_0/query: "
                     "lora factor A has shape"):
    checkpoints.load_peft(tmp_path / "lora", wider)
  with pytest.raises(ValueError, match="head/(kernel|bias) .* does not fit the base"):
    checkpoints.load_peft(tmp_path / "lora", _pretrained(seed=15, num_classes=5))
  with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
    checkpoints.load_peft(tmp_path, pre)


def test_export_cli_writes_a_lora_run_for_peft(tmp_path, capsys):
  """A run's workdir -> base/ + lora/; peft computes what the run's adapters compute."""
  base, trainable, spec = finished_lora_run(tmp_path / "run", seed=4)
  ours, _ = adapters.apply_intercepted(checkpoints.build_model(base),
                                       {**base.params, **trainable["params"]},
                                       trainable["adapters"], spec, _images())
  export.main([str(tmp_path / "run"), "--peft", str(tmp_path / "peft"), "--labels",
               ",".join(f"c{i}" for i in range(10))])
  assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["base", "lora"]
  theirs = _peft_logits(tmp_path / "peft" / "base", tmp_path / "peft" / "lora",
                        "ViTForImageClassification")
  assert _rel(theirs, ours) < 1e-5
  config = json.loads((tmp_path / "peft" / "base" / "config.json").read_text())
  assert config["id2label"]["9"] == "c9"
  # the pair is replaced whole or not at all: a user's file inside it is never lost
  (tmp_path / "peft" / "base" / "NOTES.md").write_text("mine")
  before = (tmp_path / "peft" / "lora" / "adapter_model.safetensors").read_bytes()
  with pytest.raises(SystemExit):  # the CLI says why, without a traceback
    export.main([str(tmp_path / "run"), "--peft", str(tmp_path / "peft")])
  assert "base/NOTES.md" in capsys.readouterr().err
  assert (tmp_path / "peft" / "base" / "NOTES.md").read_text() == "mine"
  assert (tmp_path / "peft" / "lora" / "adapter_model.safetensors").read_bytes() == before
  for run, message in [(tmp_path / "nowhere", "is not a run directory (no config.json)"),
                       (tmp_path / "run", "is not a finished run with exported adapters")]:
    (tmp_path / "run" / "export" / "adapters.safetensors").unlink(missing_ok=True)
    with pytest.raises(SystemExit):
      export.main([str(run), "--peft", str(tmp_path / "peft2")])
    assert message in capsys.readouterr().err
