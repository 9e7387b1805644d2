"""Random-access image sources: prepared tfds datasets (array_record) and class-per-folder trees.

Every source maps an index to {"image": uint8 (H, W, C), "label": int} and knows `num_classes`.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from hydra_jax.data import fashion_mnist

FOLDER_PREFIX = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LabelFn = Callable[[Mapping[str, Any]], int]  # a tfds record (numpy values) -> its class
ImageFn = Callable[[np.ndarray], np.ndarray]  # uint8 (H, W, C) -> uint8 (H, W, C)


_GRAY16 = ("I;16", "I;16L", "I;16B", "I")  # how PIL opens 16-bit grayscale PNG / TIFF files


def _to_8_bit(values: np.ndarray) -> np.ndarray:
  return np.rint(values / 257).astype(np.uint8)


def to_hwc_uint8(image) -> np.ndarray:
  """Returns an image as uint8 (H, W, C): grayscale keeps C=1, anything else becomes RGB (an
  alpha channel is dropped, as PIL's ``convert("RGB")`` drops it: arrays of 2 or 4 channels
  keep their first 1 or 3).

  16-bit images (PIL's 16-bit grayscale modes, uint16 arrays such as tfds' uint16 Image
  features) are scaled to 8 bits (v / 257, rounded); PIL's own conversion would clip them to
  black and white. Float images (PIL mode "F") have no range to scale by and are refused.
  """
  if isinstance(image, PIL.Image.Image):
    if image.mode in _GRAY16:
      image = _to_8_bit(np.asarray(image, np.float64).clip(0, 65535))
    elif image.mode == "F":
      raise ValueError("a float (PIL mode 'F') image has no known value range; expected 8- or "
                       "16-bit images")
    elif image.mode not in ("L", "RGB"):
      image = image.convert("RGB")
    image = np.asarray(image)
  image = np.asarray(image)
  if image.dtype == np.uint16:
    image = _to_8_bit(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim == 3 and image.shape[-1] in (2, 4):  # grey or RGB with alpha
    image = image[..., :-1]
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image (H, W, C), got {image.dtype} {image.shape}")
  return image


class TfdsSource:
  """A prepared tfds dataset split, read with `tfds.data_source` (array_record, numpy).

  The label is the ClassLabel feature `label_key`, or, where `label_fn` is given, computed from
  the whole record (the VTAB-1k structured tasks, see `vtab.VTAB1K[task]["label_fn"]`); then
  `num_classes` must be given too. `image_fn` maps the decoded uint8 (H, W, C) image.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               label_key: str = "label", label_fn: LabelFn | None = None,
               num_classes: int | None = None, image_fn: ImageFn | None = None):
    if label_fn is not None and num_classes is None:
      raise ValueError(f"{name!r}: a computed label (label_fn) needs num_classes, the number of "
                       "classes label_fn maps to")
    data_dir = None if data_dir is None else str(pathlib.Path(data_dir).expanduser())
    _check_prepared(name, data_dir)
    self.name, self.split, self.label_key = name, split, label_key
    self.label_fn, self.image_fn = label_fn, image_fn
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    self.num_classes = num_classes if label_fn is not None else _class_label_size(
        name, self._ds.dataset_info.features, label_key, num_classes)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    record = self._ds[int(index)]
    image = to_hwc_uint8(record["image"])
    if self.image_fn is not None:
      image = self.image_fn(image)
    label = record[self.label_key] if self.label_fn is None else self.label_fn(record)
    return {"image": image, "label": int(label)}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def _class_label_size(name: str, features, label_key: str, num_classes: int | None) -> int:
  """The number of classes of ClassLabel `label_key`, checked against `num_classes` if given."""
  if label_key not in features or not hasattr(features[label_key], "num_classes"):
    raise ValueError(f"{name!r} has no ClassLabel feature {label_key!r}; its features are "
                     f"{list(features.keys())}; a label computed from other features needs "
                     "label_fn (see hydra_jax.data.VTAB1K[task]['label_fn'])")
  size = int(features[label_key].num_classes)
  if num_classes is not None and num_classes != size:
    raise ValueError(f"{name!r}: ClassLabel {label_key!r} has {size} classes, expected "
                     f"num_classes={num_classes}")
  return size


_SPLIT = re.compile(r"(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?")


def _bound(text: str | None, n: int, split: str) -> int | None:
  """A tfds-style slice bound: an index, or a percentage of ``n`` (rounded) in [-100, 100]."""
  if not text:
    return None
  if not text.endswith("%"):
    index = int(text)
    if abs(index) > n:  # tfds refuses these too; Python's slicing would clip them silently
      raise ValueError(f"folder split {split!r}: index {index} is outside a split folder of "
                       f"{n} images")
    return index
  percent = int(text[:-1])
  if abs(percent) > 100:
    raise ValueError(f"folder split {split!r}: {text} is not a percentage in [-100%, 100%]")
  return round(n * percent / 100)


def _class_dirs(root: pathlib.Path) -> list[str]:
  return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(where: pathlib.Path, class_names: list[str]) -> tuple[list[pathlib.Path], np.ndarray]:
  """The image files under ``where/<class>/`` (sorted, hidden ones skipped) and their labels."""
  files, labels = [], []
  for label, name in enumerate(class_names):
    found = sorted(p for p in (where / name).rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(where).parts))
    files += found
    labels += [label] * len(found)
  if not files:
    raise ValueError(f"image folder {str(where)!r} holds no images: expected "
                     f"<class_name>/<image> files with a suffix in {IMAGE_SUFFIXES}")
  return files, np.asarray(labels, np.int64)


