"""timm format: directories timm itself writes (``save_for_hf``, its Hub layout) and bare state
dicts load and compute timm's logits; ``save_timm`` directories load in timm
(``create_model("local-dir:...")``) and compute the ViT's; timm models the ViT does not compute
are refused by name. PEFT LoRA on timm models, both ways."""

import json
import logging

import jax
import numpy as np
import peft
import pytest
import torch
from lora_runs import as_if_trained, finished_lora_run
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch
from timm_import import import_timm

from hydra_jax import adapters, assets, checkpoints, export
from hydra_jax.checkpoints import timm_vit
from hydra_jax.models import ViT

timm = import_timm()


def _timm(name: str, seed: int = 0, **kwargs):
  """timm's ``name`` built with ``kwargs``, every param random (norms and layer scales too)."""
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  return model


def _images(model_or_hw, batch: int = 2) -> np.ndarray:
  h, w = model_or_hw if isinstance(model_or_hw, tuple) else model_or_hw.patch_embed.img_size
  return np.random.default_rng(1).normal(size=(batch, h, w, 3)).astype(np.float32)


def _timm_logits(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _ours(pre, images):
  return np.asarray(checkpoints.build_model(pre).apply({"params": pre.params}, images))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save_for_hf(model, path):
  timm.models.save_for_hf(model, str(path), safe_serialization=True)
  return path


# name, create_model kwargs, what the case covers
HUB_CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=5)),
    # 16 heads of 48 (the 64-wide rule would give 12): only the architecture table knows
    "vit_base_gap": ("vit_base_patch16_gap_224", dict(img_size=32, depth=1, num_classes=3)),
    # no_embed_class position embedding, 4 registers, LayerScale, no head
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=1, num_classes=0)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(img_size=32, depth=1, num_classes=3)),
    "siglip2_tanh_gelu": ("vit_base_patch32_siglip_256", dict(img_size=64, depth=1, num_classes=2)),
    # registers with position-embedding entries, a non-square grid, no q/k/v biases, LayerScale
    "registers_embed_class": ("vit_tiny_patch16_224", dict(
        img_size=(32, 48), depth=1, num_classes=3, reg_tokens=2, qkv_bias=False,
        init_values=0.5)),
    # fc_norm: the final LayerNorm on the averaged patch tokens; registers, no class token
    "reg4_gap_fc_norm": ("vit_little_patch16_reg4_gap_256", dict(img_size=32, depth=1,
                                                                 num_classes=3)),
    # DINOv2 giant's packed SwiGLU MLP (fc1: 512 = [gate, value], fc2 reads 256), registers
    "dinov2_giant_swiglu": ("vit_giant_patch14_reg4_dinov2", dict(
        img_size=28, depth=1, embed_dim=96, num_heads=2, num_classes=3)),
    # a MAP head over the class token too
    "map_include_prefix": ("vit_tiny_patch16_224", dict(
        img_size=32, depth=1, num_classes=3, global_pool="map", pool_include_prefix=True)),
    # CLIP: a LayerNorm before the blocks (norm_pre), eps 1e-5; OpenAI's quick GELU
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32, depth=1, num_classes=3)),
    "clip_quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64, depth=2,
                                                                   num_classes=4)),
    # act_layer given in model_args, outside the table's architectures
    "quick_gelu_args": ("vit_tiny_patch16_224", dict(img_size=32, depth=1, num_classes=3,
                                                     act_layer="quick_gelu")),
}


@pytest.mark.parametrize("case", sorted(HUB_CASES))
def test_timm_directory_loads_and_computes_timms_logits(case, tmp_path):
  name, kwargs = HUB_CASES[case]
  model = _timm(name, **kwargs)
  pre = checkpoints.load(_save_for_hf(model, tmp_path / "timm"))
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5
  assert pre.model["num_heads"] == model.blocks[0].attn.num_heads
  assert pre.mean == tuple(model.pretrained_cfg["mean"])
  assert pre.model["fc_norm"] == (not isinstance(model.fc_norm, torch.nn.Identity))


