"""Checkpoint loaders against independent references (Hugging Face torch models), strict checks,
head / posemb options, the native round trip and the parameter-count table."""

import copy
import dataclasses
import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from hydra_jax import checkpoints, export
from hydra_jax.models import PATCHES, SIZES, ViT, param_count, variant

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)
PUBLISHED = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632,
             "H/14": 632_045_800}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (layer norms and layer scales included) so each one matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return model.eval()


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch(model, images, **kw):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), **kw)


def _apply(pretrained, images, method=None):
  model = checkpoints.build_model(pretrained)
  return np.asarray(model.apply({"params": pretrained.params}, images, method=method))


def _save_hf(model, path):
  model.save_pretrained(path)
  return path


# ---------------------------------------------------------------- Hugging Face ViT and DINOv2


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  config = transformers.ViTConfig(intermediate_size=128, **TINY)
  model = _randomise(transformers.ViTModel(config), seed=1)
  return model, _save_hf(model, tmp_path_factory.mktemp("hf_vit"))


def test_hf_vit_matches_torch(hf_vit):
  model, path = hf_vit
  pretrained = checkpoints.load(path)
  assert pretrained.model["ln_eps"] == 1e-12 and not pretrained.model["gelu_approximate"]
  assert pretrained.mean == (0.5, 0.5, 0.5) and pretrained.model["representation_size"] == 64
  images = _images(16)
  ref = _torch(model, images)
  assert _rel(_apply(pretrained, images, "encode"), ref.last_hidden_state) < 1e-5
  # ViTModel's pooler (tanh dense on the class token) is the ViT's pre_logits.
  assert _rel(_apply(pretrained, images, "features"), ref.pooler_output) < 1e-5


def test_hf_vit_classifier_with_prefix(tmp_path):
  config = transformers.ViTConfig(intermediate_size=128, num_labels=5, **TINY)
  model = _randomise(transformers.ViTForImageClassification(config), seed=2)
  path = _save_hf(model, tmp_path)
  assert any(k.startswith("vit.") for k in load_file(str(path / "model.safetensors")))
  pretrained = checkpoints.load(path / "model.safetensors")  # the file works as well as its dir
  images = _images(16)
  assert _rel(_apply(pretrained, images), _torch(model, images).logits) < 1e-5
  (path / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
  pretrained = checkpoints.load(path)
  assert (pretrained.mean, pretrained.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  (path / "preprocessor_config.json").write_text(  # pixels in [0, 1], not normalised
      json.dumps({"do_normalize": False, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4] * 3}))
  pretrained = checkpoints.load(path)
  assert (pretrained.mean, pretrained.std) == ((0.0,) * 3, (1.0,) * 3)
  (path / "preprocessor_config.json").write_text(  # one number for every channel
      json.dumps({"image_mean": 0.5, "image_std": [0.25, 0.5, 1]}))
  pretrained = checkpoints.load(path)
  assert (pretrained.mean, pretrained.std) == ((0.5,) * 3, (0.25, 0.5, 1.0))
  for fields in ({"image_mean": [0.5, 0.5], "image_std": 0.5}, {"image_mean": 0.5,
                                                                 "image_std": "0.5"}):
    (path / "preprocessor_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: image_(mean|std)=.*; "
                                         r"expected a number or 3 numbers \(RGB\)"):
      checkpoints.load(path)
  for fields in ({"rescale_factor": 1.0}, {"do_rescale": False}):
    (path / "preprocessor_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="hydra_jax scales uint8 pixels to \\[0, 1\\]"):
      checkpoints.load(path)
  (path / "preprocessor_config.json").unlink()
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
  with pytest.raises(ValueError, match="unsupported MLP.*'relu'"):
    checkpoints.load(path)


@pytest.fixture(scope="module")
def hf_dino(tmp_path_factory):
  config = transformers.Dinov2Config(mlp_ratio=2, **TINY)
  model = _randomise(transformers.Dinov2Model(config), seed=3)
  return model, _save_hf(model, tmp_path_factory.mktemp("hf_dino"))


@pytest.mark.parametrize("size", [16, 24])  # native grid, and HF's bicubic interpolation to 6x6
def test_hf_dinov2_matches_torch(hf_dino, size):
  model, path = hf_dino
  pretrained = checkpoints.load(path)
  assert pretrained.model["layer_scale"] and pretrained.model["ln_eps"] == 1e-6
  assert pretrained.model["posemb_resample"] == "bicubic"
  assert pretrained.mean == checkpoints.common.IMAGENET_MEAN
  assert "mask_token" not in pretrained.params
  images = _images(size)
  ref = _torch(model, images).last_hidden_state
  assert _rel(_apply(pretrained, images, "encode"), ref) < 1e-5
  resampled = checkpoints.load(path, image_size=size)  # resampled once at load time
  assert resampled.model["posemb_grid"] == (size // 4, size // 4)
  assert _rel(_apply(resampled, images, "encode"), ref) < 1e-5


def test_hf_dinov2_giant_swiglu_matches_torch(tmp_path):
  """DINOv2 giant's MLP (use_swiglu_ffn): the file packs [gate, value] in weights_in; 256 * 2/3
  rounded up to a multiple of 8 gives 176 hidden units."""
  config = transformers.Dinov2Config(mlp_ratio=4, use_swiglu_ffn=True, num_labels=3, **TINY)
  model = _randomise(transformers.Dinov2ForImageClassification(config), seed=5)
  path = _save_hf(model, tmp_path)
  assert any(".mlp.weights_in." in k for k in load_file(str(path / "model.safetensors")))
  pretrained = checkpoints.load(path)
  assert pretrained.model["swiglu"] and pretrained.model["mlp_dim"] == 176
  images = _images(16)
  assert _rel(_apply(pretrained, images), _torch(model, images).logits) < 1e-5
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(config, use_swiglu_ffn=False)))
  with pytest.raises(ValueError, match="use_swiglu_ffn=False but the MLP weights are packed"):
    checkpoints.load(path)


def test_hf_dinov2_classifier_is_tok_plus_gap(tmp_path):
  config = transformers.Dinov2Config(mlp_ratio=2, num_labels=3, **TINY)
  model = _randomise(transformers.Dinov2ForImageClassification(config), seed=4)
  pretrained = checkpoints.load(_save_hf(model, tmp_path))
  assert pretrained.model["pool"] == "tok+gap"
  images = _images(16)
  assert _rel(_apply(pretrained, images), _torch(model, images).logits) < 1e-5


@pytest.mark.parametrize("size", [16, 24, 12])  # native 4x4, up to 6x6, down to 3x3
def test_hf_dinov2_with_registers_matches_torch(tmp_path, size):
  """Register tokens after the class token, without position embedding, not in the patch mean;
  at other sizes the position embedding is resampled with antialias=True, as transformers'
  registers model does (its DINOv2 without: ``test_hf_dinov2_matches_torch``)."""
  config = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_labels=3,
                                                  num_register_tokens=4, **TINY)
  model = _randomise(transformers.Dinov2WithRegistersForImageClassification(config), seed=5)
  path = _save_hf(model, tmp_path)
  pretrained = checkpoints.load(path)
  assert pretrained.model["num_registers"] == 4 and pretrained.model["pool"] == "tok+gap"
  assert pretrained.model["posemb_resample"] == "bicubic_antialias"
  assert pretrained.mean == checkpoints.common.IMAGENET_MEAN
  images = _images(size)
  ref = _torch(model, images, output_hidden_states=True)
  assert _rel(_apply(pretrained, images), ref.logits) < 1e-5
  assert _rel(_apply(pretrained, images, "encode"),
              model.dinov2_with_registers.layernorm(ref.hidden_states[-1]).detach()) < 1e-5
  resampled = checkpoints.load(path, image_size=size)  # resampled once at load time
  assert _rel(_apply(resampled, images), ref.logits) < 1e-5


