"""hydra_jax.data: offline Fashion-MNIST builder, sources, VTAB-1k table, grain pipeline."""

import gzip
import pathlib
import struct

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from hydra_jax import build, data
from hydra_jax.data import pipeline, sources

DEBIAN_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 300, 40


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


def _reference(image, size):
  """Independent preprocessing: PIL bicubic on the RGB image (normalising is the model's)."""
  pil = PIL.Image.fromarray(image).convert("RGB").resize((size[1], size[0]), PIL.Image.BICUBIC)
  return np.asarray(pil)


def _train(source, **kw):
  kw = {"batch_size": 4, "image_size": 8, "seed": 0, "num_classes": source.num_classes, **kw}
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


def test_data_dir_expands_user(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(pathlib.Path(data_dir).parent))
  monkeypatch.chdir(tmp_path)
  home_dir = f"~/{pathlib.Path(data_dir).name}"
  assert build.data_dir(home_dir) == data_dir
  data.prepare_fashion_mnist(home_dir, idx_dir=tmp_path)  # prepared there: a no-op, no idx read
  assert len(data.get_source("fashion_mnist_offline", "test[:3]", data_dir=home_dir)) == 3
  assert not (tmp_path / "~").exists()  # nothing written under a folder literally named ~


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


# --- VTAB-1k: the table and the label functions ------------------------------------------

