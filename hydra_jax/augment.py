"""Training-time augmentation on the device: random resized crops, horizontal flips, mixup and
CutMix.

Batches reach the step as uint8 (B, H, W, 3) at the model's input size (the host resizes once
and caches, ``data.pipeline``). Inside the jitted step each example draws its own crop and flip from
the step's key, is resampled on the device and rounded back to uint8, so the model normalises it
as it does every input and the host pipeline stays as cheap as it is. The crop follows
torchvision's ``RandomResizedCrop``: an area share uniform in ``crop_scale`` and an aspect ratio
log-uniform in ``crop_ratio``, redrawn up to 10 times until the box fits, else the centred box of
the nearest allowed ratio. The box is real-valued (torchvision rounds it to whole pixels) and
sampled bilinearly at (H, W) points inside it from the whole image (torchvision cuts the box out
first, so near the box's edges its samples stay inside where these blend with the neighbouring
pixels). Crops come from the already-resized image, not the original.

``Mix`` blends each example with a partner from the same batch and its targets with the same
weights (mixup, Zhang et al. 2018: a per-pixel blend; CutMix, Yun et al. 2019: a box pasted from
the partner, weighted by the share of pixels it covers), after the crops and flips.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

_TRIES = 10  # torchvision's RandomResizedCrop redraws this many times


@dataclasses.dataclass(frozen=True)
class Augment:
  """A random (crop and) flip of uint8 image batches; see the module docstring.

  Attributes:
    flip: mirror each image left-right with probability 1/2.
    crop_scale: (min, max) share of the image's area a crop covers, e.g. (0.08, 1.0)
      (torchvision's default); None: no crop.
    crop_ratio: (min, max) width / height of a crop.
  """
  flip: bool = False
  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    for name in ("crop_scale", "crop_ratio"):
      value = getattr(self, name)
      if value is not None and np.shape(value) != (2,):
        raise ValueError(f"{name}={value!r}; expected a (min, max) pair")
    if self.crop_scale is not None:
      lo, hi = self.crop_scale
      if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale={self.crop_scale!r}; expected (min, max) with "
                         "0 < min <= max <= 1")
    lo, hi = self.crop_ratio
    if not 0 < lo <= hi:
      raise ValueError(f"crop_ratio={self.crop_ratio!r}; expected (min, max) with 0 < min <= max")

  def __call__(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> uint8 (B, H, W, 3), drawn from ``rng``."""
    k_crop, k_flip = jax.random.split(rng)
    b, h, w, _ = images.shape
    if self.crop_scale is not None:
      boxes = crop_boxes(k_crop, b, (h, w), self.crop_scale, self.crop_ratio)
      images = jax.vmap(resized_crop)(images, boxes)
    if self.flip:
      mirror = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
      images = jnp.where(mirror, images[:, :, ::-1], images)
    return images


@dataclasses.dataclass(frozen=True)
class Mix:
  """Mixup and CutMix of uint8 image batches and their (B, C) float targets.

  Each example draws its own weight ``lam`` ~ Beta(alpha, alpha) and, when both are on, mixup or
  CutMix with probability 1/2 each (timm's ``Mixup`` in its per-example mode draws the same
  way). Partners are neighbours in the batch: examples 0 and 1, 2 and 3, ... (an odd batch's
  last mixes with itself), so on a mesh whose devices hold an even share each, no image moves
  between devices. The step mixes before any microbatch split; under pmap or
  ``parallel.per_device`` each device mixes its own share.

  Attributes:
    mixup: alpha of mixup's Beta distribution (e.g. 0.8, as DeiT); 0: off. The blend is rounded
      back to uint8 (a change of at most half a grey level).
    cutmix: alpha of CutMix's Beta distribution (e.g. 1.0); 0: off. The box has the image's
      aspect ratio, a share ``1 - lam`` of its area and a uniform centre, and is cut at the image's
      edges; the targets weigh the partner by the share of pixels the box actually covers.
  """
  mixup: float = 0.0
  cutmix: float = 0.0

  def __post_init__(self):
    for name in ("mixup", "cutmix"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r}; expected a Beta alpha > 0, or 0 for off")

  def __bool__(self) -> bool:
    return bool(self.mixup or self.cutmix)

  def __call__(self, images: jax.Array, targets: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 (B, H, W, 3) and float (B, C) -> the mixed images and targets, drawn from ``rng``."""
    b, h, w, _ = images.shape
    k_mix, k_cut, k_which, k_centre = jax.random.split(rng, 4)
    partner, partner_targets = _neighbours(images), _neighbours(targets)
    share = jnp.zeros((b,), jnp.float32)  # the partner's weight in each example
    out = images
    if self.mixup:
      share = 1 - jax.random.beta(k_mix, self.mixup, self.mixup, (b,))
      blend = (1 - share)[:, None, None, None] * images + share[:, None, None, None] * partner
      out = jnp.clip(jnp.round(blend), 0, 255).astype(images.dtype)
    if self.cutmix:
      box = cut_masks(k_centre, 1 - jax.random.beta(k_cut, self.cutmix, self.cutmix, (b,)),
                      (h, w))
      cut = jnp.where(box[..., None], partner, images)
      cut_share = jnp.mean(box, axis=(1, 2), dtype=jnp.float32)
      use_cut = (jax.random.bernoulli(k_which, 0.5, (b,)) if self.mixup
                 else jnp.ones((b,), bool))
      out = jnp.where(use_cut[:, None, None, None], cut, out)
      share = jnp.where(use_cut, cut_share, share)
    mixed = (1 - share)[:, None] * targets + share[:, None] * partner_targets
    return out, mixed


def _neighbours(x: jax.Array) -> jax.Array:
  """x with rows 0 and 1, 2 and 3, ... swapped (an odd last row stays): a reshape, not a gather,
  so a batch sharded by rows stays where it is."""
  even = len(x) - len(x) % 2
  pairs = x[:even].reshape(even // 2, 2, *x.shape[1:])[:, ::-1].reshape(even, *x.shape[1:])
  return jnp.concatenate([pairs, x[even:]]) if len(x) % 2 else pairs


def cut_masks(rng: jax.Array, area: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(n, H, W) bool: for each share ``area`` (n,) of an image of ``size``, a box of the image's
  aspect ratio and that area around a uniform centre, cut at the edges: the pixels whose
  centres lie inside it."""
  height, width = size
  centre = jax.random.uniform(rng, (len(area), 2)) * jnp.asarray([height, width], jnp.float32)
  half = jnp.sqrt(area)[:, None] * jnp.asarray([height, width], jnp.float32) / 2

  def inside(n, axis):
    at = jnp.arange(n, dtype=jnp.float32) + 0.5
    return jnp.abs(at[None] - centre[:, axis, None]) < half[:, axis, None]
  return inside(height, 0)[:, :, None] & inside(width, 1)[:, None, :]


def crop_boxes(rng: jax.Array, n: int, size: tuple[int, int], scale: tuple[float, float],
               ratio: tuple[float, float]) -> jax.Array:
  """(n, 4) float32 boxes (top, left, height, width) in pixels of an image of ``size`` (H, W)."""
  height, width = size
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  area = height * width * jax.random.uniform(k_area, (n, _TRIES), minval=scale[0],
                                             maxval=scale[1])
  log_lo, log_hi = jnp.log(jnp.asarray(ratio, jnp.float32))
  aspect = jnp.exp(jax.random.uniform(k_ratio, (n, _TRIES), minval=log_lo, maxval=log_hi))
  w, h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
  fits = (w <= width) & (h <= height)
  first = jnp.argmax(fits, axis=1)  # the first try that fits (0 where none does)
  pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]  # noqa: E731
  # none fits: the whole image cut to the nearest allowed ratio, centred (torchvision's fallback)
  given = width / height
  fw, fh = ((width, width / ratio[0]) if given < ratio[0] else
            (height * ratio[1], height) if given > ratio[1] else (width, height))
  ok = jnp.any(fits, axis=1)
  h, w = jnp.where(ok, pick(h), fh), jnp.where(ok, pick(w), fw)
  top = jnp.where(ok, jax.random.uniform(k_top, (n,)) * (height - h), (height - h) / 2)
  left = jnp.where(ok, jax.random.uniform(k_left, (n,)) * (width - w), (width - w) / 2)
  return jnp.stack([top, left, h, w], axis=1).astype(jnp.float32)


def resized_crop(image: jax.Array, box: jax.Array) -> jax.Array:
  """The ``box`` (top, left, height, width) of uint8 (H, W, C) ``image`` bilinearly resampled to
  (H, W, C) uint8: output pixel (i, j) samples the image at (top + (i + 1/2) h / H, left +
  (j + 1/2) w / W), pixel edges at integer coordinates, the image's edge pixels extending it."""
  height, width = image.shape[:2]
  top, left, h, w = box[0], box[1], box[2], box[3]
  scale = jnp.stack([height / h, width / w])
  out = jax.image.scale_and_translate(
      image.astype(jnp.float32), image.shape, (0, 1), scale, -jnp.stack([top, left]) * scale,
      method="linear", antialias=False)
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def from_config(cfg) -> Augment | None:
  """The ``Augment`` of a config's ``data.augment`` (None when it changes nothing)."""
  if cfg is None:
    return None
  scale, ratio = cfg.get("crop_scale"), cfg.get("crop_ratio") or Augment.crop_ratio
  augment = Augment(flip=bool(cfg.get("flip", False)),
                    crop_scale=None if scale is None else _floats(scale),
                    crop_ratio=_floats(ratio))
  return augment if augment.flip or augment.crop_scale is not None else None


def mix_from_config(cfg) -> Mix | None:
  """The ``Mix`` of a config's ``data.augment`` (``mixup``, ``cutmix``; None when both are off)."""
  if cfg is None:
    return None
  mix = Mix(mixup=cfg.get("mixup", 0.0), cutmix=cfg.get("cutmix", 0.0))
  return mix or None


def _floats(value) -> tuple[float, ...]:
  """A config's number or sequence of numbers as a tuple of floats."""
  return tuple(float(x) for x in np.atleast_1d(value))


def describe(cfg) -> dict | None:
  """What a run records of ``data.augment`` for its resume check: the draws it makes (a
  ``crop_ratio`` without a crop, a mix alpha of 0 draw nothing), None for none."""
  augment, mix = from_config(cfg), mix_from_config(cfg)
  if augment is None and mix is None:
    return None
  fields = dataclasses.asdict(augment or Augment())
  if fields["crop_scale"] is None:
    del fields["crop_ratio"]
  fields.update((k, v) for k, v in dataclasses.asdict(mix or Mix()).items() if v)
  return json.loads(json.dumps(fields))
