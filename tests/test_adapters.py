"""Adapters: specs, equivalence of the merge and activation paths, closed forms, counts, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hydra_jax import adapters as ad
from hydra_jax.models import ViT, variant

MERGEABLE = ("lora", "sequential", "hydra")


@pytest.fixture(scope="module")
def tiny():
  model = ViT(num_classes=5, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
              posemb_grid=(4, 4))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = model.init(jax.random.key(1), images)["params"]
  # a non-zero head, so logits depend on the backbone
  params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), (32, 5))
  return model, params, images


def randomize(adapters, seed=0, std=0.1):
  """Random non-zero factors (B's included), so equivalences are not trivially about zeros."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("kind", ad.KINDS)
def test_zero_init_is_the_base_model(tiny, kind):
  model, params, images = tiny
  spec = ad.AdapterSpec(kind)
  adapters = ad.init(spec, params, jax.random.key(3))
  base = model.apply({"params": params}, images)
  logits, aux = ad.forward(model, params, adapters, spec, images)
  inter, _ = ad.apply_intercepted(model, params, adapters, spec, images)
  np.testing.assert_array_equal(np.asarray(inter), np.asarray(base))
  np.testing.assert_allclose(logits, base, rtol=0, atol=1e-6)
  assert float(aux["balance_loss"]) == 0.0


@pytest.mark.parametrize("kind", MERGEABLE)
def test_merge_equals_activation_path(tiny, kind):
  model, params, images = tiny
  spec = ad.AdapterSpec(kind)
  adapters = randomize(ad.init(spec, params, jax.random.key(3)))
  merged = jax.jit(lambda p, a: ad.merge(p, a, spec))(params, adapters)
  ref, _ = ad.apply_intercepted(model, params, adapters, spec, images, method="encode")
  out = model.apply({"params": merged}, images, method="encode")
  base = model.apply({"params": params}, images, method="encode")
  assert rel_err(out, ref) < 1e-5
  assert rel_err(base, ref) > 1e-3  # the adapters really change the model
  logits, _ = ad.forward(model, params, adapters, spec, images)
  np.testing.assert_allclose(logits, model.apply({"params": merged}, images), atol=1e-6)


def test_hydralora_merge_with_fixed_routing(tiny):
  model, params, images = tiny
  spec = ad.AdapterSpec("hydralora")
  adapters = randomize(ad.init(spec, params, jax.random.key(3)))
  weights = jnp.array([0.5, 0.3, 0.2])
  merged = ad.merge(params, adapters, spec, routing=weights)
  ref, _ = ad.apply_intercepted(model, params, adapters, spec, images, routing=weights)
  assert rel_err(model.apply({"params": merged}, images), ref) < 1e-5
  # a zero router routes uniformly: the routed model equals the merge with uniform weights
  flat = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "router" else x, adapters)
  routed, _ = ad.forward(model, params, flat, spec, images)
  uniform = ad.merge(params, flat, spec, routing=jnp.full((3,), 1 / 3))
  assert rel_err(model.apply({"params": uniform}, images), routed) < 1e-5
  with pytest.raises(ValueError, match="routing"):
    ad.merge(params, adapters, spec)
  for wrong in ([0.25] * 4, [0.5, 0.5], 1.0):  # one weight per head (3), or a clear error
    with pytest.raises(ValueError, match=r"have shape \(\d*,?\); expected \(3,\), one weight"):
      ad.merge(params, adapters, spec, routing=jnp.asarray(wrong))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 3\), one weight per head"):
      ad.apply_intercepted(model, params, adapters, spec, images, routing=jnp.asarray(wrong))
  per_token = jnp.full((4, 3), 1 / 3)  # acts on activations, not on the weights
  with pytest.raises(ValueError, match=r"have shape \(4, 3\); expected \(3,\).*apply_intercepted"):
    ad.merge(params, adapters, spec, routing=per_token)


def _closed_form(w, b, f, s):
  """The exact merge: W' = W + s(A_p B_p + W A_s B_s),
  b' = b + s(a_p B_p + b_p + (b A_s + a_s) B_s + b_s)."""
  f = {k: np.asarray(v, np.float64) for k, v in f.items()}
  w2 = w + s * (f["A_p"] @ f["B_p"] + w @ f["A_s"] @ f["B_s"])
  b2 = b + s * (f["a_p"] @ f["B_p"] + f["b_p"] + (b @ f["A_s"] + f["a_s"]) @ f["B_s"] + f["b_s"])
  return w2, b2


@pytest.mark.parametrize("kernel_shape,bias_shape", [((12, 10), (10,)), ((2, 4, 8), (8,)),
                                                     ((8, 2, 4), (2, 4))])
