"""The ViT's padded attention path (what cuDNN runs), its rematerialisation policies, input
normalisation, stochastic depth, fc_norm and position-embedding resampling."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch

from hydra_jax import adapters as ad
from hydra_jax.models import ViT, posemb, vit

KW = dict(num_classes=5, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
          posemb_grid=(4, 4), pool="tok+gap")


@pytest.fixture
def padded_on_cpu(monkeypatch):
  """attention="cudnn" pads 17 tokens to 32 and masks by length; here XLA runs that same path."""
  monkeypatch.setitem(vit.IMPLEMENTATION, "cudnn", "xla")


def _setup():
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  params = ViT(**KW).init(jax.random.key(1), images)["params"]
  params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), (64, 5))
  return images, params


def _loss_and_grads(model, params, images):
  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, images)))  # noqa: E731
  return jax.value_and_grad(loss)(params)


def test_padded_attention_equals_unpadded(padded_on_cpu):
  images, params = _setup()
  loss, grads = _loss_and_grads(ViT(**KW, attention="xla"), params, images)
  loss_p, grads_p = _loss_and_grads(ViT(**KW, attention="cudnn"), params, images)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  for (path, g), g_p in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_p),
                            strict=True):
    # float32 rounding scales with the leaf's largest entries (cls: ~35), not with each entry
    atol = 1e-6 * max(1.0, float(np.abs(g).max()))
    np.testing.assert_allclose(g_p, g, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_padded_rows_stay_out_of_router_statistics_and_records(padded_on_cpu):
  images, params = _setup()
  spec = ad.AdapterSpec("hydralora", balance_weight=0.1, top_k=1)
  adapters = ad.init(spec, params, jax.random.key(3))
  adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(4), x.shape),
                          adapters)
  runs = [ad.apply_intercepted(ViT(**KW, attention=a), params, adapters, spec, images, record=True)
          for a in ("xla", "cudnn")]
  (out, aux), (out_p, aux_p) = runs
  np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_p["balance_loss"], aux["balance_loss"], rtol=1e-6)
  for name, w in aux["routing"].items():
    assert aux_p["routing"][name].shape == w.shape == (3, 17, spec.num_heads)
    np.testing.assert_allclose(aux_p["routing"][name], w, atol=1e-6)
  for name, branches in aux["branches"].items():
    for k, v in branches.items():
      np.testing.assert_allclose(aux_p["branches"][name][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat", ["block", "dots", True])
def test_remat_policies_give_the_same_gradients(remat):
  images, params = _setup()
  loss, grads = _loss_and_grads(ViT(**KW), params, images)
  loss_r, grads_r = _loss_and_grads(ViT(**KW, remat=remat), params, images)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r,
               grads)


@pytest.mark.parametrize("size", [(16, 2), (3, 16)])
def test_images_smaller_than_a_patch_are_refused(size):
  model = ViT(num_classes=3, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2,
              posemb_grid=(4, 4))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=rf"images of {size[0]}x{size[1]} pixels are smaller than "
                                       "one patch of 4"):
    model.apply(params, jnp.zeros((1, *size, 3)))
  # a remainder is left out, as a strided convolution does (SigLIP: 384 px, patch 14)
  np.testing.assert_array_equal(model.apply(params, jnp.ones((1, 18, 17, 3))),
                                model.apply(params, jnp.ones((1, 16, 16, 3))))


def test_unknown_remat_is_named():
  images, _ = _setup()
  with pytest.raises(ValueError, match=r"unknown remat 'all'; expected one of \('none', "):
    ViT(**KW, remat="all").init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="width 30 is not a multiple of num_heads 4"):
    ViT(**{**KW, "width": 30, "num_heads": 4}).init(jax.random.key(0), images)


def test_auto_attention_picks_cudnn_only_on_gpus_with_half_precision(monkeypatch):
  assert vit.resolve_attention("auto", jnp.bfloat16) == "xla"  # this CPU
  assert vit.resolve_attention("cudnn", jnp.float32) == "cudnn"  # explicit choices pass through
  gpu = types.SimpleNamespace(compute_capability="9.0")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [gpu])
  assert vit.resolve_attention("auto", jnp.bfloat16) == "cudnn"
  assert vit.resolve_attention("auto", jnp.float16) == "cudnn"
  assert vit.resolve_attention("auto", jnp.float32) == "xla"  # cuDNN's kernel takes bf16/fp16
  gpu.compute_capability = "7.5"  # T4: no flash attention in cuDNN
  assert vit.resolve_attention("auto", jnp.bfloat16) == "xla"


def test_uint8_images_are_normalised_on_the_device():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  raw = jax.random.randint(jax.random.key(5), (3, 16, 16, 3), 0, 256).astype(jnp.uint8)
  model = ViT(**KW, pixel_mean=mean, pixel_std=std)
  _, params = _setup()
  host = (np.asarray(raw, np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(model.apply({"params": params}, raw),
                             model.apply({"params": params}, host), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"uint8 images need ViT\(pixel_mean"):
    ViT(**KW).apply({"params": params}, raw)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
  x = jnp.ones((4000, 3, 2))
  y = vit.drop_path(x, 0.25, jax.random.key(0))
  per_sample = np.asarray(y).reshape(4000, -1)
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)  # all or none
  assert (per_sample.min(1) == per_sample.max(1)).all()
  assert abs(float((per_sample[:, 0] == 0).mean()) - 0.25) < 0.03
  assert abs(float(y.mean()) - 1.0) < 0.05


@pytest.mark.parametrize("remat", ["none", "block"])
def test_drop_path_only_with_its_rng(remat):
  """Evaluation (no rng) is the plain model; training samples the last block's branches (rate
  0 in the first block, as timm's linear schedule), so identical images part ways."""
  kw = dict(num_classes=3, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4,
            posemb_grid=(2, 2), remat=remat)
  images = jnp.tile(jax.random.normal(jax.random.key(1), (1, 8, 8, 3)), (64, 1, 1, 1))
  params = ViT(**kw).init(jax.random.key(0), images[:1])["params"]
  plain = ViT(**kw).apply({"params": params}, images, method="encode")
  model = ViT(**kw, drop_path=0.5)
  np.testing.assert_array_equal(model.apply({"params": params}, images, method="encode"), plain)
  trained = model.apply({"params": params}, images, method="encode",
                        rngs=vit.train_rngs(jax.random.key(2), train=True))
  outcomes = np.unique(np.round(np.asarray(trained).reshape(64, -1), 4), axis=0)
  assert 2 <= len(outcomes) <= 4  # attention and MLP branch of block 1, each kept or dropped
  assert vit.train_rngs(jax.random.key(2), train=False) == {}
  with pytest.raises(ValueError, match="drop_path 1.0 must be in"):
    ViT(**kw, drop_path=1.0).init(jax.random.key(0), images[:1])


