"""Augmentation inside the train step (hydra_jax.augment)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hydra_jax import adapters, augment, optim, train_lib
from hydra_jax.build import build_model


def _bilinear_reference(image, box):
  """Output pixel (i, j) samples (top + (i + 1/2) h / H, left + (j + 1/2) w / W) in pixel-edge
  coordinates, interpolating the 2x2 nearest pixel centres, the image's edges clamped."""
  height, width = image.shape[:2]
  top, left, h, w = box
  out = np.zeros(image.shape, np.float64)
  for i in range(height):
    for j in range(width):
      y = np.clip(top + (i + 0.5) * h / height - 0.5, 0, height - 1)
      x = np.clip(left + (j + 0.5) * w / width - 0.5, 0, width - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * (1 - fx) * image[y0, x0] + (1 - fy) * fx * image[y0, x1]
                   + fy * (1 - fx) * image[y1, x0] + fy * fx * image[y1, x1])
  return out


def test_resized_crop_samples_the_box_bilinearly():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
  for box in ([0, 0, 12, 10], [1.5, 2.25, 6.0, 4.5], [6, 0, 6, 10], [0.3, 7.1, 2.2, 2.9]):
    got = np.asarray(augment.resized_crop(jnp.asarray(image), jnp.asarray(box, jnp.float32)))
    want = _bilinear_reference(image.astype(np.float64), box)
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-3, box  # rounding only
  whole = augment.resized_crop(jnp.asarray(image), jnp.asarray([0, 0, 12, 10], jnp.float32))
  np.testing.assert_array_equal(whole, image)


def test_crop_boxes_keep_to_the_image_and_the_ranges():
  boxes = np.asarray(augment.crop_boxes(jax.random.key(0), 4000, (20, 30), (0.1, 0.6),
                                        (0.5, 2.0)))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 20 + 1e-4).all() and (left + w <= 30 + 1e-4).all()
  share, ratio = h * w / 600, w / h
  assert share.min() >= 0.1 - 1e-5 and share.max() <= 0.6 + 1e-5
  assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2.0 + 1e-5
  assert 0.3 < share.mean() < 0.4 and share.std() > 0.1  # drawn, not fixed
  assert abs(np.median(np.log(ratio))) < 0.1  # log-uniform in [1/2, 2]: symmetric about 1


def test_crop_boxes_fall_back_to_the_centred_box_of_the_nearest_ratio():
  # the whole area at width / height 2 never fits a square: the whole width, half the height
  boxes = np.asarray(augment.crop_boxes(jax.random.key(1), 3, (16, 16), (1.0, 1.0), (2.0, 3.0)))
  np.testing.assert_allclose(boxes, np.tile([[4.0, 0.0, 8.0, 16.0]], (3, 1)), atol=1e-5)


def test_flip_mirrors_some_examples_and_keeps_the_rest():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, 8, 8, 3)), jnp.uint8)
  flip = augment.Augment(flip=True)
  out = np.asarray(jax.jit(flip)(images, jax.random.key(0)))
  same = [np.array_equal(o, x) for o, x in zip(out, np.asarray(images), strict=True)]
  mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, np.asarray(images), strict=True)]
  assert all(a != b for a, b in zip(same, mirrored, strict=True))  # one or the other
  assert 16 < sum(mirrored) < 48
  np.testing.assert_array_equal(jax.jit(flip)(images, jax.random.key(0)), out)
  assert not np.array_equal(jax.jit(flip)(images, jax.random.key(1)), out)
  crop = jax.jit(augment.Augment(flip=True, crop_scale=(0.08, 1.0)))(images, jax.random.key(0))
  assert crop.shape == images.shape and crop.dtype == jnp.uint8


def _config(**fields):
  return ml_collections.ConfigDict({"flip": False, "crop_scale": None,
                                    "crop_ratio": (3 / 4, 4 / 3), **fields})


