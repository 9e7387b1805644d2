"""Bicubic resampling of position-embedding grids.

The kernel is the cubic convolution with a = -0.75, half-pixel centres, clamped edges and no
antialiasing: the convention of PyTorch's ``interpolate(mode="bicubic", align_corners=False)``,
which is what DINOv2 and Hugging Face ViTs use when they meet a new resolution. Matching it
exactly is what lets a hydra_jax model reproduce those models' outputs at any input size.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_A = -0.75


def _cubic(t: np.ndarray) -> np.ndarray:
  t = np.abs(t)
  near = ((_A + 2) * t - (_A + 3)) * t * t + 1
  far = ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The (n_out, n_in) matrix that resamples a length-n_in signal to n_out samples."""
  m = np.zeros((n_out, n_in), np.float64)
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  for offset in range(-1, 3):
    weight = _cubic(frac - offset)
    idx = np.clip(base + offset, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weight)
  return m


def resample_grid(grid: jnp.ndarray, new_hw: tuple[int, int]) -> jnp.ndarray:
  """Resamples a (..., H, W, D) grid of embeddings to (..., H', W', D) bicubically."""
  h, w = grid.shape[-3:-1]
  if (h, w) == tuple(new_hw):
    return grid
  mh = jnp.asarray(resize_matrix(h, new_hw[0]), jnp.float32)
  mw = jnp.asarray(resize_matrix(w, new_hw[1]), jnp.float32)
  out = jnp.einsum("ih,...hwd->...iwd", mh, grid.astype(jnp.float32))
  out = jnp.einsum("jw,...iwd->...ijd", mw, out)
  return out.astype(grid.dtype)


def resample_posemb(posemb: jnp.ndarray, *, num_prefix: int, old_hw: tuple[int, int],
                    new_hw: tuple[int, int]) -> jnp.ndarray:
  """Resamples a (1, num_prefix + H*W, D) position embedding to a new patch grid.

  Args:
    posemb: (1, num_prefix + old_h * old_w, D); the first ``num_prefix`` rows (the class
      token's) are kept as they are.
    num_prefix: how many leading non-grid tokens the embedding has (0 or 1).
    old_hw: the stored grid (H, W).
    new_hw: the wanted grid (H', W').

  Returns:
    (1, num_prefix + H' * W', D).
  """
  old_h, old_w = old_hw
  if posemb.shape[1] != num_prefix + old_h * old_w:
    raise ValueError(
        f"pos_embedding has {posemb.shape[1]} tokens; expected {num_prefix} + {old_h}x{old_w}")
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  grid = grid.reshape(1, old_h, old_w, -1)
  grid = resample_grid(grid, new_hw).reshape(1, new_hw[0] * new_hw[1], -1)
  return jnp.concatenate([prefix, grid], axis=1)