class FolderSource:
  """Class-per-folder images, the whole tree or one split of it.

  Without a split: ``root/<class>/<image>``, in sorted order. With a split (tfds syntax, e.g.
  "train", "train[:800]", "val[:50%]", "train[:800]+val[:200]"): each part reads
  ``root/<split name>/<class>/<image>`` in a fixed pseudo-random order (seed 0, the same for every
  part naming that folder, so slices of one folder are disjoint) that mixes the classes, then
  slices it; the parts are concatenated. Labels follow the sorted class folder names -- of every
  split folder together, so the splits agree on them. Hidden files and folders (".name") are
  skipped at every level.
  """

  def __init__(self, root: str | pathlib.Path, split: str | None = None):
    self.root = pathlib.Path(root).expanduser()
    if not self.root.is_dir():
      raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
    if split is None:
      self.class_names = _class_dirs(self.root)
      self._files, self.labels = _images(self.root, self.class_names)
      self.num_classes = len(self.class_names)
      return
    parts = [_SPLIT.fullmatch(part.strip()) for part in split.split("+")]  # tfds allows spaces
    if not all(parts):
      raise ValueError(f"folder split {split!r}: expected split folder names with optional "
                       "slices joined by '+', e.g. 'train', 'train[:800]', 'val[10%:]' or "
                       "'train[:800]+val[:200]'")
    self.class_names = sorted({c for d in _class_dirs(self.root)
                               for c in _class_dirs(self.root / d)})
    shuffled = {}  # split folder -> (files, labels) in the seed-0 order
    self._files, labels = [], []
    for match in parts:
      name = match["name"]
      if name not in shuffled:
        where = self.root / name
        if not where.is_dir():
          raise FileNotFoundError(
              f"image folder {str(self.root)!r} has no split folder {name!r} (split {split!r}); "
              "expected root/<split>/<class>/<image>, e.g. root/train/cat/1.jpg")
        files, folder_labels = _images(where, self.class_names)
        order = np.random.default_rng(0).permutation(len(files))
        shuffled[name] = ([files[i] for i in order], folder_labels[order])
      files, folder_labels = shuffled[name]
      n = len(files)
      cut = slice(_bound(match["start"], n, split), _bound(match["stop"], n, split))
      self._files += files[cut]
      labels.append(folder_labels[cut])
    self.labels = np.concatenate(labels)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict:
    with PIL.Image.open(self._files[index]) as image:
      return {"image": to_hwc_uint8(image), "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"FolderSource({str(self.root)!r}, n={len(self)}, classes={self.num_classes})"


def get_source(name: str, split: str | None = None, *, data_dir: str | None = None,
               label_key: str = "label", label_fn: LabelFn | None = None,
               num_classes: int | None = None, image_fn: ImageFn | None = None):
  """Opens a random-access source of {"image": uint8 (H, W, C), "label": int}.

  Args:
    name: a tfds dataset name (e.g. "fashion_mnist_offline", "cifar100") or "folder:/path/root".
    split: tfds split string, e.g. "train[:800]+train[54000:54200]"; for folders the same
      syntax over split folders ("train[:800]+val[:200]": root/train/<class>/... and
      root/val/<class>/...), or None for the whole root/<class>/... tree (see ``FolderSource``).
    data_dir: tfds data dir (None: tfds' default).
    label_key: the tfds ClassLabel feature to use as label (see VTAB1K[task]["label"]); not
      read when `label_fn` is given.
    label_fn: tfds only: computes the label from the whole record (numpy values), e.g.
      VTAB1K["clevr_count"]["label_fn"]; needs `num_classes`.
    num_classes: the number of classes of `label_fn`; without `label_fn`, checked against the
      ClassLabel feature's.
    image_fn: tfds only: maps each decoded uint8 (H, W, C) image, e.g. dsprites' 0/1 masks to
      0/255.

  Returns:
    A source with `len()`, indexing and `num_classes`.
  """
  if name.startswith(FOLDER_PREFIX):
    if label_fn is not None or image_fn is not None:
      raise ValueError(f"{name!r}: folder sources label by folder name; label_fn and image_fn "
                       "apply to tfds datasets only")
    source = FolderSource(name[len(FOLDER_PREFIX):], split)
  else:
    if split is None:
      raise ValueError(f"tfds dataset {name!r} needs a split, e.g. 'train' or 'train[:800]'")
    try:
      source = TfdsSource(name, split, data_dir=data_dir, label_key=label_key,
                          label_fn=label_fn, num_classes=num_classes, image_fn=image_fn)
    except ValueError as e:
      if "0 length" not in str(e):
        raise
      source = None
  if source is None or len(source) == 0:
    raise ValueError(f"split {split!r} of {name!r} is empty")
  return source


def _check_prepared(name: str, data_dir: str | None) -> None:
  """Raises a FileNotFoundError saying how to prepare `name` when it is not in data_dir."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {name!r}; expected a tfds name such as "
                     f"{fashion_mnist.NAME!r} or 'folder:/path/to/root'") from e
  if builder.is_prepared():
    return
  where = builder.data_dir_root if data_dir is None else data_dir
  if builder.name == fashion_mnist.NAME:
    how = (f"prepare it (no network needed) with `python -c \"from hydra_jax import data; "
           f"data.prepare_fashion_mnist({str(where)!r})\"` "
           f"(idx files from `apt-get install -y dataset-fashion-mnist`)")
  else:
    how = (f"prepare it in the array_record format, e.g. `tfds build {name} --data_dir={where} "
           f"--file_format=array_record` or tfds.builder({name!r}, data_dir={str(where)!r})"
           ".download_and_prepare(file_format='array_record')")
  raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir {str(where)!r}; "
                          f"{how}")