# ---------------------------------------------------------------- Google and big_vision npz


@pytest.fixture(scope="module")
def google_fn(tmp_path_factory):
  """A torch ViT computing what a Google file means (tanh GELU, eps 1e-6) and its hub tensors."""
  config = transformers.ViTConfig(intermediate_size=128, hidden_act="gelu_pytorch_tanh",
                                  layer_norm_eps=1e-6, **TINY)
  model = _randomise(transformers.ViTModel(config), seed=5)
  path = _save_hf(model, tmp_path_factory.mktemp("google_fn"))
  return model, load_file(str(path / "model.safetensors"))


def _google_arrays(sd, *, big_vision=False, scan=False, gap=False) -> dict[str, np.ndarray]:
  """Writes hub tensors into the vision_transformer or big_vision npz layout (test-side mapping)."""
  heads, d = TINY["num_attention_heads"], TINY["hidden_size"]
  names = (("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
           ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
  ln0, mha, ln1, mlp = names[0] if big_vision else names[1]
  blocks = []
  for i in range(TINY["num_hidden_layers"]):
    t = lambda name: sd[f"encoder.layer.{i}.{name}"]  # noqa: B023
    b = {f"{ln0}/scale": t("layernorm_before.weight"), f"{ln0}/bias": t("layernorm_before.bias"),
         f"{ln1}/scale": t("layernorm_after.weight"), f"{ln1}/bias": t("layernorm_after.bias"),
         f"{mlp}/Dense_0/kernel": t("intermediate.dense.weight").T,
         f"{mlp}/Dense_0/bias": t("intermediate.dense.bias"),
         f"{mlp}/Dense_1/kernel": t("output.dense.weight").T,
         f"{mlp}/Dense_1/bias": t("output.dense.bias"),
         f"{mha}/out/kernel": t("attention.output.dense.weight").T.reshape(heads, -1, d),
         f"{mha}/out/bias": t("attention.output.dense.bias")}
    for n in ("query", "key", "value"):
      b[f"{mha}/{n}/kernel"] = t(f"attention.attention.{n}.weight").T.reshape(d, heads, -1)
      b[f"{mha}/{n}/bias"] = t(f"attention.attention.{n}.bias").reshape(heads, -1)
    blocks.append(b)
  if scan:
    arrays = {f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
  else:
    arrays = {f"Transformer/encoderblock_{i}/{k}": v
              for i, b in enumerate(blocks) for k, v in b.items()}
  arrays.update({
      "embedding/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
      "Transformer/encoder_norm/scale": sd["layernorm.weight"],
      "Transformer/encoder_norm/bias": sd["layernorm.bias"]})
  pos, cls = sd["embeddings.position_embeddings"], sd["embeddings.cls_token"]
  if big_vision:  # posemb on patch tokens only; the class token's row is folded into cls
    arrays["pos_embedding"] = pos[:, 1:]
    if not gap:
      arrays["cls"] = cls + pos[:, :1]
  else:
    arrays.update({"Transformer/posembed_input/pos_embedding": pos, "cls": cls,
                   "pre_logits/kernel": sd["pooler.dense.weight"].T,
                   "pre_logits/bias": sd["pooler.dense.bias"]})
  return arrays


def _npz(path, arrays):
  np.savez(path, **arrays)
  return path


def test_vision_transformer_npz(google_fn, tmp_path):
  model, sd = google_fn
  arrays = _google_arrays(sd)
  rng = np.random.default_rng(0)
  arrays.update({"head/kernel": rng.normal(size=(64, 10)).astype(np.float32),
                 "head/bias": rng.normal(size=(10,)).astype(np.float32)})
  pretrained = checkpoints.load(_npz(tmp_path / "vit.npz", arrays))
  assert pretrained.model["gelu_approximate"] and pretrained.mean == (0.5, 0.5, 0.5)
  images = _images(16)
  ref = _torch(model, images)
  assert _rel(_apply(pretrained, images, "encode"), ref.last_hidden_state) < 1e-5
  assert _rel(_apply(pretrained, images, "features"), ref.pooler_output) < 1e-5  # pre_logits
  logits = ref.pooler_output.numpy() @ arrays["head/kernel"] + arrays["head/bias"]
  assert _rel(_apply(pretrained, images), logits) < 1e-5


def test_dropping_pre_logits_reads_the_class_token(google_fn, tmp_path):
  """timm loads the original i21k files without their tanh representation layer."""
  model, sd = google_fn
  arrays = _google_arrays(sd)
  arrays.update({"head/kernel": np.ones((64, 10), np.float32),
                 "head/bias": np.ones(10, np.float32)})
  path = _npz(tmp_path / "vit.npz", arrays)
  plain = checkpoints.load(path, drop_pre_logits=True)
  assert plain.model["representation_size"] is None and "pre_logits" not in plain.params
  assert plain.params["head"]["kernel"].shape == (64, 10)  # the same width: the head stays
  images = _images(16)
  cls = _torch(model, images).last_hidden_state[:, 0]
  assert _rel(_apply(plain, images, "features"), cls) < 1e-5


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz(google_fn, tmp_path, scan):
  model, sd = google_fn
  arrays = {f"params/{k}": v for k, v in _google_arrays(sd, big_vision=True, scan=scan).items()}
  pretrained = checkpoints.load(_npz(tmp_path / "bv.npz", arrays))
  assert pretrained.model["depth"] == 2 and pretrained.model["pool"] == "tok"
  np.testing.assert_array_equal(pretrained.params["pos_embedding"][0, 0], 0.0)
  images = _images(16)
  assert _rel(_apply(pretrained, images, "encode"), _torch(model, images).last_hidden_state) < 1e-5


@pytest.mark.parametrize("big_vision", [False, True])
def test_google_npz_resamples_as_scipy_zoom(google_fn, tmp_path, big_vision):
  """big_vision's and vision_transformer's resample_posemb: scipy.ndimage.zoom(order=1) of the
  patch grid (4x4 -> 7x7 up, -> 3x3 down), the class token's row kept."""
  arrays = _google_arrays(google_fn[1], big_vision=big_vision)
  path = _npz(tmp_path / "vit.npz", arrays)
  pos = arrays["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"]
  grid = pos[0, -16:].reshape(4, 4, -1)
  for side in (7, 3):
    pretrained = checkpoints.load(path, image_size=4 * side)
    assert pretrained.model["posemb_resample"] == "linear_zoom"
    want = scipy.ndimage.zoom(grid, (side / 4, side / 4, 1), order=1).reshape(1, side**2, -1)
    np.testing.assert_allclose(pretrained.params["pos_embedding"][:, 1:], want, rtol=0, atol=1e-6)


def test_big_vision_train_checkpoint_keeps_only_params(google_fn, tmp_path):
  """A big_vision training .npz also holds the optimizer state: not part of the model."""
  arrays = {f"params/{k}": v for k, v in _google_arrays(google_fn[1], big_vision=True).items()}
  arrays.update({"opt/1/0/mu/embedding/kernel": np.zeros(3, np.float32),
                 "chrono/accum_train_time": np.zeros((), np.float32)})
  pretrained = checkpoints.load(_npz(tmp_path / "train.npz", arrays))
  assert set(pretrained.params) == {"embedding", "pos_embedding", "cls", "Transformer"}
  sincos = {k: v for k, v in arrays.items() if k != "params/pos_embedding"}
  with pytest.raises(ValueError, match="without a stored pos_embedding .*sincos2d"):
    checkpoints.load(_npz(tmp_path / "sincos.npz", sincos))


def test_npz_in_bfloat16_under_older_prefixes(google_fn, tmp_path):
  """bfloat16 arrays (numpy writes them as '|V2' void) read as float32; an older flax optimizer
  file keeps its params under opt/target/; a PaliGemma file its image tower under img/ beside
  llm/; anything else of dtype void is refused by name."""
  model, sd = google_fn
  arrays = _google_arrays(sd, big_vision=True)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}
  assert np.asarray(bf16["cls"]).dtype == ml_dtypes.bfloat16
  images = _images(16)
  ref = _torch(model, images).last_hidden_state
  for name, flat in (("opt", {f"opt/target/{k}": v for k, v in bf16.items()}),
                     ("paligemma", {**{f"params/img/{k}": v for k, v in bf16.items()},
                                    "params/llm/embedder/input_embedding": np.ones((8, 4))})):
    flat["opt/state/step"] = np.zeros((), np.int32)
    pretrained = checkpoints.load(_npz(tmp_path / f"{name}.npz", flat))
    assert pretrained.source.startswith("big_vision:")
    assert set(pretrained.params) == {"embedding", "pos_embedding", "cls", "Transformer"}, name
    assert pretrained.params["cls"].dtype == np.float32
    np.testing.assert_array_equal(pretrained.params["cls"], np.asarray(bf16["cls"], np.float32))
    assert _rel(_apply(pretrained, images, "encode"), ref) < 2e-2, name  # bf16-rounded weights
  odd = dict(arrays, cls=np.zeros((1, 1, 64), [("a", np.int32)]))
  with pytest.raises(ValueError, match=r"odd\.npz: array 'cls' has dtype \[\('a', '<i4'\)\], "
                                       r"which is not an array type hydra_jax reads"):
    checkpoints.load(_npz(tmp_path / "odd.npz", odd))


@pytest.mark.parametrize("cls", [True, False])
def test_big_vision_old_combined_cls_posemb(google_fn, tmp_path, cls):
  """big_vision's fix_old_checkpoints: a posemb of m*m + 1 rows holds the class token's row
  (added after the concat, as hydra_jax's own layout); without a class token it is dropped."""
  model, sd = google_fn
  arrays = _google_arrays(sd, big_vision=True, gap=not cls)
  pos = sd["embeddings.position_embeddings"]  # (1, 1 + 16, D): the class row, then 4x4
  arrays["pos_embedding"] = pos
  if cls:
    arrays["cls"] = sd["embeddings.cls_token"]
  pretrained = checkpoints.load(_npz(tmp_path / "old.npz", arrays))
  assert pretrained.model["posemb_grid"] == (4, 4)
  assert pretrained.model["class_token"] is cls
  np.testing.assert_array_equal(pretrained.params["pos_embedding"], pos if cls else pos[:, 1:])
  if cls:
    images = _images(16)
    assert _rel(_apply(pretrained, images, "encode"),
                _torch(model, images).last_hidden_state) < 1e-5


def test_big_vision_gap_npz(google_fn, tmp_path):
  model, sd = google_fn
  pretrained = checkpoints.load(_npz(tmp_path / "gap.npz", _google_arrays(sd, big_vision=True,
                                                                          gap=True)))
  assert not pretrained.model["class_token"] and pretrained.model["pool"] == "gap"
  images = _images(16)
  with torch.no_grad():  # the torch blocks on patch tokens only: no class token anywhere
    h = model.embeddings.patch_embeddings(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    h = h + model.embeddings.position_embeddings[:, 1:]
    for layer in model.layers:
      h = layer(h)
    h = model.layernorm(h).numpy()
  assert _rel(_apply(pretrained, images, "encode"), h) < 1e-5
  assert _rel(_apply(pretrained, images, "features"), h.mean(axis=1)) < 1e-5


# ---------------------------------------------------------------- big_vision npz export


def test_save_npz_writes_the_big_vision_layout(google_fn, tmp_path):
  """A Google-style ViT read from transformers, written back as npz: the arrays the test-side
  big_vision mapping gives (posemb on the patches, the class token's row in cls)."""
  model, sd = google_fn
  pre = checkpoints.load(_save_hf(model, tmp_path / "hf"))
  assert pre.mean == pre.std == (0.5, 0.5, 0.5)  # [-1, 1] inputs: nothing to fold
  checkpoints.save_npz(tmp_path / "bv.npz", pre)
  with np.load(tmp_path / "bv.npz") as f:
    got = dict(f)
  want = _google_arrays(sd, big_vision=True)
  assert set(got) == set(want) | {"pre_logits/kernel", "pre_logits/bias"}  # HF's pooler
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


NPZ_MODELS = {  # ViT fields: what big_vision computes, each with a folded part
    "tok_layer_scale_pre_logits": dict(pool="tok", layer_scale=True, representation_size=24),
    "tok_fc_norm": dict(pool="tok", fc_norm=True),
    "gap": dict(pool="gap", class_token=False),
    "map": dict(pool="map", class_token=False),
}


@pytest.mark.parametrize("case", sorted(NPZ_MODELS))
def test_save_npz_computes_the_same_function(case, tmp_path):
  """Read back (as big_vision reads it: [-1, 1] inputs, posemb before the class token), the
  file computes the model's logits from the same uint8 images; its mean / std are folded in."""
  fields = dict(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4, posemb_grid=(4, 4),
                ln_eps=1e-6, gelu_approximate=True, **NPZ_MODELS[case])
  variables = ViT(num_classes=5, **fields).init(jax.random.key(0), np.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(len(case))
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.3,
                        variables["params"])
  pre = checkpoints.Pretrained(params, fields, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "")
  checkpoints.save_npz(tmp_path / "bv.npz", pre)
  back = checkpoints.load(tmp_path / "bv.npz")
  assert back.mean == back.std == (0.5, 0.5, 0.5) and back.model["pool"] == fields["pool"]
  images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  assert _rel(_apply(back, images), _apply(pre, images)) < 1e-5


@pytest.mark.parametrize("fields,match", [
    (dict(gelu_approximate=False), "tanh GELU and LayerNorm eps 1e-6 .*gelu_approximate=False"),
    (dict(ln_eps=1e-12), "ln_eps=1e-12"),
    (dict(num_registers=2), "no register tokens"),
    (dict(pool="tok+gap"), "pools 'tok' over a class token, or 'gap' / 'map' without one"),
    (dict(pool="gap"), "got pool='gap', class_token=True"),
    (dict(pool="gap", class_token=False, fc_norm=True), "final LayerNorm is on the tokens"),
    (dict(posemb_grid=(2, 5)), "take it as square \\(got the grid \\(2, 5\\)\\)"),
    (dict(posemb_grid=(2, 8)), "take it as square \\(got the grid \\(2, 8\\)\\)"),
    (dict(pre_norm=True), "no LayerNorm before the blocks \\(got pre_norm=True, as in CLIP\\)"),
    (dict(quick_gelu=True, gelu_approximate=False), "no quick GELU"),
])
def test_save_npz_refuses_what_big_vision_does_not_compute(fields, match, tmp_path):
  (tmp_path / "bv.npz").write_bytes(b"an earlier file")
  model = dict(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=4,
               **{"pool": "tok", "gelu_approximate": True, "posemb_grid": (2, 2), **fields})
  params = ViT(**model).init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]
  with pytest.raises(ValueError, match="big_vision's ViT cannot compute this model: .*" + match):
    checkpoints.save_npz(tmp_path / "bv.npz", checkpoints.Pretrained(params, model, (0.5,) * 3,
                                                                     (0.5,) * 3, ""))
  assert (tmp_path / "bv.npz").read_bytes() == b"an earlier file"


def test_export_cli_writes_npz(google_fn, tmp_path, capsys):
  pre = checkpoints.load(_save_hf(google_fn[0], tmp_path / "hf"))
  checkpoints.save(tmp_path / "merged.safetensors", pre)
  export.main([str(tmp_path / "merged.safetensors"), "--npz", str(tmp_path / "bv.npz")])
  assert "inputs in [-1, 1]" in capsys.readouterr().out
  images = _images(16)
  assert _rel(_apply(checkpoints.load(tmp_path / "bv.npz"), images), _apply(pre, images)) < 1e-5
  with pytest.raises(SystemExit):
    export.main([str(tmp_path / "merged.safetensors"), "--npz", str(tmp_path / "x.npz"),
                 "--dtype", "bfloat16"])
  assert "--npz writes float32 params only" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export.main([str(tmp_path / "merged.safetensors"), "--npz", str(tmp_path / "hf")])
  assert "hf is a directory; expected the path of a file" in capsys.readouterr().err


def test_save_npz_replaces_a_file_atomically(google_fn, tmp_path, monkeypatch):
  pre = checkpoints.load(_save_hf(google_fn[0], tmp_path / "hf"))
  checkpoints.save_npz(tmp_path / "bv.npz", pre)
  before = (tmp_path / "bv.npz").read_bytes()

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", fail)
  with pytest.raises(OSError, match="disk full"):
    checkpoints.save_npz(tmp_path / "bv.npz", pre)
  assert (tmp_path / "bv.npz").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bv.npz", "hf"]  # no tmp file left


# ---------------------------------------------------------------- strict checks and options


def test_strict_lists_missing_unexpected_and_misshaped_at_once(google_fn, tmp_path):
  arrays = _google_arrays(google_fn[1])
  del arrays["Transformer/encoderblock_1/LayerNorm_0/scale"]
  arrays["Transformer/encoderblock_0/extra/kernel"] = np.zeros((2, 2), np.float32)
  arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError) as err:
    checkpoints.load(_npz(tmp_path / "bad.npz", arrays))
  msg = str(err.value)
  assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
  assert "missing: Transformer/encoderblock_1/LayerNorm_0/scale (expected (64,))" in msg
  assert "unexpected: Transformer/encoderblock_0/extra/kernel (2, 2)" in msg
  assert re.search(r"mis-shaped: Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias: got \(3,\), "
                   r"expected \(64,\)", msg)


def test_unknown_formats(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"notes\.txt is not a checkpoint format.*big_vision"):
    checkpoints.load(tmp_path / "notes.txt")
  with pytest.raises(ValueError, match=r"other\.npz is not a checkpoint format"):
    checkpoints.load(_npz(tmp_path / "other.npz", {"w": np.zeros(3)}))
  with pytest.raises(FileNotFoundError, match="absent"):
    checkpoints.load(tmp_path / "absent.npz")


def test_head_options(google_fn, tmp_path):
  arrays = _google_arrays(google_fn[1])
  arrays.update({"head/kernel": np.ones((64, 10), np.float32),
                 "head/bias": np.ones(10, np.float32)})
  path = _npz(tmp_path / "head.npz", arrays)
  kept = checkpoints.load(path, num_classes=10)
  np.testing.assert_array_equal(kept.params["head"]["kernel"], 1.0)
  for pretrained in (checkpoints.load(path, num_classes=7),
                     checkpoints.load(path, num_classes=10, reset_head=True)):
    n = pretrained.params["head"]["kernel"].shape[1]
    assert pretrained.params["head"]["kernel"].shape == (64, n)  # 64: pre_logits width
    assert not np.any(pretrained.params["head"]["kernel"]) and not np.any(
        pretrained.params["head"]["bias"])
    assert checkpoints.build_model(pretrained).num_classes == n
  dropped = checkpoints.load(path, reset_head=True)
  assert "head" not in dropped.params and checkpoints.build_model(dropped).num_classes is None


def test_native_round_trip_and_image_size(google_fn, tmp_path):
  pretrained = checkpoints.load(_npz(tmp_path / "vit.npz", _google_arrays(google_fn[1])),
                                num_classes=3, image_size=24)
  assert pretrained.model["posemb_grid"] == (6, 6)
  assert pretrained.params["pos_embedding"].shape == (1, 37, 64)
  checkpoints.save(tmp_path / "native.safetensors", pretrained)
  again = checkpoints.load(tmp_path / "native.safetensors")
  assert (again.model, again.mean, again.std, again.source) == (
      pretrained.model, pretrained.mean, pretrained.std, pretrained.source)
  jax.tree.map(np.testing.assert_array_equal, again.params, pretrained.params)
  for bad in (30, 0, (24, 2)):
    with pytest.raises(ValueError, match="is not a positive multiple of the patch size 4"):
      checkpoints.load(tmp_path / "native.safetensors", image_size=bad)
  assert checkpoints.load(tmp_path / "native.safetensors",
                          image_size=np.int64(16)).model["posemb_grid"] == (4, 4)
  for bad in ((16,), "16", 16.0):
    with pytest.raises(ValueError, match="image_size must be an int or \\(H, W\\) ints"):
      checkpoints.load(tmp_path / "native.safetensors", image_size=bad)
  for bad in (0, -2, 2.5):
    with pytest.raises(ValueError, match="num_classes must be None .* or an int >= 1"):
      checkpoints.load(tmp_path / "native.safetensors", num_classes=bad)
  with pytest.raises(ValueError, match="pool='map' needs the checkpoint's MAP head"):
    checkpoints.load(tmp_path / "native.safetensors", pool="map")



def test_a_truncated_file_in_a_transformers_directory_is_named(hf_vit, tmp_path):
  cut = tmp_path / "cut"
  shutil.copytree(hf_vit[1], cut)
  data = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cut/model.safetensors is a safetensors file that cannot "
                                       r"be read \(truncated or corrupt\?\)"):
    checkpoints.load(cut)


