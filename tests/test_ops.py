"""models.ops: flax's LayerNorm and jax's GELU, the same functions and gradients, keeping less
for the backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hydra_jax.models import ViT
from hydra_jax.models.ops import LayerNorm, gelu, quick_gelu


def _inputs(dtype, seed=0, shape=(3, 7, 48)):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], shape) * 3.0 + 5.0  # a mean away from 0
  params = {"params": {"scale": 1 + 0.5 * jax.random.normal(k[1], shape[-1:]),
                       "bias": jax.random.normal(k[2], shape[-1:])}}
  weights = jax.random.normal(k[3], shape)  # a cotangent that differs per element
  return x.astype(dtype), params, weights


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _loss_grads(module, x, params, weights):
  def loss(x, params):
    return (module.apply(params, x).astype(jnp.float32) * weights).sum()
  return jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(x, params))  # dx, dbias, dscale


# (B, D): the pooled features fc_norm normalises; (B, T, D): tokens; 4-D: anything else
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 48), (2, 3, 7, 8)])
@pytest.mark.parametrize("eps", [1e-6, 1e-12])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_function_and_gradients_as_flax(dtype, eps, shape):
  x, params, weights = _inputs(dtype, shape=shape)
  ours, ref = LayerNorm(epsilon=eps, dtype=dtype), _flax(epsilon=eps, dtype=dtype)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, ref.init(jax.random.key(0), x))  # the same params: checkpoints load as before
  y, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y.dtype == y_ref.dtype == dtype
  # float32: rounding only; bf16: the same float32 values rounded, at most a unit apart
  tol = 1e-6 if dtype == jnp.float32 else 2.0**-7
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             rtol=tol, atol=tol)
  grads = _loss_grads(ours, x, params, weights)
  grads_ref = _loss_grads(ref, x, params, weights)
  assert [g.dtype for g in grads] == [dtype, jnp.float32, jnp.float32]
  if dtype == jnp.float32:
    for got, want in zip(grads, grads_ref, strict=True):
      assert _rel(got, want) < 1e-5
    return
  # bf16 inputs: each gradient no further from float32's than flax's own bf16 gradient
  exact = _loss_grads(ref, x.astype(jnp.float32), params, weights)
  for got, theirs, want in zip(grads, grads_ref, exact, strict=True):
    # (dbias does not depend on x: flax's is exact there, ours off by float32 rounding)
    assert _rel(got, want) <= max(_rel(theirs, want) * 1.05, 1e-6) and _rel(got, want) < 1e-2


def _flax(**kwargs) -> nn.LayerNorm:
  """flax's LayerNorm with the two-pass variance ours computes."""
  return nn.LayerNorm(use_fast_variance=False, **kwargs)


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_a_large_mean_against_the_spread_keeps_float32_accuracy(offset):
  """Rows whose mean is ``offset`` standard deviations: output and gradients within float32
  rounding of float64 LayerNorm (E[x^2] - E[x]^2 was 4e-4 and 5e-2 off)."""
  x, params, weights = _inputs(jnp.float32, shape=(3, 7, 768))
  x = x + offset * x.std()
  y = LayerNorm().apply(params, x)
  grads = _loss_grads(LayerNorm(), x, params, weights)
  with jax.enable_x64(True):
    x64, p64 = np.asarray(x, np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    y64 = _flax(param_dtype=jnp.float64).apply(p64, x64)
    exact = _loss_grads(_flax(param_dtype=jnp.float64), x64, p64, np.asarray(weights, np.float64))
  assert _rel(y, y64) < 1e-4
  for got, want in zip(grads, exact, strict=True):
    assert _rel(got, want) < 1e-4


def test_constant_rows_and_float64():
  """A constant row (variance 0: no NaN, gradient finite); float64 x computes in float64 as flax
  does (with jax_enable_x64)."""
  x = jnp.full((2, 3, 16), 848.44293)  # float32's E[x^2] - E[x]^2 is -0.4375 here
  params = {"params": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}
  y, grads = jax.value_and_grad(lambda x: LayerNorm().apply(params, x).sum())(x)
  assert np.isfinite(y) and np.isfinite(np.asarray(grads)).all()
  with jax.enable_x64(True):
    x, params, weights = _inputs(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    y = LayerNorm(param_dtype=jnp.float64).apply(params, x)
    y_ref = _flax(param_dtype=jnp.float64).apply(params, x)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_loss_grads(LayerNorm(), x, params, weights),
                         _loss_grads(_flax(), x, params, weights), strict=True):
      assert got.dtype == want.dtype and _rel(got, want) < 1e-12


def test_output_dtype_follows_flax_without_a_dtype():
  x, params, _ = _inputs(jnp.bfloat16)
  assert LayerNorm().apply(params, x).dtype == nn.LayerNorm().apply(params, x).dtype == jnp.float32


def test_backward_keeps_the_input_and_two_numbers_per_token():
  """What the vjp closes over: flax's keeps three float32 tensors of the input's size; this
  one the bf16 input, a float32 mean and reciprocal std per token, and the (D,) scale and
  bias."""
  x, params, _ = _inputs(jnp.bfloat16)

  def saved(module):
    _, vjp = jax.vjp(lambda x: module.apply(params, x), x)
    return sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(vjp))

  full = (x.shape, "float32")
  assert saved(nn.LayerNorm(dtype=jnp.bfloat16)).count(full) == 3
  assert saved(LayerNorm(dtype=jnp.bfloat16)) == sorted(
      [(x.shape, "bfloat16"), ((3, 7, 1), "float32"), ((3, 7, 1), "float32"), ((48,), "float32"),
       ((48,), "float32")])


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_is_jax_gelu_with_its_gradient(approximate):
  x = jax.random.normal(jax.random.key(0), (4, 1000)) * 3  # tails, where erf and tanh saturate
  w = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(gelu(x, approximate), jax.nn.gelu(x, approximate=approximate))
  np.testing.assert_array_equal(gelu(x.astype(jnp.bfloat16), approximate),
                                jax.nn.gelu(x.astype(jnp.bfloat16), approximate=approximate))
  grad = lambda f, x: jax.grad(lambda x: (f(x).astype(jnp.float32) * w).sum())(x)  # noqa: E731
  want = grad(lambda x: jax.nn.gelu(x, approximate=approximate), x)
  # float32 rounding of tanh / erf near the tails: both are ~4e-6 from float64 at worst
  np.testing.assert_allclose(grad(lambda x: gelu(x, approximate), x), want, rtol=1e-5, atol=1e-5)
  # bf16: the derivative in float32, so no further from float32's than autodiff's bf16 one
  x16 = x.astype(jnp.bfloat16)
  ours = grad(lambda x: gelu(x, approximate), x16)
  theirs = grad(lambda x: jax.nn.gelu(x, approximate=approximate), x16)
  assert ours.dtype == jnp.bfloat16
  want16 = grad(lambda x: jax.nn.gelu(x, approximate=approximate), x16.astype(jnp.float32))
  assert _rel(ours, want16) <= _rel(theirs, want16) and _rel(ours, want16) < 5e-3
  with jax.enable_x64(True):  # float64 x: the derivative in float64
    x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
    d = jax.grad(lambda x: (gelu(x, approximate) * w64).sum())(x64)
    d_ref = jax.grad(lambda x: (jax.nn.gelu(x, approximate=approximate) * w64).sum())(x64)
    assert d.dtype == jnp.float64 and _rel(d, d_ref) < 1e-12


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_backward_keeps_only_its_input(approximate):
  x = jnp.linspace(-4, 4, 60, dtype=jnp.bfloat16).reshape(3, 20)
  _, vjp = jax.vjp(lambda x: gelu(x, approximate), x)
  assert [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(vjp)] == [(x.shape, x.dtype)]
  _, vjp = jax.vjp(lambda x: jax.nn.gelu(x, approximate=approximate), x)
  assert len([leaf for leaf in jax.tree.leaves(vjp) if leaf.shape == x.shape]) >= 3