# name, create_model kwargs (the stored grid), the new (H, W): what the case covers
RESIZE_CASES = {
    "up": ("vit_tiny_patch16_224", dict(img_size=64, depth=1, num_classes=3), (96, 96)),
    "down_by_2": ("vit_tiny_patch16_224", dict(img_size=96, depth=1, num_classes=3), (48, 48)),
    "down_7_to_4": ("vit_tiny_patch16_224", dict(img_size=112, depth=1, num_classes=3), (64, 64)),
    # no_embed_class position embedding, registers, LayerScale (timm's DINOv2 layout)
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=1, num_classes=3),
                    (84, 84)),
    # registers with position-embedding entries (kept, not resampled); non-square both ways
    "registers_non_square": ("vit_tiny_patch16_224", dict(
        img_size=(32, 48), depth=1, num_classes=3, reg_tokens=2), (64, 32)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64, depth=1, num_classes=3), (96, 96)),
}


@pytest.mark.parametrize("case", sorted(RESIZE_CASES))
def test_timm_at_another_image_size_computes_timms_logits(case, tmp_path):
  """Loaded at another size, and run at another size on the fly, the ViT resamples as timm's
  resample_abs_pos_embed (bicubic, antialiased): the reference is timm's dynamic_img_size model,
  and for square grids also timm created at the new size, the weights through its
  checkpoint_filter_fn (which reads the stored grid as square)."""
  name, kwargs, size = RESIZE_CASES[case]
  model = _timm(name, **kwargs)
  path = _save_for_hf(model, tmp_path / "timm")
  dynamic = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs).eval()
  dynamic.load_state_dict(model.state_dict())
  images = _images(size)
  ref = _timm_logits(dynamic, images)
  if size[0] == size[1]:
    resized = timm.create_model(name, pretrained=False, **dict(kwargs, img_size=size)).eval()
    resized.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(
        model.state_dict(), resized))
    assert _rel(_timm_logits(resized, images), ref) < 1e-6
  pre = checkpoints.load(path, image_size=size)
  assert pre.model["posemb_resample"] == "bicubic_antialias"
  assert pre.model["posemb_grid"] == tuple(s // pre.model["patch_size"] for s in size)
  assert _rel(_ours(pre, images), ref) < 1e-5
  stored = checkpoints.load(path)  # resampled on the fly
  assert _rel(_ours(stored, images), ref) < 1e-5
  plain = checkpoints.build_model(stored, posemb_resample="bicubic")  # what was done before
  assert _rel(plain.apply({"params": stored.params}, images), ref) > 5e-5


def test_fc_norm_model_refuses_a_pool_of_two_features(tmp_path):
  model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3, global_pool="avg")
  path = _save_for_hf(model, tmp_path / "timm")  # timm's avg pool puts fc_norm after it
  with pytest.raises(ValueError, match="pool='tok\\+gap' concatenates two features.*model.pool"):
    checkpoints.load(path, pool="tok+gap")
  pre = checkpoints.load(path, pool="tok")  # the class token, normed by fc_norm as in timm
  assert pre.model["fc_norm"] and pre.model["pool"] == "tok"
  model.global_pool = "token"
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5


def test_bare_fc_norm_file_with_a_class_token_pools_avg(tmp_path):
  """timm gives fc_norm only to avg-pooled models unless told: without a config the file's
  fc_norm says "avg" (was read as "token": 150% off)."""
  model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3, global_pool="avg")
  save_torch(model.state_dict(), str(tmp_path / "w.safetensors"))
  pre = checkpoints.load(tmp_path / "w.safetensors")
  assert pre.model["pool"] == "gap" and pre.model["fc_norm"]
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5


