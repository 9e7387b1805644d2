"""Fashion-MNIST as an offline tfds dataset, built from local idx files (no network, no TensorFlow).

Debian's `dataset-fashion-mnist` package installs the four idx files under
/usr/share/datasets/fashion-mnist/ (`apt-get install -y dataset-fashion-mnist`). Prepare once with

    python -c "from hydra_jax import data; data.prepare_fashion_mnist('~/tensorflow_datasets')"

then read with `tfds.data_source("fashion_mnist_offline", split=..., data_dir=...)` (array_record).
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
NAME = "fashion_mnist_offline"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MAGIC = {3: 2051, 1: 2049}  # idx magic numbers: uint8 data, 3-D images / 1-D labels


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads one idx file (plain or .gz) of unsigned bytes.

  Args:
    path: the file.

  Returns:
    uint8 array of the shape in its header, e.g. (60000, 28, 28) images or (60000,) labels.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  ndim = raw[3]
  if raw[2] != 0x08 or ndim not in _MAGIC or magic != _MAGIC[ndim]:
    raise ValueError(f"{path} is not a uint8 idx file of 1 or 3 dims (magic {magic:#x})")
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape}, file holds {data.size} bytes of data")
  return data.reshape(shape)


def find_idx(idx_dir: str | pathlib.Path, stem: str) -> pathlib.Path:
  """Returns `idx_dir/stem` or `idx_dir/stem.gz`, whichever exists."""
  for name in (stem, stem + ".gz"):
    path = pathlib.Path(idx_dir).expanduser() / name
    if path.exists():
      return path
  raise FileNotFoundError(
      f"no {stem}[.gz] in {idx_dir}; install the Fashion-MNIST idx files with "
      "`apt-get install -y dataset-fashion-mnist` or pass idx_dir= the folder holding them")


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes) from local idx files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the idx files of Debian's dataset-fashion-mnist."}

  def __init__(self, *, idx_dir: str | pathlib.Path = DEFAULT_IDX_DIR, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._idx_dir = pathlib.Path(idx_dir).expanduser()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # keep the idx order, so split slices select known examples
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the idx files are local
    return {split: self._generate_examples(split) for split in _FILES}

  def _generate_examples(self, split: str):
    images_stem, labels_stem = _FILES[split]
    images = read_idx(find_idx(self._idx_dir, images_stem))
    labels = read_idx(find_idx(self._idx_dir, labels_stem))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
      raise ValueError(f"{split}: images {images.shape} do not match labels {labels.shape}")
    for i in range(images.shape[0]):
      # A PIL image is PNG-encoded by PIL; a numpy image would need TensorFlow to encode.
      yield i, {"image": PIL.Image.fromarray(images[i]), "label": int(labels[i])}


def prepare_fashion_mnist(data_dir: str | pathlib.Path | None = None,
                          idx_dir: str | pathlib.Path = DEFAULT_IDX_DIR, *,
                          max_examples_per_split: int | None = None) -> None:
  """Builds `fashion_mnist_offline` into data_dir (array_record); a no-op once prepared.

  Args:
    data_dir: tfds data dir (None: tfds' default, ~/tensorflow_datasets).
    idx_dir: folder with the four idx files (plain or .gz).
    max_examples_per_split: keep only the first N examples of each split (for tests).
  """
  builder = FashionMnistOffline(
      data_dir=None if data_dir is None else str(pathlib.Path(data_dir).expanduser()),
                                idx_dir=idx_dir)
  config = tfds.download.DownloadConfig(max_examples_per_split=max_examples_per_split)
  builder.download_and_prepare(download_config=config, file_format="array_record")