def test_quick_gelu_is_torchs_with_its_gradient_and_keeps_only_its_input():
  """float32: PyTorch's QuickGELU (transformers', timm's: x * sigmoid(1.702 x)) to rounding;
  bf16: the float32 value rounded once, nearer float64's than PyTorch's op-by-op bf16."""
  x = jax.random.normal(jax.random.key(0), (4, 1000)) * 4
  w = jax.random.normal(jax.random.key(1), x.shape)
  with torch.no_grad():
    theirs = lambda x: np.asarray(  # noqa: E731
        (lambda t: (t * torch.sigmoid(1.702 * t)).float())(torch.from_numpy(np.array(
            x.astype(jnp.float32))).to(torch.bfloat16 if x.dtype == jnp.bfloat16 else
                                       torch.float32)))
  np.testing.assert_allclose(quick_gelu(x), theirs(x), rtol=1e-6, atol=1e-6)
  x16 = x.astype(jnp.bfloat16)
  ours16 = quick_gelu(x16)
  np.testing.assert_array_equal(ours16, quick_gelu(x16.astype(jnp.float32)).astype(jnp.bfloat16))
  with jax.enable_x64(True):
    exact = np.asarray(quick_gelu(x16.astype(jnp.float64)))
  assert (np.abs(np.asarray(ours16, np.float64) - exact).mean()
          < np.abs(theirs(x16).astype(np.float64) - exact).mean())
  reference = lambda x: x * jax.nn.sigmoid(1.702 * x)  # noqa: E731
  grad = lambda f, x: jax.grad(lambda x: (f(x).astype(jnp.float32) * w).sum())(x)  # noqa: E731
  np.testing.assert_allclose(grad(quick_gelu, x), grad(reference, x), rtol=1e-6, atol=1e-6)
  want16 = grad(reference, x16.astype(jnp.float32))
  ours, theirs16 = grad(quick_gelu, x16), grad(reference, x16)
  assert ours.dtype == jnp.bfloat16 and _rel(ours, want16) <= _rel(theirs16, want16)
  _, vjp = jax.vjp(quick_gelu, x16)
  assert [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(vjp)] == [(x.shape, x16.dtype)]


def test_vit_blocks_keep_no_float32_activations_for_layernorm():
  """A bf16 ViT's training step: no float32 tensor of the residual stream's size is kept, and
  of the MLP's hidden state only GELU's input and output (Dense_1's input)."""
  model = ViT(num_classes=3, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
              posemb_grid=(4, 4), dtype=jnp.bfloat16)
  images = jnp.ones((2, 16, 16, 3))
  params = model.init(jax.random.key(0), images)["params"]
  _, vjp = jax.vjp(lambda p: model.apply({"params": p}, images), params)
  tokens = (2, 17, 32)
  assert [leaf.dtype for leaf in jax.tree.leaves(vjp) if leaf.shape == tokens] and all(
      leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(vjp) if leaf.shape == tokens)
  hidden = [leaf.dtype for leaf in jax.tree.leaves(vjp) if leaf.shape == (2, 17, 64)]
  assert hidden == [jnp.bfloat16] * 4  # two blocks