def test_hydra_merge_closed_form(kernel_shape, bias_shape):
  rng = np.random.default_rng(0)
  params = {"layer": {"kernel": rng.normal(size=kernel_shape).astype(np.float32),
                      "bias": rng.normal(size=bias_shape).astype(np.float32)}}
  spec = ad.AdapterSpec("hydra", targets=("layer",), rank=3, scale=0.7)
  adapters = randomize(ad.init(spec, params, jax.random.key(0)), std=0.5)
  merged = ad.merge(params, adapters, spec)["layer"]
  d_out = int(np.prod(bias_shape))
  w = np.asarray(params["layer"]["kernel"], np.float64).reshape(-1, d_out)
  b = np.asarray(params["layer"]["bias"], np.float64).reshape(d_out)
  w2, b2 = _closed_form(w, b, adapters["layer"], 0.7)
  np.testing.assert_allclose(merged["kernel"], w2.reshape(kernel_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["bias"], b2.reshape(bias_shape), rtol=1e-5, atol=1e-5)
  d = ad.delta(params, adapters, spec)["layer"]
  assert d["kernel"].shape == kernel_shape and d["bias"].shape == bias_shape


def _b16_params():
  model = ViT(num_classes=None, **variant("B/16"))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  return shapes["params"]


@pytest.mark.parametrize("spec,expected", [(ad.AdapterSpec("hydra"), 239_712),
                                           (ad.AdapterSpec("lora"), 294_912)])
def test_parameter_counts_vit_b16(spec, expected):
  adapters = jax.eval_shape(lambda: ad.init(spec, _b16_params(), jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(adapters)) == expected


def test_tree_layout_and_defaults(tiny):
  _, params, _ = tiny
  hydra = ad.init(ad.AdapterSpec("hydra"), params, jax.random.key(0))
  blocks = hydra["Transformer"]
  assert sorted(blocks) == ["encoderblock_0", "encoderblock_1"]
  f = blocks["encoderblock_0"]["MlpBlock_0"]["Dense_1"]
  assert sorted(f) == ["A_p", "A_s", "B_p", "B_s", "a_p", "a_s", "b_p", "b_s"]
  assert f["A_p"].shape == (64, 2) and f["A_s"].shape == (32, 2) and f["B_p"].shape == (2, 32)
  out = blocks["encoderblock_0"]["MultiHeadDotProductAttention_0"]["out"]
  assert out["A_p"].shape == (32, 2)  # (H*Dh, r)
  lora = ad.init(ad.AdapterSpec("lora"), params, jax.random.key(0))
  q = lora["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["query"]
  assert sorted(q) == ["A", "B"] and q["A"].shape == (32, 8) and q["B"].shape == (8, 32)
  hl = ad.init(ad.AdapterSpec("hydralora"), params, jax.random.key(0))
  v = hl["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["value"]
  assert v["B"].shape == (3, 8, 32) and v["router"].shape == (32, 3)
  assert ad.AdapterSpec("lora").scaling == 1.0 and ad.AdapterSpec("hydralora").scaling == 1.0
  assert ad.AdapterSpec("hydralora", alpha=16.0).scaling == 2.0
  seq = ad.AdapterSpec("sequential", rank=4)
  assert seq.rank_sequential == 4 and seq.rank_parallel is None
  assert ad.AdapterSpec("hydra", rank=4, rank_parallel=1).rank_sequential == 4


def test_spec_from_config():
  cfg = ml_collections.ConfigDict(dict(kind="hydra", targets=[r".*/out"], scale=0.1, dropout=0.2))
  spec = ad.spec_from_config(cfg)
  assert spec == ad.AdapterSpec("hydra", targets=(r".*/out",), scale=0.1, dropout=0.2)
  with pytest.raises(ValueError, match="ranc"):
    ad.spec_from_config(dict(kind="lora", ranc=4))


@pytest.mark.parametrize("kind,field,value", [
    ("lora", "scale", 3.0), ("hydra", "alpha", 64.0), ("sequential", "rank_parallel", 2),
    ("lora", "top_k", 1), ("hydra", "balance_weight", 0.1), ("lora", "num_heads", 4)])
def test_fields_the_kind_does_not_read_are_refused(kind, field, value, caplog):
  with pytest.raises(ValueError, match=f"fields {{'{field}': {value}}} are not read by kind "
                     f"'{kind}'"):
    ad.AdapterSpec(kind, **{field: value})
  # from a config (the command line cannot unset a field): dropped, with a warning naming it
  spec = ad.spec_from_config(dict(kind=kind, **{field: value}))
  assert spec == ad.AdapterSpec(kind)
  assert f"'{field}': {value}" in caplog.text and "not read by kind" in caplog.text


def test_errors(tiny):
  _, params, _ = tiny
  with pytest.raises(ValueError, match="unknown adapter kind 'loha'"):
    ad.AdapterSpec("loha")
  with pytest.raises(ValueError, match="dropout"):
    ad.AdapterSpec("hydra", dropout=-0.1)
  with pytest.raises(ValueError, match="top_k"):
    ad.AdapterSpec("hydralora", top_k=4)
  for field, value in [("rank", 2.5), ("rank", 0), ("num_heads", True), ("top_k", 1.0)]:
    kind = "lora" if field == "rank" else "hydralora"
    with pytest.raises(ValueError, match=f"AdapterSpec.{field} must be an integer >= 1; got "
                                         f"{value!r}"):
      ad.AdapterSpec(kind, **{field: value})
  with pytest.raises(ValueError, match=r"AdapterSpec.targets pattern '.\*/\(query' is not a "
                                       "regular expression: missing \\)"):
    ad.AdapterSpec("lora", targets=(".*/(query",))
  with pytest.raises(ValueError, match="Dense_7"):
    ad.init(ad.AdapterSpec("lora", targets=(r".*/query", r".*/Dense_7")), params,
            jax.random.key(0))
  with pytest.raises(ValueError, match=r"rank 40 .*Attention_0/out \(d_in=32, d_out=32\)"):
    ad.init(ad.AdapterSpec("hydra", rank=40), params, jax.random.key(0))


def test_record_and_disable(tiny):
  model, params, images = tiny
  spec = ad.AdapterSpec("hydra")
  adapters = randomize(ad.init(spec, params, jax.random.key(3)))
  _, aux = ad.apply_intercepted(model, params, adapters, spec, images, record=True)
  name = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out"
  assert set(aux["branches"][name]) == {"parallel", "sequential"}
  assert aux["branches"][name]["parallel"].shape == (2, 17, 32)
  # switching the parallel branch off == the same adapters without the parallel factors
  seq_only = jax.tree_util.tree_map_with_path(lambda p, x: x, adapters)
  for layer in ad.transform.factor_dicts(seq_only):
    for k in ("A_p", "B_p", "a_p", "b_p"):
      del layer[1][k]
  off, _ = ad.apply_intercepted(model, params, adapters, spec, images, disable=("parallel",))
  ref = model.apply({"params": ad.merge(params, seq_only, spec)}, images)
  assert rel_err(off, ref) < 1e-5
  with pytest.raises(ValueError, match=r"no branch of this hydra adapter: \['paralel'\]; its "
                                       r"branches: \['parallel', 'sequential'\]"):
    ad.apply_intercepted(model, params, adapters, spec, images, disable=("paralel",))


def test_dropout_path(tiny):
  model, params, images = tiny
  spec = ad.AdapterSpec("hydra", dropout=0.5)
  adapters = randomize(ad.init(spec, params, jax.random.key(3)), std=0.3)
  run = jax.jit(lambda rng, train: ad.forward(model, params, adapters, spec, images, rng=rng,
                                              train=train)[0], static_argnums=1)
  a, b = run(jax.random.key(7), True), run(jax.random.key(7), True)
  np.testing.assert_array_equal(a, b)
  assert rel_err(run(jax.random.key(8), True), a) > 1e-4
  clean = run(jax.random.key(7), False)
  assert rel_err(a, clean) > 1e-4
  no_drop = ad.AdapterSpec("hydra")
  ref = model.apply({"params": ad.merge(params, adapters, no_drop)}, images)
  np.testing.assert_allclose(clean, ref, atol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    ad.forward(model, params, adapters, spec, images, train=True)


@pytest.mark.parametrize("kind", ad.KINDS)
@pytest.mark.parametrize("space", ["activations", "weights"])
def test_total_is_the_sum_of_the_branches(kind, space):
  """``total`` (one concatenated matmul, what training runs) == the branches one by one."""
  spec = ad.AdapterSpec(kind, bias=True, num_heads=3)
  layer = ad.spec.Layer(("l",), (12,), (10,))
  f = randomize(ad.kinds.init_factors(jax.random.key(0), layer, spec), std=0.5)
  w = jax.random.normal(jax.random.key(1), (12, 10))
  if space == "activations":
    x = jax.random.normal(jax.random.key(2), (4, 5, 12))
    y0, routing = x @ w, None
  else:  # the merge's dW: x = identity, y0 = W (HydraLoRA needs fixed routing there)
    x, y0, routing = None, w, (jnp.array([0.2, 0.3, 0.5]) if kind == "hydralora" else None)
  out, probs = ad.kinds.outputs(f, x, y0, spec, routing=routing)
  tot, probs_t = ad.kinds.total(f, x, y0, spec, routing=routing)
  assert len(out) == {"hydra": 2, "hydralora": 3}.get(kind, 1)
  np.testing.assert_allclose(tot, sum(out.values()), rtol=1e-5, atol=1e-6)
  assert (probs is None) == (probs_t is None)