def test_truncated_files_and_home_paths(google_fn, tmp_path, monkeypatch):
  pretrained = checkpoints.load(_npz(tmp_path / "vit.npz", _google_arrays(google_fn[1])))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  checkpoints.save("~/vit.safetensors", pretrained)  # ~ is the home directory, as load reads it
  assert (tmp_path / "home" / "vit.safetensors").is_file()
  data = (tmp_path / "home" / "vit.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="cut.safetensors is a safetensors file that cannot be "
                     "read \\(truncated or corrupt\\?\\)"):
    checkpoints.load(tmp_path / "cut.safetensors")


def test_pool_override_gives_a_head_of_the_new_width(google_fn, tmp_path):
  arrays = _google_arrays(google_fn[1])
  with pytest.raises(ValueError, match="changes the features that pre_logits .* "
                     "drop_pre_logits=True"):  # its input width changes too
    checkpoints.load(_npz(tmp_path / "rep.npz", arrays), num_classes=3, pool="tok+gap")
  path = _npz(tmp_path / "vit.npz",
              {k: v for k, v in arrays.items() if not k.startswith("pre_logits")})
  pooled = checkpoints.load(path, num_classes=3, pool="tok+gap")
  assert pooled.model["pool"] == "tok+gap"
  assert pooled.params["head"]["kernel"].shape == (2 * 64, 3)
  logits = _apply(pooled, _images(16))
  assert logits.shape == (2, 3)
  head = {"head/kernel": np.ones((64, 3), np.float32), "head/bias": np.ones(3, np.float32)}
  path = _npz(tmp_path / "head.npz", {**{k: v for k, v in arrays.items()
                                         if not k.startswith("pre_logits")}, **head})
  kept = checkpoints.load(path, pool="gap")  # the same width: the file's head stays
  np.testing.assert_array_equal(kept.params["head"]["kernel"], head["head/kernel"])
  wider = checkpoints.load(path, pool="tok+gap")  # the same classes, a zero head of the new width
  assert wider.params["head"]["kernel"].shape == (128, 3)
  assert not wider.params["head"]["kernel"].any()


