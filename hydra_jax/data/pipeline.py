"""Input pipeline (grain): decode -> RGB -> bicubic resize -> uint8 batches.

Batches stay uint8 (4x fewer bytes to copy to the device than float32); the model normalises
them on the device (``ViT(pixel_mean=, pixel_std=)``, where XLA fuses it into the patch
embedding), which keeps host-side float math out of the input path.

Batches are computed from an index-based `grain.MapDataset`, so batch k is a pure function of
(seed, k): a run resumed at `start_step=k` sees exactly the batches an uninterrupted run would.
Resized uint8 images of small sources are cached in memory, so epochs after the first are cheap.
"""

from __future__ import annotations

import os
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
  """Index -> resized uint8 RGB image (h, w, 3) and label, memoised when the source is small."""

  def __init__(self, source, size: tuple[int, int]):
    self.source, self.size = source, size
    n = len(source)
    self.cached = n * size[0] * size[1] * 3 <= CACHE_BYTES
    if self.cached:
      self.images = np.zeros((n, *size, 3), np.uint8)
      self.labels = np.zeros((n,), np.int64)
      self.filled = np.zeros((n,), bool)

  def _load(self, index: int) -> tuple[np.ndarray, int]:
    item = self.source[int(index)]
    return resize(item["image"], self.size), int(item["label"])

  def fill(self) -> None:
    """Decodes and resizes every example not cached yet (a no-op for uncached sources)."""
    if self.cached:
      for i in np.flatnonzero(~self.filled):
        self.images[i], self.labels[i] = self._load(i)
        self.filled[i] = True

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (b, h, w, 3) and labels int64 (b,) for `indices` (b,)."""
    if not self.cached:
      pairs = [self._load(i) for i in indices]
      return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.int64)
    for i in indices[~self.filled[indices]]:
      self.images[i], self.labels[i] = self._load(i)
      self.filled[i] = True
    return self.images[indices], self.labels[indices]


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic (PIL) resize of uint8 (H, W, 1|3) to uint8 (h, w, 3); grayscale is repeated."""
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected an image (H, W, 1 or 3), got shape {image.shape}")
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
    per_source[size] = _Resized(source, size)
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


def train_batches(source, *, batch_size: int, image_size: int | Sequence[int], seed: int,
                  start_step: int = 0, shard_index: int = 0, shard_count: int = 1,
                  num_classes: int) -> Iterator[dict]:
  """Infinite shuffled training batches; batch k depends only on (seed, k).

  Each epoch is a fresh permutation of the source (grain reseeds per epoch); batches run across
  epoch boundaries. The global batch k is split into shard_count consecutive, disjoint slices.

  Args:
    source: random-access source of {"image": uint8 (H, W, C), "label": int}.
    batch_size: GLOBAL batch size, a multiple of shard_count.
    image_size: output size, int or (height, width).
    seed: shuffling seed.
    start_step: index of the first batch to yield (resume).
    shard_index, shard_count: this process's slice of every global batch.
    num_classes: head size; a label outside [0, num_classes) raises a ValueError.

  Yields:
    {"image": uint8 RGB (b, h, w, 3), "label": int32 (b,)} with b = batch_size // shard_count.
  """
  local = _local_size(batch_size, shard_index, shard_count)
  resized = _resized(source, image_size)
  resized.fill()
  if resized.cached:  # check every label up front, before any training step
    _check_labels(resized.labels, np.arange(len(source)), num_classes)

  def load(global_indices: np.ndarray) -> dict:
    indices = np.asarray(global_indices[shard_index * local:(shard_index + 1) * local])
    images, labels = resized.get(indices)
    _check_labels(labels, indices, num_classes)
    return {"image": images, "label": labels.astype(np.int32)}

  ds = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
        .batch(batch_size).slice(slice(start_step, None)).map(load))
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


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
  n = len(source) if limit is None else min(int(limit), len(source))
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit!r}, len(source)={len(source)}")
  resized = _resized(source, image_size)

  def load(step: int) -> dict:
    indices = step * batch_size + shard_index * local + np.arange(local)
    mask = indices < n
    images = np.zeros((local, *resized.size, 3), np.uint8)
    labels = np.zeros((local,), np.int64)
    if mask.any():
      images[mask], labels[mask] = resized.get(indices[mask])
      _check_labels(labels[mask], indices[mask], num_classes)
    return {"image": images, "label": labels.astype(np.int32), "mask": mask}

  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(num_batches).map(load)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
