"""LayerNorm and GELU (exact, tanh, and CLIP's quick GELU) whose backward passes keep only their
input (and two numbers per token).

Autodiff keeps whatever a formula touches on the way. flax's ``nn.LayerNorm`` computes in float32,
so it keeps the input cast to float32, ``x - mean`` and ``rsqrt(var + eps) * scale`` broadcast to
the full shape: three float32 tensors the size of the activations per norm (six per ViT block,
~36 MB per image for ViT-B/16 at 224 px). ``jax.nn.gelu`` keeps its input and two intermediates
of the MLP's 4x-wide hidden state. These compute the same functions (the same formulas, in the
same dtypes; the LayerNorm's variance as flax's ``use_fast_variance=False``) and keep the input
in its own dtype (bf16 under mixed precision), plus the LayerNorm's per-token mean and
reciprocal standard deviation; their backward passes recompute
the rest from it, as PyTorch's and Apex's fused kernels do. What autodiff keeps per image for
ViT-B/16 Hydra in bf16 went from 139.5 MiB to 77.2 (LayerNorm -34.6, GELU -27.7; XLA itself
recomputes part of it: benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _compute_dtype(x: jax.Array):
  """float32, or wider where x is (float64 with jax_enable_x64), as flax promotes."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Mean and 1 / sqrt(var + eps) over the last axis, (..., 1) each, in float32 (or wider).

  var = E[(x - E[x])^2], as flax's ``use_fast_variance=False`` and PyTorch compute it: flax's
  default E[x^2] - E[x]^2 cancels where a row's mean is large against its spread (mean / std
  1000: 5% off in float32), and the backward pass, which assumes exact statistics, with it.
  """
  x = x.astype(_compute_dtype(x))
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


def _forward(x, scale, bias, eps, dtype):
  mean, rstd = _stats(x, eps)
  y = (x.astype(mean.dtype) - mean) * (rstd * scale.astype(mean.dtype)) + bias.astype(mean.dtype)
  return y.astype(dtype), (x, mean, rstd, scale, bias)  # scale, bias: (D,), for their dtypes


def _backward(eps, dtype, saved, dy):
  del eps, dtype
  x, mean, rstd, scale, bias = saved
  xhat = (x.astype(mean.dtype) - mean) * rstd
  dy = dy.astype(mean.dtype)
  g = dy * scale.astype(mean.dtype)  # d loss / d xhat
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return (dx.astype(x.dtype), (dy * xhat).sum(rows).astype(scale.dtype),
          dy.sum(rows).astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               dtype: Any) -> jax.Array:
  """LayerNorm over the last axis of x (..., D), computed in float32 (float64 for float64 x).

  Args:
    x: activations, any float dtype.
    scale: (D,).
    bias: (D,).
    eps: added to the variance.
    dtype: the output's dtype.

  Returns:
    (..., D) in ``dtype``.
  """
  return _forward(x, scale, bias, eps, dtype)[0]


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` over the last axis with the same params (``scale``, ``bias``) and output
  dtype (``dtype``, else what x and the params promote to), through ``layer_norm``."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


_SQRT_2 = 1.4142135623730951
_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2PI = 0.3989422804014327
_TANH_C = 0.044715


def _gelu_grad(x: jax.Array, approximate: bool) -> jax.Array:
  """d gelu(x) / dx in float32 (or wider, for float64 x)."""
  x = x.astype(_compute_dtype(x))
  if approximate:  # 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + c x^3)
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x * x * x))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_C * x * x)
  return 0.5 * (1 + jax.lax.erf(x / _SQRT_2)) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _gelu_forward(x, approximate):
  return jax.nn.gelu(x, approximate=approximate), x


def _gelu_backward(approximate, x, dy):
  grad = _gelu_grad(x, approximate)
  return ((dy.astype(grad.dtype) * grad).astype(x.dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """``jax.nn.gelu(x, approximate)`` (exact erf or tanh form, in x's dtype); its backward pass
  keeps x alone and evaluates the derivative in float32 (float64 for float64 x)."""
  return jax.nn.gelu(x, approximate=approximate)


gelu.defvjp(_gelu_forward, _gelu_backward)


_QUICK = 1.702


def _quick_gelu(x: jax.Array) -> jax.Array:
  z = x.astype(_compute_dtype(x))
  return (z * jax.nn.sigmoid(_QUICK * z)).astype(x.dtype)


@jax.custom_vjp
def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``, computed in float32 (float64 for
  float64 x) and rounded once to x's dtype: in bf16 / fp16 closer to the exact value than
  PyTorch's op-by-op rounding (which rounds 1.702 x, the sigmoid and the product each). Its
  backward pass keeps x alone, the derivative in float32 as ``gelu``'s."""
  return _quick_gelu(x)


def _quick_gelu_backward(x, dy):
  z = x.astype(_compute_dtype(x))
  s = jax.nn.sigmoid(_QUICK * z)
  grad = s + _QUICK * z * s * (1 - s)
  return ((dy.astype(grad.dtype) * grad).astype(x.dtype),)


quick_gelu.defvjp(lambda x: (_quick_gelu(x), x), _quick_gelu_backward)