# ---------------------------------------------------------------- parameter counts


def _formula(width, depth, mlp_dim, patch_size, grid, classes=1000, **_) -> int:
  block = 4 * (width * width + width) + 2 * 2 * width + 2 * width * mlp_dim + mlp_dim + width
  embed = patch_size * patch_size * 3 * width + width + width + (1 + grid * grid) * width
  return embed + depth * block + 2 * width + width * classes + classes


@pytest.mark.parametrize("size", list(SIZES))
def test_param_count_table(size):
  """Every size x patch builds and matches the closed form (depth 2 keeps tracing cheap)."""
  for patch in PATCHES:
    fields = dict(variant(f"{size}/{patch}"), depth=2)
    grid = 224 // patch
    count = param_count(checkpoints.expected_shapes(dict(fields, posemb_grid=(grid, grid)), 1000))
    assert count == _formula(**fields, grid=grid), (size, patch)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_param_counts(name):
  grid = 224 // int(name.split("/")[1])
  model = dict(variant(name), posemb_grid=(grid, grid))
  assert param_count(checkpoints.expected_shapes(model, 1000)) == PUBLISHED[name]


# ------------------------------------------------------ SigLIP, half precision, no qkv bias


def _siglip_vision_config():
  return transformers.SiglipVisionConfig(intermediate_size=128, **TINY)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  model = _randomise(transformers.SiglipVisionModel(_siglip_vision_config()), seed=5)
  return model, _save_hf(model, tmp_path_factory.mktemp("hf_siglip"))


