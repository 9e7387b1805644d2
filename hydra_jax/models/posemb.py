"""Resampling of position-embedding grids, in the convention of the code a checkpoint came from.

A ViT meeting a new resolution resamples its position embedding, and each code base does it its
own way; matching the checkpoint's own convention exactly is what lets a hydra_jax model
reproduce its outputs at any input size. ``RESAMPLES`` (the ViT's ``posemb_resample``):

  "bicubic"            PyTorch's ``interpolate(mode="bicubic", align_corners=False)``: cubic
                       convolution with a = -0.75, half-pixel centres, clamped edges, no
                       antialiasing. Hugging Face ViT, DINOv2 and SigLIP.
  "bicubic_antialias"  the same with ``antialias=True``: PIL's separable cubic filter (a = -0.5)
                       whose support widens by the factor when shrinking, half-pixel centres, the
                       window cut at the edges and its weights normalised per output sample.
                       timm (``resample_abs_pos_embed``), Hugging Face DINOv2 with registers.
  "linear_zoom"        ``scipy.ndimage.zoom(grid, factors, order=1)``: linear, corner-aligned
                       (input = output * (n_in - 1) / (n_out - 1)). big_vision and
                       google-research/vision_transformer (``resample_posemb``).

Each axis is resampled on its own (all three are separable), so non-square grids take per-axis
factors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

RESAMPLES = ("bicubic", "bicubic_antialias", "linear_zoom")
DEFAULT_RESAMPLE = "bicubic"  # what files recording no convention (older native files) mean


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter ``a``."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def _bicubic(n_in: int, n_out: int) -> np.ndarray:
  m = np.zeros((n_out, n_in), np.float64)
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  for offset in range(-1, 3):
    idx = np.clip(base + offset, 0, n_in - 1)  # clamped edges: out-of-range taps repeat the edge
    np.add.at(m, (np.arange(n_out), idx), _cubic(frac - offset, -0.75))
  return m


def _bicubic_antialias(n_in: int, n_out: int) -> np.ndarray:
  # PyTorch's _compute_indices_weights_aa (the separable antialiased kernel, from PIL)
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), n_in)
    weights = _cubic((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
    m[i, lo:hi] = weights / weights.sum()
  return m


def _linear_zoom(n_in: int, n_out: int) -> np.ndarray:
  # scipy.ndimage.zoom's grid_mode=False mapping; a single output sample reads the first input
  src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  base = np.clip(np.floor(src).astype(int), 0, max(n_in - 2, 0))
  frac = src - base
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), base), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), np.minimum(base + 1, n_in - 1)), frac)
  return m


_MATRICES = {"bicubic": _bicubic, "bicubic_antialias": _bicubic_antialias,
             "linear_zoom": _linear_zoom}


def check_resample(method: str) -> str:
  """Returns ``method`` if it is one of ``RESAMPLES``, else raises a ValueError naming it."""
  if method not in RESAMPLES:
    raise ValueError(f"unknown posemb_resample {method!r}; expected one of {RESAMPLES}")
  return method


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, method: str = DEFAULT_RESAMPLE) -> np.ndarray:
  """The (n_out, n_in) float64 matrix resampling a length-n_in signal to n_out samples.

  Args:
    n_in: input length (>= 1).
    n_out: output length (>= 1).
    method: one of ``RESAMPLES``.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"resize_matrix needs lengths >= 1; got n_in={n_in}, n_out={n_out}")
  return _MATRICES[check_resample(method)](n_in, n_out)


def resample_grid(grid: jnp.ndarray, new_hw: tuple[int, int], *,
                  method: str = DEFAULT_RESAMPLE) -> jnp.ndarray:
  """Resamples a (..., H, W, D) grid of embeddings to (..., H', W', D) by ``method``."""
  check_resample(method)
  h, w = grid.shape[-3:-1]
  if (h, w) == tuple(new_hw):
    return grid
  mh = jnp.asarray(resize_matrix(h, new_hw[0], method), jnp.float32)
  mw = jnp.asarray(resize_matrix(w, new_hw[1], method), jnp.float32)
  exact = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on accelerators: match the reference
  out = jnp.einsum("ih,...hwd->...iwd", mh, grid.astype(jnp.float32), precision=exact)
  out = jnp.einsum("jw,...iwd->...ijd", mw, out, precision=exact)
  return out.astype(grid.dtype)


def resample_posemb(posemb: jnp.ndarray, *, num_prefix: int, old_hw: tuple[int, int],
                    new_hw: tuple[int, int], method: str = DEFAULT_RESAMPLE) -> jnp.ndarray:
  """Resamples a (1, num_prefix + H*W, D) position embedding to a new patch grid.

  Args:
    posemb: (1, num_prefix + old_h * old_w, D); the first ``num_prefix`` rows (the class
      token's) are kept as they are.
    num_prefix: how many leading non-grid tokens the embedding has (0 or 1).
    old_hw: the stored grid (H, W).
    new_hw: the wanted grid (H', W').
    method: the convention, one of ``RESAMPLES``.

  Returns:
    (1, num_prefix + H' * W', D).
  """
  old_h, old_w = old_hw
  if posemb.shape[1] != num_prefix + old_h * old_w:
    raise ValueError(
        f"pos_embedding has {posemb.shape[1]} tokens; expected {num_prefix} + {old_h}x{old_w}")
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  grid = grid.reshape(1, old_h, old_w, -1)
  grid = resample_grid(grid, new_hw, method=method).reshape(1, new_hw[0] * new_hw[1], -1)
  return jnp.concatenate([prefix, grid], axis=1)
