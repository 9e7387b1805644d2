"""hydra_jax.data: offline Fashion-MNIST builder, sources, VTAB-1k table, grain pipeline."""

import gzip
import pathlib
import struct

import numpy as np
import PIL.Image
import pytest

from hydra_jax import data

DEBIAN_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 300, 40
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_idx(path, array, *, gz):
  """Writes an idx file by hand: magic (0, 0, 0x08, ndim), big-endian dims, uint8 data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def raw():
  rng = np.random.default_rng(0)
  return {"train": (rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, (N_TRAIN,), dtype=np.uint8)),
          "test": (rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, (N_TEST,), dtype=np.uint8))}


@pytest.fixture(scope="module")
def data_dir(raw, tmp_path_factory):
  """Small idx files of our own (train gzipped, test plain), prepared once for the module."""
  idx = tmp_path_factory.mktemp("idx")
  _write_idx(idx / "train-images-idx3-ubyte.gz", raw["train"][0], gz=True)
  _write_idx(idx / "train-labels-idx1-ubyte.gz", raw["train"][1], gz=True)
  _write_idx(idx / "t10k-images-idx3-ubyte", raw["test"][0], gz=False)
  _write_idx(idx / "t10k-labels-idx1-ubyte", raw["test"][1], gz=False)
  out = tmp_path_factory.mktemp("tfds")
  data.prepare_fashion_mnist(out, idx_dir=idx)
  return str(out)


class ArraySource:
  """In-memory source: label == index, so a batch's labels say which examples it holds."""

  def __init__(self, images, labels=None, num_classes=None):
    self.images = images
    self.labels = np.arange(len(images)) if labels is None else np.asarray(labels)
    self.num_classes = num_classes or len(images)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