def test_hf_siglip_matches_torch(hf_siglip):
  model, path = hf_siglip
  pretrained = checkpoints.load(path)
  assert pretrained.model["pool"] == "map" and not pretrained.model["class_token"]
  assert pretrained.model["gelu_approximate"] and pretrained.model["ln_eps"] == 1e-6
  images = _images(16)
  ref = _torch(model, images)
  assert _rel(_apply(pretrained, images, "encode"), ref.last_hidden_state) < 1e-5
  # SigLIP's attention-pooling head (probe, packed in_proj, LayerNorm, MLP) is MAPHead_0
  assert _rel(_apply(pretrained, images, "features"), ref.pooler_output) < 1e-5
  with_head = checkpoints.load(path, num_classes=3)
  assert checkpoints.build_model(with_head).apply({"params": with_head.params},
                                                  images).shape == (2, 3)
  gap = checkpoints.load(path, pool="gap")  # another pooling drops the MAP head
  assert "MAPHead_0" not in gap.params
  assert _rel(_apply(gap, images, "features"), ref.last_hidden_state.mean(1)) < 1e-5


@pytest.mark.parametrize("family", ["Siglip", "CLIP"])
def test_two_tower_models_keep_the_vision_tower(family, tmp_path):
  """The text tower is dropped; the image features are the vision tower's (CLIP's projected by
  the head)."""
  text = getattr(transformers, f"{family}TextConfig")(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      vocab_size=50)
  vision = _siglip_vision_config() if family == "Siglip" else _clip_vision_config()
  config = getattr(transformers, f"{family}Config")(
      text_config=text.to_dict(), vision_config=vision.to_dict(),
      **({"projection_dim": 24} if family == "CLIP" else {}))
  model = _randomise(getattr(transformers, f"{family}Model")(config), seed=6)
  pretrained = checkpoints.load(_save_hf(model, tmp_path))
  images = _images(16)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns an output object
  assert _rel(_apply(pretrained, images), ref) < 1e-5


