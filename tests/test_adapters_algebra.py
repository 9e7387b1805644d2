"""Adapter algebra: scale, negate, add, weighted sums, combine, and unmerge (Woodbury)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import adapters as ad


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return {"blk": {"dense": {"kernel": rng.normal(size=(12, 10)).astype(np.float32),
                            "bias": rng.normal(size=(10,)).astype(np.float32)},
                  "attn_out": {"kernel": rng.normal(size=(2, 4, 10)).astype(np.float32),
                               "bias": rng.normal(size=(10,)).astype(np.float32)}}}


def spec_of(kind, **kw):
  return ad.AdapterSpec(kind, targets=("blk/(dense|attn_out)",), rank=2, **kw)


def random_adapters(spec, params, seed):
  leaves, treedef = jax.tree.flatten(ad.init(spec, params, jax.random.key(seed)))
  keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def assert_trees_close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def manual_combination(params, items):
  """W + sum_i w_i delta_i(W), assembled leaf by leaf from delta()."""
  out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for w, spec, adapters in items:
    d = ad.delta(params, adapters, spec)
    out = jax.tree.map(lambda o, dd, w=w: o + w * np.asarray(dd, np.float64), out, d)
  return out


@pytest.mark.parametrize("kind", ["lora", "sequential", "hydra"])
def test_weighted_sum_merges_to_weighted_deltas(params, kind):
  spec = spec_of(kind)
  x, y = random_adapters(spec, params, 1), random_adapters(spec, params, 2)
  total = ad.weighted_sum([(0.7, x), (-1.3, y)], spec)
  expected = manual_combination(params, [(0.7, spec, x), (-1.3, spec, y)])
  assert_trees_close(ad.merge(params, total, spec), expected)
  assert_trees_close(ad.combine(params, [(0.7, spec, x), (-1.3, spec, y)]), expected)
  rank = total["blk"]["dense"]["A_s" if kind != "lora" else "A"].shape[-1]
  assert rank == 4  # ranks concatenated, read back from the factor shapes


@pytest.mark.parametrize("kind", ["lora", "hydra"])
def test_add_then_merge_equals_combine(params, kind):
  spec = spec_of(kind)
  x, y = random_adapters(spec, params, 3), random_adapters(spec, params, 4)
  summed = ad.merge(params, ad.add(x, y, spec), spec)
  assert_trees_close(summed, ad.combine(params, [(1.0, spec, x), (1.0, spec, y)]))
  only_x = {"blk": {"dense": x["blk"]["dense"]}}  # a layer adapted in x alone is carried over
  factors = set(x["blk"]["dense"])
  total = ad.add(only_x, {"blk": {"attn_out": y["blk"]["attn_out"]}}, spec)
  total["blk"]["dense"].clear()  # editing the result leaves x as it was
  assert factors and set(x["blk"]["dense"]) == factors


def test_scale_and_negate(params):
  spec = spec_of("hydra")
  x = random_adapters(spec, params, 5)
  d = ad.delta(params, x, spec)
  assert_trees_close(ad.delta(params, ad.scale(x, 2.5, spec), spec),
                     jax.tree.map(lambda v: 2.5 * v, d))
  assert_trees_close(ad.delta(params, ad.negate(x, spec), spec), jax.tree.map(lambda v: -v, d))
  assert_trees_close(ad.merge(params, ad.add(x, ad.negate(x, spec), spec), spec), params)


def test_combine_mixed_kinds(params):
  hydra, lora, hl = spec_of("hydra"), spec_of("lora"), spec_of("hydralora")
  xh, xl, xq = (random_adapters(hydra, params, 6), random_adapters(lora, params, 7),
                random_adapters(hl, params, 8))
  routing = jnp.array([0.2, 0.5, 0.3])
  got = ad.combine(params, [(0.5, hydra, xh), (2.0, lora, xl), (1.0, hl, xq, routing)])
  ref = manual_combination(params, [(0.5, hydra, xh), (2.0, lora, xl)])
  dq = ad.delta(params, xq, hl, routing=routing)
  ref = jax.tree.map(lambda r, d: r + np.asarray(d, np.float64), ref, dq)
  assert_trees_close(got, ref)
  with pytest.raises(ValueError, match="hydralora"):
    ad.add(xq, xq, hl)


@pytest.mark.parametrize("kind", ["lora", "sequential", "hydra"])
def test_merge_then_unmerge(params, kind):
  spec = spec_of(kind, **({"scale": 0.8} if kind != "lora" else {}))
  x = random_adapters(spec, params, 9)
  back = jax.jit(lambda m, a: ad.unmerge(m, a, spec))(ad.merge(params, x, spec), x)
  assert_trees_close(back, params, tol=2e-5)


def test_unmerge_matches_explicit_solve(params):
  """Woodbury against numpy: [W; b] = [W' - sA_pB_p; b' - c] inv(I + s A_s B_s), float64."""
  spec = spec_of("hydra", scale=1.5)
  x = random_adapters(spec, params, 10)
  merged = {"blk": {k: jax.tree.map(lambda v: v + 0.5, m) for k, m in params["blk"].items()}}
  got = ad.unmerge(merged, x, spec)["blk"]["dense"]
  f = {k: np.asarray(v, np.float64) for k, v in x["blk"]["dense"].items()}
  s = 1.5
  w_m = np.asarray(merged["blk"]["dense"]["kernel"], np.float64)
  b_m = np.asarray(merged["blk"]["dense"]["bias"], np.float64)
  inv = np.linalg.inv(np.eye(10) + s * f["A_s"] @ f["B_s"])
  w = (w_m - s * f["A_p"] @ f["B_p"]) @ inv
  c = s * (f["a_p"] @ f["B_p"] + f["b_p"] + f["a_s"] @ f["B_s"] + f["b_s"])
  b = (b_m - c) @ inv
  np.testing.assert_allclose(got["kernel"], w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["bias"], b, rtol=1e-5, atol=1e-5)


# --- mismatched adapters are refused, by name ------------------------------------------------

def test_adapters_of_another_kind_are_refused(params):
  lora, hydra = random_adapters(spec_of("lora"), params, 1), random_adapters(spec_of("hydra"),
                                                                             params, 2)
  with pytest.raises(ValueError, match=r"layer blk/attn_out: factors \['A', 'B'\] are not hydra"):
    ad.merge(params, lora, spec_of("hydra"))  # used to return params unchanged
  with pytest.raises(ValueError, match="are not hydra factors"):
    ad.combine(params, [(1.0, spec_of("hydra"), lora)])
  with pytest.raises(ValueError, match="are not lora factors; expected A, B"):
    ad.merge(params, hydra, spec_of("lora"))
  with pytest.raises(ValueError, match="are not sequential factors"):
    ad.merge(params, hydra, spec_of("sequential"))  # its parallel branch would be dropped
  with pytest.raises(ValueError, match="are not hydralora factors"):
    ad.merge(params, lora, spec_of("hydralora"), routing=jnp.ones(3) / 3)


def test_factors_of_the_wrong_shape_are_refused(params):
  spec = spec_of("lora")
  wide = ad.init(spec, {"blk": {"dense": {"kernel": np.zeros((16, 10), np.float32),
                                          "bias": np.zeros(10, np.float32)}}}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"blk/dense: lora factor A has shape \(16, 2\); "
                                       r"expected \(12, 2\)"):
    ad.merge(params, wide, spec)
  biased = spec_of("lora", bias=True)
  bad = random_adapters(biased, params, 3)
  bad["blk"]["dense"]["b"] = jnp.ones(1)  # used to broadcast into every bias entry
  with pytest.raises(ValueError, match=r"factor b has shape \(1,\); expected \(10,\)"):
    ad.delta(params, bad, biased)
  with pytest.raises(ValueError, match=r"factor A has shapes \(12, 2\) and \(16, 2\)"):
    ad.add(random_adapters(spec, params, 4), wide, spec)


def test_empty_adapters_change_nothing(params):
  for empty in ({}, {"blk": {}}):
    merged = ad.merge(params, empty, spec_of("hydra"))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
      np.testing.assert_array_equal(x, y)
    assert ad.scale(empty, 2.0, spec_of("hydra")) == {}
  with pytest.raises(ValueError, match="mix arrays and dicts"):
    ad.merge(params, {"blk": {"dense": {"A": jnp.ones((12, 2))}, "x": jnp.ones(2)}},
             spec_of("lora"))


def test_one_routing_dict_serves_a_mixed_combine(params):
  hl = ad.AdapterSpec("hydralora", targets=("blk/dense",), rank=2)
  lora = spec_of("lora")  # on blk/attn_out too, which the routing does not name
  a, b = random_adapters(hl, params, 5), random_adapters(lora, params, 6)
  routing = {"blk/dense": jnp.array([0.2, 0.3, 0.5])}
  mixed = ad.combine(params, [(0.5, hl, a), (0.5, lora, b)], routing=routing)  # lora ignores it
  each = ad.combine(params, [(0.5, hl, a, routing), (0.5, lora, b)])
  for x, y in zip(jax.tree.leaves(mixed), jax.tree.leaves(each), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["lora", "hydralora", "hydra"])
def test_bf16_factors_give_float32_deltas(params, kind):
  spec = spec_of(kind, bias=True)
  f32 = random_adapters(spec, params, 7)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
  exact = jax.tree.map(lambda x: x.astype(jnp.float32), bf16)  # the same values, in float32
  routing = jnp.array([0.2, 0.3, 0.5]) if kind == "hydralora" else None
  got = ad.delta(params, bf16, spec, routing=routing)
  want = ad.delta(params, exact, spec, routing=routing)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