def test_pool_refusals_offer_the_pools_the_checkpoint_takes(tmp_path):
  model = _timm("vit_little_patch16_reg4_gap_256", img_size=32, depth=1, num_classes=3)
  path = _save_for_hf(model, tmp_path / "timm")  # no class token, no MAP head, fc_norm
  for pool in ("map", "tok+gap"):
    with pytest.raises(ValueError, match=r"pool with one of \('gap',\)"):
      checkpoints.load(path, pool=pool)


def test_architecture_table_fields_match_timm():
  """A sample of the generated table checked against the installed timm's own models."""
  table = timm_vit.architectures()
  for name in ("vit_base_patch16_224", "vit_huge_patch14_224", "vit_so400m_patch14_siglip_224",
               "vit_base_patch32_siglip_256", "vit_small_patch14_reg4_dinov2",
               "vit_base_patch16_gap_224", "deit3_small_patch16_224",
               "vit_little_patch16_reg4_gap_256", "vit_giant_patch14_dinov2"):
    with torch.device("meta"):
      model = timm.create_model(name)
    row = table[name]
    block = model.blocks[0]
    assert row["num_heads"] == block.attn.num_heads, name
    assert row["ln_eps"] == block.norm1.eps, name
    assert row["global_pool"] == model.global_pool, name
    assert row["no_embed_class"] == model.no_embed_class, name
    assert (row.get("mlp") == "swiglu") == (type(block.mlp).__name__ == "GluMlp"), name
    if row.get("mlp"):
      continue  # a SwiGLU MLP has no GELU
    assert (row["gelu"] == "tanh") == (type(block.mlp.act).__name__ == "GELUTanh"
                                       or getattr(block.mlp.act, "approximate", "") == "tanh")
  clip = timm_vit.architectures()["vit_base_patch16_clip_224"]  # pre_norm, eps 1e-5
  assert clip["ln_eps"] == 1e-5 and clip["gelu"] == "exact"
  assert table["vit_base_patch32_clip_quickgelu_224"]["gelu"] == "quick"
  assert "vit_so150m_patch16_reg4_map_256" not in table  # MAP head over the patches only


def test_architecture_outside_the_table_reads_its_config(tmp_path, caplog):
  """No table row: heads from model_args, the position-embedding layout from the image size
  (registers and a class token without entries: 9 positions, and 9 - 5 is a square too)."""
  model = _timm("vit_small_patch14_reg4_dinov2", img_size=42, depth=1, num_classes=2,
                num_heads=6)
  path = _save_for_hf(model, tmp_path / "timm")
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(config, architecture="my_own_vit")))
  with caplog.at_level(logging.WARNING):
    pre = checkpoints.load(path)
  assert "my_own_vit" in caplog.text and "exact GELU" in caplog.text
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5
  (path / "config.json").unlink()  # a bare file cannot tell: it says which reading it took
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checkpoints.load(path / "model.safetensors")
  assert "with and without" in caplog.text


def test_bare_map_head_file_pools_with_it(tmp_path):
  model = _timm("vit_base_patch16_siglip_224", img_size=32, depth=1, num_classes=3)
  save_torch(model.state_dict(), str(tmp_path / "siglip.safetensors"))
  pre = checkpoints.load(tmp_path / "siglip.safetensors")
  assert pre.model["pool"] == "map"
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5


def test_bare_non_square_file_asks_for_the_config(tmp_path):
  model = _timm("vit_tiny_patch16_224", img_size=(32, 48), depth=1)
  save_torch(model.state_dict(), str(tmp_path / "w.safetensors"))
  with pytest.raises(ValueError, match="model_args.img_size"):
    checkpoints.load(tmp_path / "w.safetensors")


def test_bare_file_whose_head_count_cannot_be_guessed_asks_for_the_config(tmp_path):
  model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=48, num_heads=2)
  save_torch(model.state_dict(), str(tmp_path / "w.safetensors"))
  with pytest.raises(ValueError, match="width 48 is not a multiple of timm's usual 64-wide "
                                       "heads; .*model_args.num_heads"):
    checkpoints.load(tmp_path / "w.safetensors")