def test_siglip_classifier_averages_the_tokens(tmp_path):
  """SiglipForImageClassification ignores the tower's MAP head: its logits come from token means."""
  config = transformers.SiglipConfig(vision_config=_siglip_vision_config().to_dict(), num_labels=3)
  model = _randomise(transformers.SiglipForImageClassification(config), seed=8)
  pretrained = checkpoints.load(_save_hf(model, tmp_path))
  assert pretrained.model["pool"] == "gap" and "MAPHead_0" not in pretrained.params
  images = _images(16)
  assert _rel(_apply(pretrained, images), _torch(model, images).logits) < 1e-5


def test_siglip_config_relying_on_transformers_defaults(hf_siglip, tmp_path):
  """transformers 4 wrote nested configs as a diff from the defaults: SigLIP's tanh GELU and
  eps 1e-6 may be left out (not ViT's exact GELU and 1e-12)."""
  model, path = hf_siglip
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
  config = {k: v for k, v in json.loads((path / "config.json").read_text()).items()
            if k not in ("hidden_act", "layer_norm_eps")}  # (TINY's 4 heads are not the default)
  (bare / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": config}))
  pretrained = checkpoints.load(bare)
  assert pretrained.model["gelu_approximate"] and pretrained.model["ln_eps"] == 1e-6
  images = _images(16)
  assert _rel(_apply(pretrained, images, "features"), _torch(model, images).pooler_output) < 1e-5


# ------------------------------------------------------------------------------------- CLIP


def _clip_vision_config(**kw):
  return transformers.CLIPVisionConfig(intermediate_size=128, projection_dim=24, **TINY, **kw)


def test_hf_clip_matches_torch(tmp_path):
  """CLIP's tower: class_embedding, a bias-free patch embedding, pre_layrnorm (the ViT's
  embedding_norm), quick GELU, post_layernorm on the pooled class token (pooled_norm), and the
  bias-free visual_projection as the head (image_embeds), as timm holds it."""
  model = _randomise(transformers.CLIPVisionModelWithProjection(_clip_vision_config()), seed=11)
  path = _save_hf(model, tmp_path / "clip")
  pretrained = checkpoints.load(path)
  fields = pretrained.model
  assert fields["pre_norm"] and fields["quick_gelu"] and fields["fc_norm"]
  assert fields["pool"] == "tok" and fields["ln_eps"] == 1e-5 and not fields["gelu_approximate"]
  assert pretrained.mean == checkpoints.common.CLIP_MEAN  # no preprocessor_config.json
  images = _images(16)
  ref = _torch(model, images)
  assert _rel(_apply(pretrained, images, "encode"), ref.last_hidden_state) < 1e-5
  assert _rel(_apply(pretrained, images), ref.image_embeds) < 1e-5
  resized = checkpoints.load(path, image_size=24, num_classes=3)  # a new head, bicubic posemb
  assert resized.params["head"]["kernel"].shape == (64, 3)
  with torch.no_grad():
    pooled = model.vision_model(pixel_values=torch.from_numpy(_images(24).transpose(0, 3, 1, 2)),
                                interpolate_pos_encoding=True).pooler_output
  assert _rel(_apply(resized, _images(24), "features"), pooled) < 1e-5
  checkpoints.save(tmp_path / "native.safetensors", resized)  # what a run's export writes
  again = checkpoints.load(tmp_path / "native.safetensors")
  assert again.model == resized.model
  assert _rel(_apply(again, _images(24), "features"), pooled) < 1e-5


def test_clip_config_of_older_files_with_a_vision_config_dict(tmp_path):
  """Older CLIPModel configs hold the tower's fields in vision_config_dict, which transformers
  lets override vision_config: 8 heads of 12 there, not the default 12 heads of 8."""
  vision = transformers.CLIPVisionConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=8, patch_size=4, image_size=16)
  text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=50)
  model = _randomise(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)), seed=13)
  path = _save_hf(model, tmp_path)
  config = json.loads((path / "config.json").read_text())
  config.update(vision_config=None, vision_config_dict=dict(
      hidden_size=96, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
      patch_size=4, image_size=16))
  (path / "config.json").write_text(json.dumps(config))
  pretrained = checkpoints.load(path)
  assert pretrained.model["num_heads"] == 8
  images = _images(16)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  assert _rel(_apply(pretrained, images), getattr(ref, "pooler_output", ref)) < 1e-5


