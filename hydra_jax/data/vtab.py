"""VTAB-1k tasks: tfds names, train800val200 split strings and test splits.

Conventions of google-research/task_adaptation: the 200 validation images come from the
"validation" split where the dataset has one; otherwise they are carved from train at the start of
its validation part (90% of train for cifar/caltech101/pets/svhn/clevr, 60% for eurosat/resisc45,
80% for dsprites; smallnorb validates on the first half of "test" and tests on the second half).

Keys are the task names of the Hydra paper's tables. `train_split` is train800val200 (all 1,000
training images); `val_split` is its 200 validation images alone (for monitoring).
`label` names the tfds feature the task classifies (pass it to `get_source(..., label_key=)`).
Where that feature needs a further mapping to the task's classes (clevr counts/distances, kitti
distance bins, dsprites position/orientation bins), `label_note` says which; that mapping is not
implemented here yet.
"""

from __future__ import annotations


def _task(tfds_name, train_split, test_split, num_classes, label="label", label_note=None):
  return dict(tfds_name=tfds_name, train_split=train_split, val_split=train_split.split("+")[1],
              test_split=test_split, num_classes=num_classes, label=label, label_note=label_note)


def _carved(n_val_start: int) -> str:
  return f"train[:800]+train[{n_val_start}:{n_val_start + 200}]"


_WITH_VAL = "train[:800]+validation[:200]"

VTAB1K = {
    # natural
    "cifar100": _task("cifar100", _carved(45000), "test", 100),
    "caltech101": _task("caltech101", _carved(2754), "test", 102),
    "dtd": _task("dtd", _WITH_VAL, "test", 47),
    "flowers102": _task("oxford_flowers102", _WITH_VAL, "test", 102),
    "pets": _task("oxford_iiit_pet", _carved(3312), "test", 37),
    "svhn": _task("svhn_cropped", _carved(65931), "test", 10),
    "sun397": _task("sun397", _WITH_VAL, "test", 397),
    # specialized
    "camelyon": _task("patch_camelyon", _WITH_VAL, "test", 2),
    "eurosat": _task("eurosat/rgb", _carved(16200), "train[21600:]", 10),
    "resisc45": _task("resisc45", _carved(18900), "train[25200:]", 45),
    "retinopathy": _task("diabetic_retinopathy_detection/btgraham-300", _WITH_VAL,
                                  "test", 5),
    # structured
    "clevr_count": _task("clevr", _carved(63000), "validation", 8, "objects",
                         "number of objects - 3"),
    "clevr_dist": _task("clevr", _carved(63000), "validation", 6, "objects",
                        "closest object's 3-D distance, 6 bins"),
    "dmlab": _task("dmlab", _WITH_VAL, "test", 6),
    "kitti_dist": _task("kitti", _WITH_VAL, "test", 4, "objects",
                        "closest vehicle distance, 4 bins"),
    "dsprites_loc": _task("dsprites", _carved(589824), "train[663552:]", 16,
                          "label_x_position", "x position 32 -> 16 bins"),
    "dsprites_ori": _task("dsprites", _carved(589824), "train[663552:]", 16,
                          "label_orientation", "orientation 40 -> 16 bins"),
    "smallnorb_azi": _task("smallnorb", "train[:800]+test[:200]", "test[50%:]", 18,
                           "label_azimuth"),
    "smallnorb_ele": _task("smallnorb", "train[:800]+test[:200]", "test[50%:]", 9,
                           "label_elevation"),
}

# The same protocol on the offline dataset: val carved at 90% of the 60k train images.
FASHION_MNIST_1K = _task("fashion_mnist_offline", _carved(54000), "test", 10)
TASKS = {**VTAB1K, "fashion_mnist": FASHION_MNIST_1K}