def test_bare_state_dict_loads_with_timms_defaults_and_says_so(tmp_path, caplog):
  model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=4, embed_dim=128,
                num_heads=2)
  file = tmp_path / "weights.safetensors"
  save_torch(model.state_dict(), str(file))
  with caplog.at_level(logging.WARNING):
    pre = checkpoints.load(file)
  assert "num_heads=2" in caplog.text and "exact GELU" in caplog.text
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5


def test_bare_clip_state_dict_takes_clips_eps_and_says_so(tmp_path, caplog):
  """Without a config, a pre-norm file is read with CLIP's LayerNorm eps 1e-5 (every pre-norm
  architecture in timm's registry has it), named in the warning."""
  model = _timm("vit_base_patch16_clip_224", img_size=32, depth=1, num_classes=3)
  file = tmp_path / "weights.safetensors"
  save_torch(model.state_dict(), str(file))
  with caplog.at_level(logging.WARNING):
    pre = checkpoints.load(file)
  assert pre.model["ln_eps"] == 1e-5 and "LayerNorm eps 1e-05 (a pre-norm model" in caplog.text
  images = _images(model)
  assert _rel(_ours(pre, images), _timm_logits(model, images)) < 1e-5


REFUSED = {
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=1), "distillation"),
    "map_patches_only": ("vit_tiny_patch16_224", dict(img_size=32, depth=1, global_pool="map"),
                         "pool_include_prefix"),
    "avg_over_class_token": ("vit_tiny_patch16_224", dict(
        img_size=32, depth=1, global_pool="avg", fc_norm=False, pool_include_prefix=True),
        "averages the class token"),
    "unpacked_swiglu": ("vit_tiny_patch16_224", dict(
        img_size=32, depth=1, mlp_layer=timm.layers.SwiGLU), "unpacked gated MLP"),
    "no_final_norm": ("vit_tiny_patch16_224", dict(img_size=32, depth=1, final_norm=False),
                      "final_norm=False"),
    "parallel_blocks": ("vit_small_patch16_18x2_224", dict(img_size=32, depth=1),
                        "parallel blocks"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_timm_models_the_vit_does_not_compute_are_refused_by_name(case, tmp_path):
  name, kwargs, message = REFUSED[case]
  model = _timm(name, **kwargs)
  if "mlp_layer" in kwargs:  # save_for_hf cannot record a class argument: a bare state dict
    path = tmp_path / "timm.safetensors"
    save_torch(model.state_dict(), str(path))
  else:
    path = _save_for_hf(model, tmp_path / "timm")
  with pytest.raises(ValueError, match=message):
    checkpoints.load(path)


def test_timm_directory_without_safetensors_is_refused(tmp_path):
  model = _timm("vit_tiny_patch16_224", img_size=32, depth=1)
  timm.models.save_for_hf(model, str(tmp_path), safe_serialization=False)  # pytorch_model.bin
  with pytest.raises(ValueError, match="without model.safetensors"):
    checkpoints.load(tmp_path)


TINY = dict(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4, posemb_grid=(4, 4))
EXPORTS = {  # ViT fields, head classes
    "tok": (dict(pool="tok"), 3),
    "gap_no_class_token": (dict(pool="gap", class_token=False), 3),
    "map": (dict(pool="map", class_token=False, gelu_approximate=True), 3),
    "map_over_class_token": (dict(pool="map"), 3),
    "registers_layer_scale": (dict(pool="gap", num_registers=3, layer_scale=True), 3),
    "fc_norm_gap": (dict(pool="gap", fc_norm=True, num_registers=2), 3),
    "fc_norm_tok_no_head": (dict(pool="tok", fc_norm=True), None),
    "swiglu_layer_scale": (dict(pool="gap", swiglu=True, layer_scale=True, num_registers=1), 3),
    "non_square_no_head": (dict(pool="tok", posemb_grid=(3, 5), mlp_dim=72), None),
    "clip": (dict(pool="tok", pre_norm=True, quick_gelu=True, ln_eps=1e-5), 3),
    "pre_norm_gap": (dict(pool="gap", class_token=False, pre_norm=True), 3),
}


def _pretrained(fields: dict, num_classes, seed: int = 0) -> checkpoints.Pretrained:
  model = dict(TINY, **fields)
  gh, gw = model["posemb_grid"]
  variables = ViT(num_classes=num_classes, **model).init(
      jax.random.key(0), np.zeros((1, 4 * gh, 4 * gw, 3), np.float32))
  leaves, tree = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree.unflatten(
      tree, [rng.normal(size=x.shape).astype(np.float32) * 0.2 for x in leaves])
  return checkpoints.Pretrained(params, model, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), "test")


