"""Input pipeline (grain): decode -> RGB -> bicubic resize -> uint8 batches.

Batches stay uint8 (4x fewer bytes to copy to the device than float32); the model normalises
them on the device (``ViT(pixel_mean=, pixel_std=)``, where XLA fuses it into the patch
embedding), which keeps host-side float math out of the input path.

Batches are computed from an index-based `grain.MapDataset`, so batch k is a pure function of
(seed, k): a run resumed at `start_step=k` sees exactly the batches an uninterrupted run would.
Resized uint8 images of small sources are cached in memory, so epochs after the first are cheap.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections.abc import Iterator, Sequence

import grain
import numpy as np
import PIL.Image

CACHE_BYTES = 1 << 30  # cache a source's resized images when they fit in this many bytes
# batches are assembled in threads (numpy copies and PIL resizes release the GIL)
_READ_OPTIONS = grain.ReadOptions(num_threads=min(16, os.cpu_count() or 2),
                                  prefetch_buffer_size=4)
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # source -> {(h, w): _Resized}


class _Resized:
  """Index -> resized uint8 RGB image (h, w, 3) and label, memoised when the source is small.

  It holds no reference to the source (each call passes it): the cache is keyed weakly by the
  source, and a value referring to its key would keep both alive for good.
  """

  def __init__(self, n: int, size: tuple[int, int]):
    self.size = size
    self.cached = n * size[0] * size[1] * 3 <= CACHE_BYTES
    if self.cached:
      self.images = np.zeros((n, *size, 3), np.uint8)
      self.labels = np.zeros((n,), np.int64)
      self.filled = np.zeros((n,), bool)

  def _load(self, source, index: int) -> tuple[np.ndarray, int]:
    item = source[int(index)]
    try:
      return resize(item["image"], self.size), int(item["label"])
    except ValueError as e:  # a custom source's image, say: name where it came from
      raise ValueError(f"{source!r} example {int(index)}: {e}") from e

  def fill(self, source) -> None:
    """Decodes and resizes every example not cached yet (a no-op for uncached sources)."""
    if self.cached:
      for i in np.flatnonzero(~self.filled):
        self.images[i], self.labels[i] = self._load(source, i)
        self.filled[i] = True

  def get(self, source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (b, h, w, 3) and labels int64 (b,) for `indices` (b,)."""
    if not self.cached:
      pairs = [self._load(source, i) for i in indices]
      return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.int64)
    for i in indices[~self.filled[indices]]:
      self.images[i], self.labels[i] = self._load(source, i)
      self.filled[i] = True
    return self.images[indices], self.labels[indices]


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic (PIL) resize of uint8 (H, W, 1|3) to uint8 (h, w, 3); grayscale is repeated."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image (H, W, 1 or 3), got {image.dtype} {image.shape} "
                     "(data.sources.to_hwc_uint8 converts 16-bit, 2-D and RGBA images)")
  pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if pil.size != (size[1], size[0]):
    pil = pil.resize((size[1], size[0]), PIL.Image.BICUBIC)
  out = np.asarray(pil)
  return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


def _resized(source, image_size: int | Sequence[int]) -> _Resized:
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
  if len(source) == 0:
    raise ValueError(f"source {source!r} is empty")
  try:
    per_source = _CACHES.setdefault(source, {})
  except TypeError:  # not weak-referenceable (e.g. a list): cache for this call only
    per_source = {}
  if size not in per_source:
    per_source[size] = _Resized(len(source), size)
  return per_source[size]