def test_describe_records_the_draws():
  assert augment.describe(_config()) is None
  assert augment.describe(_config(crop_ratio=(1, 2))) is None  # no crop: the ratio draws nothing
  assert augment.describe(_config(flip=True)) == {"flip": True, "crop_scale": None}
  assert augment.describe(_config(crop_scale=(0.5, 1), crop_ratio=None)) == {
      "flip": False, "crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 4 / 3]}


def test_from_config():
  assert augment.from_config(None) is None
  assert augment.from_config(_config()) is None  # nothing to do: the step skips it
  assert augment.from_config(_config(flip=True)) == augment.Augment(flip=True)
  assert augment.from_config(_config(crop_scale=[0.08, 1])).crop_scale == (0.08, 1.0)
  assert augment.from_config(default.get_config().data.augment) is None
  with pytest.raises(ValueError, match=r"crop_scale=\(0.5, 0.2\); expected \(min, max\)"):
    augment.from_config(_config(crop_scale=(0.5, 0.2)))
  with pytest.raises(ValueError, match=r"crop_ratio=\(0.0, 1.0\); expected"):
    augment.from_config(_config(crop_scale=(0.5, 1.0), crop_ratio=(0, 1)))
  pair = r"; expected a \(min, max\) pair"
  for fields, message in [({"crop_scale": (0.5,)}, r"crop_scale=\(0.5,\)" + pair),
                          ({"crop_scale": 0.5}, r"crop_scale=\(0.5,\)" + pair),
                          ({"crop_scale": (0.1, 0.5, 1)}, r"crop_scale=\(0.1, 0.5, 1.0\)" + pair),
                          ({"crop_scale": (0.5, 1), "crop_ratio": (1.0,)},
                           r"crop_ratio=\(1.0,\)" + pair)]:
    with pytest.raises(ValueError, match=message):
      augment.from_config(_config(**fields))


def _step_pieces():
  config = default.get_testing_config()
  model, pre = build_model(config, jax.random.key(0))
  spec = adapters.spec_from_config(config.adapter)
  trainable_params, frozen = optim.split(pre.params, list(config.train_patterns))
  trainable = {"adapters": adapters.init(spec, pre.params, jax.random.key(1)),
               "params": trainable_params}
  config.optim.total_steps, config.optim.warmup_steps = 10, 2
  tx, schedule = train_lib.make_optimizer(config.optim)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (16, 16, 16, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  return state, frozen, batch, functools.partial(train_lib.train_step, model=model, spec=spec,
                                                 tx=tx, schedule=schedule)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_step_trains_on_the_augmented_images(microbatches):
  """An augmentation that blanks the images gives the step of blank images."""
  state, frozen, batch, step = _step_pieces()
  step = functools.partial(step, microbatches=microbatches)
  blank = lambda images, key: jnp.zeros_like(images)  # noqa: E731
  _, with_blank = step(state, frozen, batch, jax.random.key(2), augment=blank)
  _, blank_input = step(state, frozen, {**batch, "image": jnp.zeros_like(batch["image"])},
                        jax.random.key(2))
  _, plain = step(state, frozen, batch, jax.random.key(2))
  # the zero head gives every batch the loss log(10): the gradients tell the inputs apart
  np.testing.assert_allclose(with_blank["grad_norm"], blank_input["grad_norm"], rtol=1e-5)
  assert abs(float(with_blank["grad_norm"]) - float(plain["grad_norm"])) > 1e-3


def test_every_device_and_microbatch_part_draws_its_own_key():
  """pmap over 2 devices, 2 parts each: 4 augmentation keys, none the dropout key's."""
  state, frozen, batch, step = _step_pieces()
  seen = []

  def spy(images, key):
    jax.debug.callback(lambda k: seen.append(np.asarray(k).tobytes()), jax.random.key_data(key))
    return images

  devices = jax.devices()[:2]
  pstep = jax.pmap(functools.partial(step, microbatches=2, augment=spy, axis_name="batch"),
                   axis_name="batch", in_axes=(0, 0, 0, None), devices=devices)
  shard = lambda x: jnp.stack([x, x])  # noqa: E731
  per_device = {k: v.reshape(2, -1, *v.shape[1:]) for k, v in batch.items()}
  jax.block_until_ready(pstep(jax.tree.map(shard, state), jax.tree.map(shard, frozen),
                              per_device, jax.random.key(2)))
  assert len(seen) == 4 and len(set(seen)) == 4