def _layer_norm(x, norm):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_fc_norm_normalises_the_pooled_features_instead_of_the_tokens(pool):
  """fc_norm=True: the same blocks, whose tokens stay unnormed, and one LayerNorm
  (``pooled_norm``) on the pooled vector."""
  images, params = _setup()
  params["Transformer"]["encoder_norm"] = {  # not the identity: LN(LN(x)) would pass too
      "scale": 1.0 + 0.5 * jax.random.normal(jax.random.key(5), (32,)),
      "bias": 0.5 * jax.random.normal(jax.random.key(6), (32,))}
  plain_tokens = ViT(**KW).apply({"params": params}, images, method="encode")
  head = {"kernel": params["head"]["kernel"][:32], "bias": params["head"]["bias"]}
  transformer = dict(params["Transformer"])
  encoder_norm = transformer.pop("encoder_norm")
  norm = {"scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(3), (32,)),
          "bias": 0.1 * jax.random.normal(jax.random.key(4), (32,))}
  ours = {**params, "Transformer": transformer, "head": head, "pooled_norm": norm}
  model = ViT(**dict(KW, pool=pool), fc_norm=True)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
  assert shapes(model.init(jax.random.key(1), images)["params"]) == shapes(ours)
  tokens = model.apply({"params": ours}, images, method="encode")
  np.testing.assert_allclose(_layer_norm(tokens, encoder_norm), plain_tokens, rtol=1e-5,
                             atol=1e-5)
  pooled = tokens[:, 0] if pool == "tok" else tokens[:, 1:].mean(axis=1)
  want = _layer_norm(pooled, norm) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(model.apply({"params": ours}, images), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="fc_norm=True normalises one pooled feature"):
    ViT(**KW, fc_norm=True).init(jax.random.key(1), images)