def _check_labels(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> None:
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    k = int(np.argmax(bad))
    raise ValueError(f"label {int(labels[k])} of example {int(indices[k])} is outside "
                     f"[0, {num_classes}): the classification head has num_classes={num_classes}")


def _local_size(batch_size: int, shard_index: int, shard_count: int) -> int:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if batch_size < 1 or batch_size % shard_count:
    raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                     f"shard_count {shard_count}")
  return batch_size // shard_count


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of epoch ``epoch``: a permutation of range(n) drawn from (seed, epoch).

  Every (seed, epoch) pair seeds its own stream, so runs with different seeds share no epoch
  orders (grain's own per-epoch reshuffle uses seed + epoch: seed s + 1 replays seed s one epoch
  later).
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed {seed} and epoch {epoch} must be non-negative")
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(source, *, batch_size: int, image_size: int | Sequence[int], seed: int,
                  start_step: int = 0, shard_index: int = 0, shard_count: int = 1,
                  num_classes: int) -> Iterator[dict]:
  """Infinite shuffled training batches; batch k depends only on (seed, k).

  Epochs are ``len(source) // batch_size`` batches of a fresh permutation (``epoch_order``);
  the remainder of each epoch is dropped, as PyTorch's ``DataLoader(drop_last=True)`` does, so
  no batch holds an image twice. The global batch k is split into shard_count consecutive,
  disjoint slices.

  Args:
    source: random-access source of {"image": uint8 (H, W, C), "label": int}.
    batch_size: GLOBAL batch size, a multiple of shard_count, at most len(source).
    image_size: output size, int or (height, width).
    seed: shuffling seed (non-negative).
    start_step: index of the first batch to yield (resume).
    shard_index, shard_count: this process's slice of every global batch.
    num_classes: head size; a label outside [0, num_classes) raises a ValueError.

  Yields:
    {"image": uint8 RGB (b, h, w, 3), "label": int32 (b,)} with b = batch_size // shard_count.
  """
  local = _local_size(batch_size, shard_index, shard_count)
  resized = _resized(source, image_size)
  n = len(source)
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} examples of {source!r}")
  resized.fill(source)
  if resized.cached:  # check every label up front, before any training step
    _check_labels(resized.labels, np.arange(n), num_classes)
  order = functools.lru_cache(maxsize=4)(lambda epoch: epoch_order(n, seed, epoch))

  def load(step: int) -> dict:
    epoch, k = divmod(step, per_epoch)
    start = k * batch_size + shard_index * local
    indices = order(epoch)[start:start + local]
    images, labels = resized.get(source, indices)
    _check_labels(labels, indices, num_classes)
    return {"image": images, "label": labels.astype(np.int32)}

  ds = grain.MapDataset.range(start_step, sys.maxsize).map(load)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_size(source, limit: int | None) -> int:
  """How many examples ``eval_batches`` evaluates: the first ``limit`` (None: all)."""
  return len(source) if limit is None else min(int(limit), len(source))


def eval_batches(source, *, batch_size: int, image_size: int | Sequence[int],
                 shard_index: int = 0, shard_count: int = 1, num_classes: int,
                 limit: int | None = None) -> Iterator[dict]:
  """Every example (of the first `limit`) exactly once, in order; the last batch is padded.

  Args:
    source, batch_size, image_size, shard_index, shard_count, num_classes: as in train_batches.
    limit: evaluate only the first `limit` examples (None: all).

  Yields:
    {"image": uint8 RGB (b, h, w, 3), "label": int32 (b,), "mask": bool (b,)}; padding rows
    are zeros with label 0 and mask False.
  """
  local = _local_size(batch_size, shard_index, shard_count)
  n = eval_size(source, limit)
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit!r}, len(source)={len(source)}")
  resized = _resized(source, image_size)

  def load(step: int) -> dict:
    indices = step * batch_size + shard_index * local + np.arange(local)
    mask = indices < n
    images = np.zeros((local, *resized.size, 3), np.uint8)
    labels = np.zeros((local,), np.int64)
    if mask.any():
      images[mask], labels[mask] = resized.get(source, indices[mask])
      _check_labels(labels[mask], indices[mask], num_classes)
    return {"image": images, "label": labels.astype(np.int32), "mask": mask}

  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(num_batches).map(load)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