def _array_source(n=10, size=(20, 16), channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return ArraySource(rng.integers(0, 256, (n, *size, channels), dtype=np.uint8))


def _reference(image, size, mean=MEAN, std=STD):
  """Independent preprocessing: PIL bicubic on the RGB image, then normalise."""
  pil = PIL.Image.fromarray(image).convert("RGB").resize((size[1], size[0]), PIL.Image.BICUBIC)
  return (np.asarray(pil, np.float32) / 255.0 - np.float32(mean)) / np.float32(std)


def _train(source, **kw):
  kw = {"batch_size": 4, "image_size": 8, "mean": MEAN, "std": STD, "seed": 0,
        "num_classes": source.num_classes, **kw}
  return data.train_batches(source, **kw)


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


# --- builder and tfds sources ---------------------------------------------------------------

def test_builder_matches_raw_idx(data_dir, raw):
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    source = data.get_source("fashion_mnist_offline", split, data_dir=data_dir)
    assert len(source) == n and source.num_classes == 10
    images, labels = raw[split]
    for i in (0, 1, n // 2, n - 1):
      item = source[i]
      assert item["image"].dtype == np.uint8 and item["image"].shape == (28, 28, 1)
      np.testing.assert_array_equal(item["image"][..., 0], images[i])
      assert item["label"] == labels[i]


def test_prepare_is_idempotent(data_dir, tmp_path):
  files = sorted(pathlib.Path(data_dir).rglob("*.array_record*"))
  mtimes = [f.stat().st_mtime_ns for f in files]
  data.prepare_fashion_mnist(data_dir, idx_dir=tmp_path)  # no idx files there: must not be read
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_split_strings(data_dir, raw):
  source = data.get_source("fashion_mnist_offline", "train[:20]+train[250:260]", data_dir=data_dir)
  images, labels = raw["train"]
  expected = np.concatenate([np.arange(20), np.arange(250, 260)])
  assert len(source) == 30
  for j, i in enumerate(expected):
    np.testing.assert_array_equal(source[j]["image"][..., 0], images[i])
    assert source[j]["label"] == labels[i]


@pytest.mark.skipif(not DEBIAN_IDX.exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_real_fashion_mnist_first_examples(tmp_path):
  data.prepare_fashion_mnist(tmp_path, idx_dir=DEBIAN_IDX, max_examples_per_split=50)
  with gzip.open(DEBIAN_IDX / "t10k-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(DEBIAN_IDX / "t10k-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  assert images.shape[0] == 10_000
  source = data.get_source("fashion_mnist_offline", "test[:50]", data_dir=str(tmp_path))
  for i in (0, 7, 49):
    np.testing.assert_array_equal(source[i]["image"][..., 0], images[i])
    assert source[i]["label"] == labels[i]


def test_vtab_table():
  assert len(data.VTAB1K) == 19
  for task in data.VTAB1K.values():
    assert {"tfds_name", "train_split", "test_split", "num_classes"} <= task.keys()
    assert task["train_split"].startswith("train[:800]+")
  assert data.VTAB1K["cifar100"]["train_split"] == "train[:800]+train[45000:45200]"
  assert data.VTAB1K["dtd"]["train_split"] == "train[:800]+validation[:200]"
  assert data.VTAB1K["dtd"]["val_split"] == "validation[:200]"
  assert data.VTAB1K["smallnorb_ele"]["label"] == "label_elevation"
  assert data.VTAB1K["eurosat"]["train_split"] == "train[:800]+train[16200:16400]"
  assert data.FASHION_MNIST_1K["train_split"] == "train[:800]+train[54000:54200]"
  assert data.TASKS["fashion_mnist"]["tfds_name"] == "fashion_mnist_offline"


def test_folder_source(tmp_path):
  rng = np.random.default_rng(1)
  written = {}
  for name, mode, shape in (("zebra", "RGB", (9, 7, 3)), ("ant", "L", (5, 6)),
                            ("moth", "RGBA", (4, 4, 4))):
    (tmp_path / name).mkdir()
    for k in range(2):
      array = rng.integers(0, 256, shape, dtype=np.uint8)
      PIL.Image.fromarray(array, mode).save(tmp_path / name / f"{k}.png")
      written[(name, k)] = array
  source = data.get_source(f"folder:{tmp_path}")
  assert source.num_classes == 3 and len(source) == 6
  assert [source[i]["label"] for i in range(6)] == [0, 0, 1, 1, 2, 2]  # ant, moth, zebra
  np.testing.assert_array_equal(source[1]["image"][..., 0], written[("ant", 1)])
  np.testing.assert_array_equal(source[2]["image"], written[("moth", 0)][..., :3])
  np.testing.assert_array_equal(source[5]["image"], written[("zebra", 1)])


# --- errors ---------------------------------------------------------------------------------

def test_missing_fashion_mnist_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_fashion_mnist") as e:
    data.get_source("fashion_mnist_offline", "train", data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value)


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build mnist") as e:
    data.get_source("mnist", "train", data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value) and "download_and_prepare" in str(e.value)
  with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset'"):
    data.get_source("no_such_dataset", "train", data_dir=str(tmp_path))


def test_empty_split_and_empty_folder(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"split 'train\[5:5\]' .* is empty"):
    data.get_source("fashion_mnist_offline", "train[5:5]", data_dir=data_dir)
  (tmp_path / "cls").mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    data.get_source(f"folder:{tmp_path}")


def test_label_out_of_range():
  source = ArraySource(np.zeros((6, 4, 4, 3), np.uint8), labels=[0, 1, 2, 7, 1, 0],
                       num_classes=10)
  with pytest.raises(ValueError, match=r"label 7 of example 3 .*num_classes=5"):
    _train(source, num_classes=5)
  with pytest.raises(ValueError, match=r"label 7 .*num_classes=5"):
    list(data.eval_batches(source, batch_size=4, image_size=4, mean=MEAN, std=STD,
                           num_classes=5))


def test_batch_size_must_divide_into_shards():
  with pytest.raises(ValueError, match="multiple of shard_count 3"):
    _train(_array_source(), batch_size=4, shard_count=3)


# --- train_batches --------------------------------------------------------------------------

def test_train_values_match_reference():
  source = _array_source(n=6, size=(20, 16))
  batch = next(_train(source, batch_size=6, image_size=(12, 10)))
  assert batch["image"].shape == (6, 12, 10, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  for image, label in zip(batch["image"], batch["label"], strict=True):
    np.testing.assert_allclose(image, _reference(source.images[label], (12, 10)), atol=1e-5)


def test_grayscale_constant_image_normalisation():
  source = ArraySource(np.full((2, 28, 28, 1), 200, np.uint8))
  batch = next(_train(source, batch_size=2, image_size=14))
  expected = (200 / 255 - np.float32(MEAN)) / np.float32(STD)
  np.testing.assert_allclose(batch["image"], np.broadcast_to(expected, (2, 14, 14, 3)),
                             rtol=1e-6)


def test_train_deterministic_and_resumable():
  source = _array_source(n=10)
  first = _take(_train(source), 12)
  again = _take(_train(source), 12)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  for k in (1, 5, 11):
    resumed = next(_train(source, start_step=k))
    np.testing.assert_array_equal(resumed["label"], first[k]["label"])
    np.testing.assert_array_equal(resumed["image"], first[k]["image"])
  other = _take(_train(source, seed=1), 12)
  assert any((a["label"] != b["label"]).any() for a, b in zip(first, other, strict=True))


def test_each_epoch_is_a_permutation():
  labels = np.concatenate([b["label"] for b in _take(_train(_array_source(n=10)), 15)])
  epochs = labels.reshape(6, 10)  # 15 batches of 4 = 6 epochs; batches cross epoch boundaries
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_shards_split_the_global_batch():
  source = _array_source(n=12)  # 3 batches per epoch: no batch straddles two epochs
  whole = _take(_train(source, batch_size=4), 6)
  shards = [_take(_train(source, batch_size=4, shard_index=i, shard_count=2), 6) for i in (0, 1)]
  for k in range(6):
    assert shards[0][k]["label"].shape == (2,)
    assert not set(shards[0][k]["label"]) & set(shards[1][k]["label"])
    for key in ("label", "image"):
      joined = np.concatenate([shards[0][k][key], shards[1][k][key]])
      np.testing.assert_array_equal(joined, whole[k][key])


# --- eval_batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [None, 7])
def test_eval_covers_every_example_once(limit):
  source = _array_source(n=10)
  n = 10 if limit is None else limit
  seen = []
  for shard in (0, 1):
    batches = list(data.eval_batches(source, batch_size=4, image_size=8, mean=MEAN, std=STD,
                                     shard_index=shard, shard_count=2, num_classes=10,
                                     limit=limit))
    assert len(batches) == -(-n // 4)
    for b in batches:
      assert b["image"].shape == (2, 8, 8, 3) and b["mask"].dtype == bool
      assert (b["image"][~b["mask"]] == 0).all() and (b["label"][~b["mask"]] == 0).all()
      for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True):
        np.testing.assert_allclose(image, _reference(source.images[label], (8, 8)), atol=1e-5)
      seen += list(b["label"][b["mask"]])
  assert sorted(seen) == list(range(n))