def test_swiglu_mlp_gates_the_second_half_with_the_first():
  """swiglu=True: Dense_0 puts out [gate, value] (2 x mlp_dim), Dense_1 reads silu(gate) * value."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  mlp = vit._MlpBlock(24, swiglu=True)  # noqa: SLF001
  params = mlp.init(jax.random.key(1), x)["params"]
  assert params["Dense_0"]["kernel"].shape == (32, 48) and params["Dense_1"]["kernel"].shape == (
      24, 32)
  hidden = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  gate, value = hidden[..., :24], hidden[..., 24:]
  want = (gate * jax.nn.sigmoid(gate) * value) @ params["Dense_1"]["kernel"] + \
      params["Dense_1"]["bias"]
  np.testing.assert_allclose(mlp.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


# (stored grid, new grid): up, down (by 2, by a non-integer factor, 37 -> 16 as DINOv2 at 224),
# non-square both ways, from and to a single row
GRIDS = [((4, 4), (7, 7)), ((6, 6), (3, 3)), ((7, 7), (4, 4)), ((37, 37), (16, 16)),
         ((3, 5), (6, 2)), ((1, 4), (3, 9)), ((5, 3), (1, 2))]


def _torch_bicubic(grid: np.ndarray, new_hw, *, antialias: bool) -> np.ndarray:
  """(1, H, W, D) -> (1, H', W', D) by torch.nn.functional.interpolate, in grid's dtype."""
  x = torch.from_numpy(np.ascontiguousarray(grid.transpose(0, 3, 1, 2)))
  out = torch.nn.functional.interpolate(x, size=tuple(new_hw), mode="bicubic",
                                        align_corners=False, antialias=antialias)
  return out.numpy().transpose(0, 2, 3, 1)


def _scipy_zoom(grid: np.ndarray, new_hw) -> np.ndarray:
  """big_vision's resample_posemb (scipy.ndimage.zoom, order 1) with per-axis factors."""
  h, w = grid.shape[1:3]
  out = scipy.ndimage.zoom(grid[0], (new_hw[0] / h, new_hw[1] / w, 1), order=1)
  assert out.shape[:2] == tuple(new_hw), out.shape
  return out[None]


REFERENCES = {"bicubic": lambda g, hw: _torch_bicubic(g, hw, antialias=False),
              "bicubic_antialias": lambda g, hw: _torch_bicubic(g, hw, antialias=True),
              "linear_zoom": _scipy_zoom}


@pytest.mark.parametrize("method", posemb.RESAMPLES)
@pytest.mark.parametrize(("old", "new"), GRIDS)
def test_resize_matrices_match_their_reference(method, old, new):
  """Each convention's separable matrices against the code it copies, in float64."""
  grid = np.random.default_rng(0).normal(size=(1, *old, 5))
  ours = np.einsum("ih,bhwd->biwd", posemb.resize_matrix(old[0], new[0], method), grid)
  ours = np.einsum("jw,biwd->bijd", posemb.resize_matrix(old[1], new[1], method), ours)
  np.testing.assert_allclose(ours, REFERENCES[method](grid, new), rtol=0, atol=1e-6)
  if method != "bicubic" and max(old) > 1:  # the conventions do differ: the test can fail
    assert np.abs(ours - REFERENCES["bicubic"](grid, new)).max() > 1e-3


@pytest.mark.parametrize("method", posemb.RESAMPLES)
def test_encode_resamples_the_posemb_by_posemb_resample(method):
  """An input of another (non-square) size computes what a model storing the reference's
  resampled position embedding computes."""
  images = jax.random.normal(jax.random.key(0), (2, 24, 20, 3))  # a 6x5 grid; 4x4 stored
  kw = dict(KW, posemb_resample=method)
  params = ViT(**kw).init(jax.random.key(1), images[:, :16, :16])["params"]
  pos = np.asarray(params["pos_embedding"])
  grid = REFERENCES[method](pos[:, 1:].reshape(1, 4, 4, -1), (6, 5)).reshape(1, 30, -1)
  stored = {**params, "pos_embedding": np.concatenate([pos[:, :1], grid], axis=1)}
  want = ViT(**dict(kw, posemb_grid=(6, 5))).apply({"params": stored}, images, method="encode")
  got = ViT(**kw).apply({"params": params}, images, method="encode")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_posemb_resample_is_named():
  with pytest.raises(ValueError, match=r"unknown posemb_resample 'bilinear'; expected one of "
                                       r"\('bicubic', 'bicubic_antialias', 'linear_zoom'\)"):
    ViT(**KW, posemb_resample="bilinear").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