def test_clip_classifier_is_refused_with_the_reason(tmp_path):
  config = transformers.CLIPConfig(vision_config=_clip_vision_config().to_dict(), num_labels=3)
  model = transformers.CLIPForImageClassification(config)
  with pytest.raises(ValueError, match="CLIPForImageClassification classifies the mean of the "
                                       "patch tokens without a final LayerNorm"):
    checkpoints.load(_save_hf(model, tmp_path))


def test_quick_gelu_excludes_the_other_activations():
  with pytest.raises(ValueError, match="quick_gelu=True is the MLP's activation"):
    ViT(num_classes=2, patch_size=4, width=8, depth=1, mlp_dim=8, num_heads=2, posemb_grid=(1, 1),
        quick_gelu=True, gelu_approximate=True).init(jax.random.key(0), np.zeros((1, 4, 4, 3)))


def test_unsupported_hf_models_are_named(tmp_path):
  config = transformers.ViTConfig(intermediate_size=128, pooler_act="relu", **TINY)
  path = _save_hf(transformers.ViTModel(config), tmp_path / "relu")
  with pytest.raises(ValueError, match="pooler_act 'relu' is not supported"):
    checkpoints.load(path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "model_type": "dinov3_vit"}))
  with pytest.raises(ValueError, match="model_type 'dinov3_vit' is not supported"):
    checkpoints.load(path)


def test_big_vision_two_tower_npz_with_map_head(hf_siglip, tmp_path):
  """A big_vision SigLIP file: params/img/... (MAPHead_0 included) beside params/txt/..."""
  model, path = hf_siglip
  flat = {f"params/img/{k}": v for k, v in
          traverse_util.flatten_dict(checkpoints.load(path).params, sep="/").items()}
  flat.update({"params/txt/Encoder_0/encoder_norm/scale": np.ones(32, np.float32),
               "params/t": np.ones(1, np.float32)})
  np.savez(tmp_path / "siglip.npz", **flat)
  pretrained = checkpoints.load(tmp_path / "siglip.npz")
  assert pretrained.source.startswith("big_vision:") and pretrained.model["pool"] == "map"
  images = _images(16)
  assert _rel(_apply(pretrained, images, "features"), _torch(model, images).pooler_output) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors(hf_vit, tmp_path, dtype):
  model, _ = hf_vit
  half = copy.deepcopy(model).to(dtype)
  pretrained = checkpoints.load(_save_hf(half, tmp_path))
  images = _images(16)
  ref = _torch(half.float(), images).last_hidden_state  # the same rounded weights, in float32
  assert _rel(_apply(pretrained, images, "encode"), ref) < 1e-5


def test_hf_vit_of_a_non_square_image_size(tmp_path):
  """Its position embedding lies on the (H/p, W/p) grid of the config's image_size."""
  config = transformers.ViTConfig(intermediate_size=128, **{**TINY, "image_size": [8, 32]})
  model = _randomise(transformers.ViTModel(config, add_pooling_layer=False), seed=8)
  pretrained = checkpoints.load(_save_hf(model, tmp_path))
  assert tuple(pretrained.model["posemb_grid"]) == (2, 8)
  images = np.random.default_rng(0).normal(size=(2, 8, 32, 3)).astype(np.float32)
  assert _rel(_apply(pretrained, images, "encode"), _torch(model, images).last_hidden_state) < 1e-5