# (train800val200, test) written out by hand from task_adaptation/data/*.py at ed9b417: the
# reference's percentages of the tfds train sizes, as absolute example counts.
VTAB_SPLITS = {
    "cifar100": ("train[:800]+train[45000:45200]", "test"),  # 90% of 50,000
    "caltech101": ("train[:800]+train[2754:2954]", "test"),  # 90% of 3,060
    "pets": ("train[:800]+train[2944:3144]", "test"),  # 80% of 3,680
    "svhn": ("train[:800]+train[65931:66131]", "test"),  # 90% of 73,257
    "eurosat": ("train[:800]+train[16200:16400]", "train[21600:]"),  # 60%, 60+20% of 27,000
    "resisc45": ("train[:800]+train[18900:19100]", "train[25200:]"),  # 60%, 60+20% of 31,500
    "clevr_count": ("train[:800]+train[63000:63200]", "validation"),  # 90% of 70,000
    "clevr_dist": ("train[:800]+train[63000:63200]", "validation"),
    "dsprites_loc": ("train[:800]+train[589824:590024]", "train[663552:]"),  # 80%, 80+10%
    "dsprites_ori": ("train[:800]+train[589824:590024]", "train[663552:]"),  # of 737,280
    "smallnorb_azi": ("train[:800]+test[:200]", "test[50%:]"),
    "smallnorb_ele": ("train[:800]+test[:200]", "test[50%:]"),
    **{task: ("train[:800]+validation[:200]", "test")
       for task in ("dtd", "flowers102", "sun397", "camelyon", "retinopathy", "dmlab",
                    "kitti_dist")},
}
VTAB_CLASSES = {
    "cifar100": 100, "caltech101": 102, "dtd": 47, "flowers102": 102, "pets": 37, "svhn": 10,
    "sun397": 397, "camelyon": 2, "eurosat": 10, "resisc45": 45, "retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti_dist": 4, "dsprites_loc": 16,
    "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}
COMPUTED = ("clevr_count", "clevr_dist", "kitti_dist", "dsprites_loc", "dsprites_ori")


def _label(task, record):
  return data.VTAB1K[task]["label_fn"](record)


def test_vtab_table():
  assert set(data.VTAB1K) == set(VTAB_SPLITS) == set(VTAB_CLASSES)
  for name, task in data.VTAB1K.items():
    train, test = VTAB_SPLITS[name]
    assert (task["train_split"], task["test_split"]) == (train, test), name
    assert task["val_split"] == train.split("+")[1]
    assert task["num_classes"] == VTAB_CLASSES[name], name
    assert (task["label_fn"] is not None) == (name in COMPUTED) == (task["label"] is None), name
  assert data.VTAB1K["smallnorb_azi"]["label"] == "label_azimuth"
  assert data.VTAB1K["smallnorb_ele"]["label"] == "label_elevation"
  assert data.VTAB1K["dmlab"]["label"] == "label"
  assert data.VTAB1K["sun397"]["tfds_name"] == "sun397/tfds"
  assert data.VTAB1K["eurosat"]["tfds_name"] == "eurosat/rgb"
  assert [t for t, v in data.VTAB1K.items() if v["image_fn"]] == ["dsprites_loc", "dsprites_ori"]
  assert data.FASHION_MNIST_1K["train_split"] == "train[:800]+train[54000:54200]"
  assert data.TASKS["fashion_mnist"]["tfds_name"] == "fashion_mnist_offline"
  with pytest.raises(ValueError, match="unknown VTAB-1k task 'clevr'"):
    data.source_options("clevr")


@pytest.mark.parametrize("stacked", [False, True])  # without / with TensorFlow, see vtab.py
def test_clevr_labels(stacked):
  def record(depths):
    coords = [np.float32([1.0, 2.0, d]) for d in depths]
    sizes = [np.int64(1)] * len(depths)
    if stacked:
      coords, sizes = np.reshape(coords, (-1, 3)).astype(np.float32), np.asarray(sizes)
    return {"objects": {"pixel_coords": coords, "size": sizes}}

  assert [_label("clevr_count", record([20.0] * n)) for n in (3, 5, 10)] == [0, 2, 7]
  up = lambda x: float(np.nextafter(np.float32(x), np.float32(1e3)))  # noqa: E731
  # The closest (smallest) depth decides; a bin is (lower, upper], 0 for (0, 8], 5 for (10, 100].
  cases = {0.1: 0, 8.0: 0, up(8.0): 1, 8.5: 1, up(8.5): 2, 9.0: 2, up(9.0): 3, 9.5: 3,
           up(9.5): 4, 10.0: 4, up(10.0): 5, 100.0: 5, up(100.0): 6}  # > 100: out of the 6
  for depth, label in cases.items():
    assert _label("clevr_dist", record([depth + 40.0, depth, depth + 1.0])) == label, depth
  with pytest.raises(ValueError, match="clevr closest depth 0.0 is not above"):
    _label("clevr_dist", record([0.0, 9.0]))
  with pytest.raises(ValueError, match="clevr record has no objects"):
    _label("clevr_dist", record([]))


@pytest.mark.parametrize("stacked", [False, True])
def test_kitti_closest_vehicle_labels(stacked):
  def record(*objects):  # (type, z): 0 Car, 1 Van, 2 Truck, 3 Pedestrian, 5 Cyclist, 6 Tram
    types = [np.int64(t) for t, _ in objects]
    locations = [np.float32([1.0, 1.5, z]) for _, z in objects]
    if stacked:
      types, locations = np.asarray(types), np.reshape(locations, (-1, 3)).astype(np.float32)
    return {"objects": {"type": types, "location": locations}}

  up = lambda x: float(np.nextafter(np.float32(x), np.float32(1e4)))  # noqa: E731
  assert _label("kitti_dist", record()) == 3  # no object at all: "no vehicle"
  assert _label("kitti_dist", record((3, 2.0), (5, 4.0), (6, 1.0), (7, 1.0))) == 3
  cases = {1.0: 0, 8.0: 0, up(8.0): 1, 20.0: 1, up(20.0): 2, 999.0: 2, up(999.0): 3}
  for z, label in cases.items():  # a bin is (lower, upper]; z > 999 reads as "no vehicle"
    assert _label("kitti_dist", record((0, z))) == label, z
  assert _label("kitti_dist", record((1, 30.0), (2, 1.0))) == 0  # the nearest vehicle decides
  assert _label("kitti_dist", record((3, 1.0), (0, 30.0), (6, 2.0))) == 2  # others ignored
  # The reference's own test cases (kitti_test.py, test_closest_vehicle).
  assert [_label("kitti_dist", record(*objs)) for objs in
          ([(0, 1.0)], [(0, 10.0)], [(0, 30.0)], [(4, 30.0)], [(0, 30.0), (1, 1.0)])] == [
              0, 1, 2, 3, 0]


def test_dsprites_labels_and_images():
  loc = [_label("dsprites_loc", {"label_x_position": np.int64(x)}) for x in range(32)]
  assert loc == [x // 2 for x in range(32)] and loc[31] == 15
  ori = [_label("dsprites_ori", {"label_orientation": np.int64(o)}) for o in range(40)]
  assert ori[:6] == [0, 0, 0, 1, 1, 2] and ori[36:] == [14, 14, 15, 15]  # floor(o / 2.5)
  assert ori == [o * 16 // 40 for o in range(40)]
  assert sorted(set(np.bincount(ori))) == [2, 3]  # 40 values in 16 bins of 2 or 3
  image_fn = data.VTAB1K["dsprites_loc"]["image_fn"]
  mask = np.array([[[0], [1]], [[1], [0]]], np.uint8)
  out = image_fn(mask)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, mask * 255)
  with pytest.raises(ValueError, match="expected a dsprites mask of 0s and 1s, got values up "
                                       "to 255"):
    image_fn(out)


class VtabToyScenes(tfds.core.GeneratorBasedBuilder):
  """Three records with clevr's, kitti's and dsprites' label features (structure as tfds')."""

  VERSION = tfds.core.Version("1.0.0")
  # (clevr depths, kitti (type, z) per object, dsprites x position, orientation, image value)
  SCENES = (([9.2, 8.7, 12.0, 30.0, 50.0], [(0, 30.0), (3, 5.0), (1, 15.0), (6, 1.0), (7, 2.0)],
             31, 39),
            ([10.5, 11.0, 12.0], [(3, 2.0), (5, 3.0), (4, 1.0)], 2, 4),
            ([7.9] + [20.0] * 9, [(2, 5.0)] + [(3, 1.0)] * 9, 0, 0))
  LABELS = {"clevr_count": [2, 0, 7], "clevr_dist": [2, 5, 0], "kitti_dist": [1, 3, 0],
            "dsprites_loc": [15, 1, 0], "dsprites_ori": [15, 1, 0]}

  def _info(self):
    # DatasetInfo itself: dataset_info_from_configs looks for metadata in the module's package.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(4, 4, 1)),
        "objects": tfds.features.Sequence({
            "size": tfds.features.ClassLabel(num_classes=2),
            "pixel_coords": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "type": tfds.features.ClassLabel(num_classes=8),
            "location": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        }),
        "label_x_position": tfds.features.ClassLabel(num_classes=32),
        "label_orientation": tfds.features.ClassLabel(num_classes=40),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (depths, kitti, x, orientation) in enumerate(self.SCENES):
      objects = [{"size": 1, "pixel_coords": [1.0, 2.0, d], "type": t, "location": [0.0, 1.0, z]}
                 for d, (t, z) in zip(depths, kitti, strict=True)]
      image = PIL.Image.fromarray(np.eye(4, dtype=np.uint8) * (i % 2))  # a 0/1 mask
      yield i, {"image": image, "objects": objects, "label_x_position": x,
                "label_orientation": orientation}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy")
  VtabToyScenes(data_dir=str(out), file_format="array_record").download_and_prepare(
      file_format="array_record")
  return str(out)


def test_tfds_source_with_label_fn(toy_dir):
  for task, labels in VtabToyScenes.LABELS.items():
    info = data.VTAB1K[task]
    source = data.get_source("vtab_toy_scenes", "train", data_dir=toy_dir,
                             label_fn=info["label_fn"], num_classes=info["num_classes"])
    assert source.num_classes == info["num_classes"] and len(source) == 3
    assert [source[i]["label"] for i in range(3)] == labels, task
  source = data.get_source("vtab_toy_scenes", "train[1:2]", data_dir=toy_dir,
                           label_key="label_x_position")  # a ClassLabel still works as is
  assert source.num_classes == 32 and source[0]["label"] == 2
  with pytest.raises(ValueError, match="needs num_classes"):
    data.get_source("vtab_toy_scenes", "train", data_dir=toy_dir, label_fn=_label)
  with pytest.raises(ValueError, match=r"no ClassLabel feature 'objects'.*needs label_fn"):
    data.get_source("vtab_toy_scenes", "train", data_dir=toy_dir, label_key="objects")
  with pytest.raises(ValueError, match=r"'label_orientation' has 40 classes, expected "
                                       r"num_classes=16"):
    data.get_source("vtab_toy_scenes", "train", data_dir=toy_dir, label_key="label_orientation",
                    num_classes=16)
  with pytest.raises(ValueError, match="folder sources label by folder name"):
    data.get_source(f"folder:{toy_dir}", label_fn=_label, num_classes=2)


def test_open_source_reads_a_vtab_task(toy_dir, monkeypatch):
  """build.open_source on configs/vtab1k.py's data config, tfds redirected to the toy records."""
  from configs import vtab1k
  from hydra_jax import build
  from hydra_jax.data import sources

  read = tfds.data_source
  opened = []

  def data_source(name, **kwargs):
    opened.append((name, kwargs["split"]))
    return read("vtab_toy_scenes", **{**kwargs, "split": "train"})

  monkeypatch.setattr(sources, "_check_prepared", lambda name, data_dir: None)
  monkeypatch.setattr(sources.tfds, "data_source", data_source)
  for task in ("clevr_count", "dsprites_ori"):
    cfg = vtab1k.get_config(task).data
    cfg.data_dir = toy_dir
    assert cfg.vtab_task == task and cfg.label_key is None
    source = build.open_source(cfg, cfg.train_split)
    assert [source[i]["label"] for i in range(3)] == VtabToyScenes.LABELS[task]
    assert source.num_classes == data.VTAB1K[task]["num_classes"]
    scale = 255 if task.startswith("dsprites") else 1  # dsprites masks become 0/255
    np.testing.assert_array_equal(source[1]["image"][..., 0], np.eye(4, dtype=np.uint8) * scale)
  assert opened == [("clevr", "train[:800]+train[63000:63200]"),
                    ("dsprites", "train[:800]+train[589824:590024]")]
  cfg = vtab1k.get_config("smallnorb_azi").data
  assert (cfg.vtab_task, cfg.label_key) == ("smallnorb_azi", "label_azimuth")
  cfg.name = "smallnorb_v2"
  with pytest.raises(ValueError, match="'smallnorb_azi' reads tfds 'smallnorb', but data.name "
                                       "is 'smallnorb_v2'"):
    build.open_source(cfg, cfg.test_split)


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


def _write_split(root, split, counts, rng):
  """root/<split>/<class>/<k>.png with counts[class] images; returns {(class, k): array}."""
  written = {}
  for name, count in counts.items():
    (root / split / name).mkdir(parents=True)
    for k in range(count):
      written[(name, k)] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
      PIL.Image.fromarray(written[(name, k)]).save(root / split / name / f"{k}.png")
  return written


def test_folder_splits_are_separate_folders_sliced_in_a_fixed_mixed_order(tmp_path):
  rng = np.random.default_rng(2)
  _write_split(tmp_path, "train", {"ant": 10, "bee": 10, "cat": 10}, rng)
  _write_split(tmp_path, "test", {"bee": 3, "cat": 2}, rng)  # no ant: labels must still agree
  (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
  (tmp_path / "train" / "ant" / ".ipynb_checkpoints").mkdir()  # nor images of one
  PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
      tmp_path / "train" / "ant" / ".ipynb_checkpoints" / "0-checkpoint.png")
  train = data.get_source(f"folder:{tmp_path}", "train")
  head = data.get_source(f"folder:{tmp_path}", "train[:20]")
  tail = data.get_source(f"folder:{tmp_path}", "train[20:]")
  pct = data.get_source(f"folder:{tmp_path}", "train[:50%]")
  test = data.get_source(f"folder:{tmp_path}", "test")
  assert train.class_names == test.class_names == ["ant", "bee", "cat"]
  assert (len(train), len(head), len(tail), len(pct), len(test)) == (30, 20, 10, 15, 5)
  assert sorted(test.labels.tolist()) == [1, 1, 1, 2, 2]
  files = lambda src: [str(f) for f in src._files]  # noqa: E731
  assert files(head) + files(tail) == files(train)  # one fixed order, sliced
  assert set(files(train)).isdisjoint(files(test))
  assert len(set(head.labels[:10].tolist())) > 1  # shuffled: a slice mixes the classes
  assert files(data.get_source(f"folder:{tmp_path}", "train")) == files(train)  # deterministic
  with pytest.raises(FileNotFoundError, match="no split folder 'val'"):
    data.get_source(f"folder:{tmp_path}", "val[:10]")
  with pytest.raises(ValueError, match=r"split 'train\[25:20\]' .* is empty"):
    data.get_source(f"folder:{tmp_path}", "train[25:20]")
  for outside in ("train[40:]", "train[:20]+train[25:800]", "train[-31:]"):  # tfds refuses these
    with pytest.raises(ValueError, match=r"index -?\d+ is outside a split folder of 30 images"):
      data.get_source(f"folder:{tmp_path}", outside)
  joined = data.get_source(f"folder:{tmp_path}", "train[:20]+test + train[20:25]")
  assert files(joined) == files(head) + files(test) + files(tail)[:5]
  assert joined.labels.tolist() == head.labels.tolist() + test.labels.tolist() + \
      tail.labels[:5].tolist()
  with pytest.raises(ValueError, match="expected split folder names"):
    data.get_source(f"folder:{tmp_path}", "train[:5]+")
  with pytest.raises(ValueError, match="150% is not a percentage"):
    data.get_source(f"folder:{tmp_path}", "train[:150%]")


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
  levels = np.array([[0, 257 * 10, 257 * 128, 65535]], np.uint16)
  PIL.Image.fromarray(levels).save(tmp_path / "g16.png")
  with PIL.Image.open(tmp_path / "g16.png") as image:
    assert image.mode in ("I;16", "I")
    out = sources.to_hwc_uint8(image)
  np.testing.assert_array_equal(out[..., 0], [[0, 10, 128, 255]])
  rgb16 = np.stack([levels, levels[:, ::-1], levels], -1)  # a tfds uint16 Image feature
  np.testing.assert_array_equal(sources.to_hwc_uint8(rgb16)[0, :, 1], [255, 128, 10, 0])
  with pytest.raises(ValueError, match="mode 'F'"):
    sources.to_hwc_uint8(PIL.Image.fromarray(np.zeros((2, 2), np.float32)))


def test_alpha_is_dropped_from_arrays_as_from_pil_images():
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(sources.to_hwc_uint8(rgba), rgba[..., :3])
  np.testing.assert_array_equal(sources.to_hwc_uint8(PIL.Image.fromarray(rgba)), rgba[..., :3])
  np.testing.assert_array_equal(sources.to_hwc_uint8(rgba[..., 2:]), rgba[..., 2:3])  # grey, alpha


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
    list(data.eval_batches(source, batch_size=4, image_size=4, num_classes=5))


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_an_image_that_is_not_uint8_rgb_is_refused_naming_its_example(monkeypatch, cache_bytes):
  """A custom source's 16-bit image (wrapped to uint8 if cached, else trained on as is) or
  RGBA one is refused, cached or not, in training and evaluation."""
  monkeypatch.setattr(pipeline, "CACHE_BYTES", cache_bytes)
  images = [np.zeros((8, 8, 3), np.uint8)] * 4
  for bad, what in [(np.full((8, 8, 1), 1000, np.uint16), r"uint16 \(8, 8, 1\)"),
                    (np.zeros((8, 8, 4), np.uint8), r"uint8 \(8, 8, 4\)")]:
    source = ArraySource([*images[:2], bad, *images[2:]], num_classes=5)
    message = rf"ArraySource.* example 2: expected a uint8 image \(H, W, 1 or 3\), got {what}"
    with pytest.raises(ValueError, match=message):
      _take(_train(source, batch_size=5), 1)
    with pytest.raises(ValueError, match=message):
      list(data.eval_batches(source, batch_size=5, image_size=4, num_classes=5))


def test_batch_size_must_divide_into_shards():
  with pytest.raises(ValueError, match="multiple of shard_count 3"):
    _train(_array_source(), batch_size=4, shard_count=3)


# --- train_batches --------------------------------------------------------------------------

def test_train_values_match_reference():
  source = _array_source(n=6, size=(20, 16))
  batch = next(_train(source, batch_size=6, image_size=(12, 10)))
  assert batch["image"].shape == (6, 12, 10, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32
  for image, label in zip(batch["image"], batch["label"], strict=True):
    np.testing.assert_array_equal(image, _reference(source.images[label], (12, 10)))


def test_grayscale_becomes_rgb():
  source = ArraySource(np.full((2, 28, 28, 1), 200, np.uint8))
  batch = next(_train(source, batch_size=2, image_size=14))
  np.testing.assert_array_equal(batch["image"], np.full((2, 14, 14, 3), 200, np.uint8))


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


def test_each_epoch_is_a_permutation_with_the_remainder_dropped():
  labels = np.stack([b["label"] for b in _take(_train(_array_source(n=10)), 12)])
  epochs = labels.reshape(6, 8)  # 10 // 4 = 2 batches per epoch; 2 examples dropped each epoch
  for epoch in epochs:
    assert len(set(epoch.tolist())) == 8  # no image twice in an epoch (or a batch)
  for e, epoch in enumerate(epochs):
    np.testing.assert_array_equal(epoch, data.epoch_order(10, 0, e)[:8])
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_seeds_share_no_epoch_orders():
  """grain's reshuffle seeds epoch e with seed + e: seed 1 replayed seed 0 one epoch later."""
  orders = {s: [tuple(data.epoch_order(1000, s, e)) for e in range(20)] for s in range(3)}
  assert len(set(orders[0]) | set(orders[1]) | set(orders[2])) == 60
  with pytest.raises(ValueError, match="seed -1 and epoch 0 must be non-negative"):
    data.epoch_order(10, -1, 0)


def test_train_batches_keep_no_source_alive():
  import gc
  import weakref

  source = _array_source(n=8)
  _take(_train(source), 2)
  ref = weakref.ref(source)
  del source
  gc.collect()
  assert ref() is None  # the resized-image cache used to hold every source (and images) for good


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
    batches = list(data.eval_batches(source, batch_size=4, image_size=8, shard_index=shard,
                                     shard_count=2, num_classes=10, limit=limit))
    assert len(batches) == -(-n // 4)
    for b in batches:
      assert b["image"].shape == (2, 8, 8, 3) and b["mask"].dtype == bool
      assert (b["image"][~b["mask"]] == 0).all() and (b["label"][~b["mask"]] == 0).all()
      for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True):
        np.testing.assert_array_equal(image, _reference(source.images[label], (8, 8)))
      seen += list(b["label"][b["mask"]])
  assert sorted(seen) == list(range(n))