def _load_in_timm(path):
  model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
  return model


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_save_timm_loads_in_timm_and_computes_the_vits_function(case, tmp_path):
  fields, num_classes = EXPORTS[case]
  pre = _pretrained(fields, num_classes)
  assert checkpoints.save_timm(tmp_path / "out", pre) == (
      timm_vit.SWIGLU_ARCHITECTURE if fields.get("swiglu") else
      timm_vit.CLIP_ARCHITECTURE if fields.get("ln_eps") == 1e-5 else timm_vit.EXPORT_ARCHITECTURE)
  model = _load_in_timm(tmp_path / "out")
  gh, gw = pre.model["posemb_grid"]
  images = _images((4 * gh, 4 * gw))
  assert _rel(_timm_logits(model, images), _ours(pre, images)) < 1e-5
  assert tuple(model.pretrained_cfg["mean"]) == pre.mean
  back = checkpoints.load(tmp_path / "out")  # and hydra_jax reads its own export back
  assert _rel(_ours(back, images), _ours(pre, images)) < 1e-6
  assert back.model["posemb_grid"] == (gh, gw)


def test_save_timm_of_a_hf_eps_model_warns_and_stays_close(tmp_path, caplog):
  pre = _pretrained(dict(pool="tok", ln_eps=1e-12), 3)
  with caplog.at_level(logging.WARNING):
    checkpoints.save_timm(tmp_path / "out", pre, labels=["a", "b", "c"], dtype="float32")
  assert "eps" in caplog.text
  model = _load_in_timm(tmp_path / "out")
  images = _images((16, 16))
  assert _rel(_timm_logits(model, images), _ours(pre, images)) < 1e-5
  assert json.loads((tmp_path / "out/config.json").read_text())["label_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("fields, message", [
    (dict(pool="tok+gap"), "no pool 'tok\\+gap'"),
    (dict(pool="tok", representation_size=8), "pre_logits"),
])
def test_save_timm_refuses_what_timm_does_not_compute(fields, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    checkpoints.save_timm(tmp_path / "out", _pretrained(fields, 3))
  assert not (tmp_path / "out").exists()


def test_save_timm_refuses_labels_that_do_not_fit_the_head(tmp_path):
  with pytest.raises(ValueError, match="labels has 2 names"):
    checkpoints.save_timm(tmp_path / "out", _pretrained(dict(pool="tok"), 3), labels=["a", "b"])


def test_export_cli_writes_a_timm_directory_in_bfloat16(tmp_path):
  pre = _pretrained(dict(pool="tok"), 3)
  checkpoints.save(tmp_path / "merged.safetensors", pre)
  export.main([str(tmp_path / "merged.safetensors"), "--timm", str(tmp_path / "timm"),
               "--dtype", "bfloat16"])
  model = _load_in_timm(tmp_path / "timm")
  images = _images((16, 16))
  assert _rel(_timm_logits(model.float(), images), _ours(pre, images)) < 2e-2


def test_real_backbone_exports_to_timm_and_computes_the_same_features(tmp_path):
  """The bundled pre-trained ViT-S/14 (DINOv2 layout: LayerScale, real attention patterns),
  pooled by its class token at 112 px, through timm: the same features."""
  pre = checkpoints.load(assets.default_backbone(), pool="tok", image_size=112)
  checkpoints.save_timm(tmp_path / "timm", pre)
  model = _load_in_timm(tmp_path / "timm")
  assert model.num_classes == 0 and model.blocks[0].ls1.gamma.shape == (384,)
  images = _images((112, 112))
  assert _rel(_timm_logits(model, images), _ours(pre, images)) < 1e-5


# PEFT LoRA on timm: timm packs a block's q/k/v in one nn.Linear (``attn.qkv``)

def _lora_logits(pre, trainable, spec, images):
  params = {**pre.params, **trainable.get("params", {})}
  logits, _ = adapters.apply_intercepted(checkpoints.build_model(pre), params,
                                         trainable["adapters"], spec, images)
  return np.asarray(logits)


_LINEAR = r"(MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_(0|1))"
PEFT_CASES = {  # ViT fields, the spec's targets and bias, adapted layers read back
    "query_value_only": (dict(pool="tok"), (r"Transformer/.*/(query|value)",), True, 4),
    "every_linear_map_registers": (
        dict(pool="map", num_registers=2, layer_scale=True),
        (rf"Transformer/encoderblock_\d+/{_LINEAR}", rf"MAPHead_0/{_LINEAR}"), False, 18),
    "swiglu_mlp": (dict(pool="gap", swiglu=True), (r"Transformer/.*/MlpBlock_0/Dense_\d",), True,
                   4),
    "clip": (dict(pool="tok", pre_norm=True, quick_gelu=True, ln_eps=1e-5),
             (r"Transformer/.*/(query|value|out)",), False, 6),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_on_timm_computes_the_factored_model(case, tmp_path):
  """peft on the save_timm model == hydra_jax's LoRA; load_peft reads it back, q/k/v unpacked."""
  fields, targets, bias, layers = PEFT_CASES[case]
  pre = _pretrained(fields, 3, seed=2)
  spec = adapters.AdapterSpec(kind="lora", targets=targets, rank=4, alpha=6.0, bias=bias)
  trainable = as_if_trained({"adapters": adapters.init(spec, pre.params, jax.random.key(1)),
                             "params": {"head": pre.params["head"]}}, 1)
  images = _images((16, 16))
  ours = _lora_logits(pre, trainable, spec, images)
  checkpoints.save_timm(tmp_path / "base", pre)
  assert checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre,
                               target="timm") == "VisionTransformer"
  model = peft.PeftModel.from_pretrained(_load_in_timm(tmp_path / "base"), tmp_path / "lora")
  assert _rel(_timm_logits(model.eval(), images), ours) < 1e-5
  back, back_spec = checkpoints.load_peft(tmp_path / "lora", checkpoints.load(tmp_path / "base"))
  assert len(back_spec.targets) == layers  # a q/k/v part left at zero is not adapted
  assert _rel(_lora_logits(pre, back, back_spec, images), ours) < 1e-5


def test_load_peft_reads_what_peft_trains_on_timm(tmp_path):
  """The usual PyTorch recipe (peft LoRA on timm's qkv, per-layer ranks, lora_bias, a saved
  head) read into hydra_jax: the same logits."""
  vit = _timm("vit_small_patch14_reg4_dinov2", img_size=28, depth=2, num_classes=4)
  pre = checkpoints.load(_save_for_hf(vit, tmp_path / "base"))
  config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "fc2", "attn.proj"],
                           rank_pattern={"fc2": 2}, lora_bias=True, modules_to_save=["head"],
                           init_lora_weights=False)
  model = peft.get_peft_model(vit, config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_B.bias" in name or "modules_to_save" in name:
        param.normal_(0, 0.3)
  model.eval().save_pretrained(tmp_path / "lora")
  images = _images(vit)
  theirs = _timm_logits(model, images)
  trainable, spec = checkpoints.load_peft(tmp_path / "lora", pre)
  block = trainable["adapters"]["Transformer"]["encoderblock_1"]
  assert sorted(block["MultiHeadDotProductAttention_0"]) == ["key", "out", "query", "value"]
  assert block["MlpBlock_0"]["Dense_1"]["A"].shape == (1536, 2) and spec.bias
  assert _rel(_lora_logits(pre, trainable, spec, images), theirs) < 1e-5


def test_export_cli_writes_a_lora_run_for_peft_on_timm(tmp_path):
  base, trainable, spec = finished_lora_run(tmp_path / "run", seed=3)
  export.main([str(tmp_path / "run"), "--peft", str(tmp_path / "peft"), "--peft-target", "timm"])
  model = peft.PeftModel.from_pretrained(_load_in_timm(tmp_path / "peft" / "base"),
                                         tmp_path / "peft" / "lora")
  images = _images((16, 16))
  ours = _lora_logits(base, trainable, spec, images)
  assert _rel(_timm_logits(model.eval(), images), ours) < 1e-5


def test_peft_on_timm_mixed_ranks_round_trip_unchanged(tmp_path):
  """Layers of other ranks go to PEFT's rank_pattern; save -> load -> save gives the same file
  (each packed part keeps only its own rank columns), and a LoRA not yet trained reads back
  whole (PEFT adapts all of q/k/v)."""
  pre = _pretrained(dict(pool="tok"), 3, seed=4)
  spec = adapters.AdapterSpec(kind="lora", targets=(r"Transformer/.*/(query|value|Dense_1)",),
                              rank=4, alpha=6.0)
  fresh = {"adapters": adapters.init(spec, pre.params, jax.random.key(0))}
  trainable = as_if_trained(fresh, 5)
  dense = trainable["adapters"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_1"]
  dense["A"], dense["B"] = dense["A"][:, :2], dense["B"][:2]  # as adapters.add or a rank_pattern
  images = _images((16, 16))
  ours = _lora_logits(pre, trainable, spec, images)
  checkpoints.save_timm(tmp_path / "base", pre)
  checkpoints.save_peft(tmp_path / "lora", trainable, spec, pre, target="timm")
  config = json.loads((tmp_path / "lora/adapter_config.json").read_text())
  assert config["r"] == 8 and config["rank_pattern"] == {
      r"blocks\.0\.mlp\.fc2": 2, r"blocks\.1\.mlp\.fc2": 4}
  model = peft.PeftModel.from_pretrained(_load_in_timm(tmp_path / "base"), tmp_path / "lora")
  assert _rel(_timm_logits(model.eval(), images), ours) < 1e-5
  back, back_spec = checkpoints.load_peft(tmp_path / "lora", pre)
  assert back["adapters"]["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"][
      "query"]["A"].shape == (32, 4)
  checkpoints.save_peft(tmp_path / "again", back, back_spec, pre, target="timm")
  first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora", "again"))
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_allclose(second[key], first[key], rtol=1e-6, atol=1e-7, err_msg=key)
  checkpoints.save_peft(tmp_path / "fresh", fresh, spec, pre, target="timm")
  _, fresh_spec = checkpoints.load_peft(tmp_path / "fresh", pre)
  assert len(fresh_spec.targets) == 2 * 3 + 2  # q, k, v whole in each block, and fc2


def test_load_peft_on_timm_refuses_the_patch_embedding_by_name(tmp_path):
  vit = _timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=2)
  pre = checkpoints.load(_save_for_hf(vit, tmp_path / "base"))
  model = peft.get_peft_model(vit, peft.LoraConfig(r=2, target_modules=["qkv", "proj"]))
  model.save_pretrained(tmp_path / "lora")
  with pytest.raises(ValueError, match="patch embedding, a convolution"):
    checkpoints.load_peft(tmp_path / "lora", pre)