def test_hf_vit_without_qkv_bias(tmp_path):
  config = transformers.ViTConfig(intermediate_size=128, qkv_bias=False, **TINY)
  model = _randomise(transformers.ViTModel(config, add_pooling_layer=False), seed=7)
  pretrained = checkpoints.load(_save_hf(model, tmp_path))
  images = _images(16)
  assert _rel(_apply(pretrained, images, "encode"), _torch(model, images).last_hidden_state) < 1e-5


def test_adapter_exports_round_trip_and_are_written_atomically(tmp_path):
  from hydra_jax import adapters, export
  spec = adapters.AdapterSpec("hydralora", rank=2, num_heads=2, top_k=1, dropout=0.1)
  trainable = {"adapters": {"blk": {"dense": {"A": np.ones((4, 2), np.float32),
                                              "B": np.zeros((2, 2, 3), np.float32),
                                              "router": np.ones((4, 2), np.float32)}}},
               "params": {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
  path = tmp_path / "export" / "adapters.safetensors"
  export.save_adapters(path, trainable, spec)
  back, back_spec = export.load_adapters(path)
  assert back_spec == spec
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable), strict=True):
    np.testing.assert_array_equal(x, y)
  assert path.stat().st_mode & 0o777 == 0o644  # like merged exports, not owner-only
  before = path.read_bytes()
  bad = {"adapters": {"x": np.array([object()])}}  # safetensors cannot store it
  with pytest.raises(Exception):  # noqa: B017, PT011 - whatever safetensors raises
    export.save_adapters(path, bad, spec)
  assert path.read_bytes() == before  # the earlier export is intact
  assert sorted(p.name for p in path.parent.iterdir()) == ["adapters.safetensors"]  # no tmp left


def test_adapter_exports_from_before_2026_11_23(tmp_path, caplog):
  """Older files: a field the kind does not read is dropped with a warning; a HydraLoRA top-1
  adapter (trained with the kept head's weight 1) is refused rather than run another way."""
  from hydra_jax import adapters, export
  tensors = {"adapters/blk/dense/A": np.ones((4, 2), np.float32),
             "adapters/blk/dense/B": np.zeros((2, 3), np.float32)}
  lora = {**dataclasses.asdict(adapters.AdapterSpec("lora")), "scale": 1.0}  # a Hydra config's
  save_file(tensors, str(tmp_path / "lora.safetensors"),
            metadata={"hydra_jax_adapter_spec": json.dumps(lora)})
  _, spec = export.load_adapters(tmp_path / "lora.safetensors")
  assert spec == adapters.AdapterSpec("lora") and "{'scale': 1.0}" in caplog.text
  top1 = dataclasses.asdict(adapters.AdapterSpec("hydralora", top_k=1))
  save_file(tensors, str(tmp_path / "top1.safetensors"),
            metadata={"hydra_jax_adapter_spec": json.dumps(top1)})
  with pytest.raises(ValueError, match="HydraLoRA top_k=1 adapter written before 2026-11-23"):
    export.load_adapters(tmp_path / "top1.safetensors")


def test_a_file_recording_only_some_model_fields_takes_the_vit_defaults(tmp_path):
  """Exports of random-init runs made before 2026-11-23 record only the variant's fields."""
  model = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, pool="tok",
               posemb_grid=(4, 4))
  full = ViT(num_classes=3, **model)
  params = full.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  checkpoints.save(tmp_path / "old.safetensors",
                   checkpoints.Pretrained(params, model, (0.5,) * 3, (0.5,) * 3, "random"))
  pre = checkpoints.load(tmp_path / "old.safetensors", num_classes=3, image_size=24)
  assert pre.model["class_token"] is True and pre.model["posemb_grid"] == (6, 6)
  images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), np.uint8)
  assert checkpoints.build_model(pre).apply({"params": pre.params}, images).shape == (2, 3)


def test_posemb_resample_is_recorded_and_older_files_mean_bicubic(tmp_path):
  """A native file keeps its checkpoint's resampling convention; one written before the field
  existed resamples as it always did ("bicubic"); an unknown convention is refused by name; and
  the exporters write models carrying it."""
  model = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, pool="tok",
               posemb_grid=(4, 4), gelu_approximate=True)
  params = ViT(num_classes=3, **model).init(jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"]
  params["head"]["kernel"] = np.ones_like(params["head"]["kernel"])
  grid = np.array(params["pos_embedding"][:, 1:]).reshape(1, 4, 4, -1)

  def resampled(fields):
    checkpoints.save(tmp_path / "vit.safetensors",
                     checkpoints.Pretrained(params, fields, (0.5,) * 3, (0.5,) * 3, "random"))
    pre = checkpoints.load(tmp_path / "vit.safetensors", image_size=24)
    return pre, pre.params["pos_embedding"][:, 1:].reshape(1, 6, 6, -1)

  old, pos = resampled(model)
  assert "posemb_resample" not in old.model
  assert checkpoints.build_model(old).posemb_resample == "bicubic"
  with torch.no_grad():
    want = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(0, 3, 1, 2)), (6, 6),
                                           mode="bicubic", align_corners=False)
  np.testing.assert_allclose(pos, want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
  new, pos = resampled(dict(model, posemb_resample="bicubic_antialias"))
  assert new.model["posemb_resample"] == "bicubic_antialias"
  assert checkpoints.build_model(new).posemb_resample == "bicubic_antialias"
  with torch.no_grad():
    want = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(0, 3, 1, 2)), (6, 6),
                                           mode="bicubic", align_corners=False, antialias=True)
  np.testing.assert_allclose(pos, want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
  assert checkpoints.save_hf(tmp_path / "hf", new) == "ViTForImageClassification"
  checkpoints.save_timm(tmp_path / "timm", new)
  checkpoints.save_npz(tmp_path / "bv.npz", new)
  with pytest.raises(ValueError, match=r"random: unknown posemb_resample 'area'; expected one of "
                                       r"\('bicubic', 'bicubic_antialias', 'linear_zoom'\)"):
    resampled(dict(model, posemb_resample="area"))
