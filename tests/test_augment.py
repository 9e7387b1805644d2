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
from hydra_jax.models import vit


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
                                    "crop_ratio": (3 / 4, 4 / 3), "mixup": 0.0, "cutmix": 0.0,
                                    **fields})


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


def _constant_images(n: int, size=(12, 10)):
  """n images, image i all 3 * i + 5 (every pair of them differs at every pixel), and one-hot
  targets of class i."""
  values = 3 * np.arange(n) + 5
  images = jnp.asarray(np.broadcast_to(values[:, None, None, None], (n, *size, 3)), jnp.uint8)
  return images, jnp.eye(n, dtype=jnp.float32), values


def _partner_share(targets, n):
  """Each example's weight on its neighbour's class (0-1, 2-3, ...), checking that the rest of
  its target is its own class and that the row sums to 1."""
  targets = np.asarray(targets)
  partner = np.arange(n) ^ 1
  share = targets[np.arange(n), partner]
  np.testing.assert_allclose(targets[np.arange(n), np.arange(n)], 1 - share, atol=1e-6)
  np.testing.assert_allclose(targets.sum(1), 1, atol=1e-6)
  return share, partner


def test_mixup_blends_neighbours_and_their_targets_alike():
  images, targets, values = _constant_images(32)
  out, mixed = jax.jit(augment.Mix(mixup=0.8))(images, targets, jax.random.key(0))
  share, partner = _partner_share(mixed, 32)
  want = (1 - share) * values + share * values[partner]
  assert out.dtype == jnp.uint8
  np.testing.assert_allclose(np.asarray(out, np.float64), np.broadcast_to(
      want[:, None, None, None], out.shape), atol=0.5 + 1e-4)  # rounding to uint8 only
  assert share.std() > 0.1 and 0 < share.min() and share.max() < 1  # a draw per example
  again, _ = augment.Mix(mixup=0.8)(images, targets, jax.random.key(1))
  assert not np.array_equal(again, out)


def test_cutmix_pastes_a_box_of_the_neighbour_weighted_by_its_pixels():
  images, targets, values = _constant_images(64, size=(12, 10))
  out, mixed = jax.jit(augment.Mix(cutmix=1.0))(images, targets, jax.random.key(0))
  share, partner = _partner_share(mixed, 64)
  out = np.asarray(out)[..., 0]
  from_partner = out == values[partner][:, None, None]
  assert (from_partner | (out == values[:, None, None])).all()  # each pixel one or the other
  np.testing.assert_allclose(from_partner.mean((1, 2)), share, atol=1e-6)
  for box in from_partner[from_partner.any((1, 2))]:  # a rectangle: its rows times its columns
    np.testing.assert_array_equal(box, box.any(1)[:, None] & box.any(0)[None, :])
  assert 0.2 < share.mean() < 0.5 and (share == 0).sum() < 16  # Beta(1, 1) areas, cut at edges


def test_mixup_and_cutmix_split_the_batch_and_an_odd_last_example_stays():
  images, targets, values = _constant_images(65)
  out, mixed = augment.Mix(mixup=1.0, cutmix=1.0)(images, targets, jax.random.key(3))
  np.testing.assert_array_equal(out[-1], images[-1])
  np.testing.assert_array_equal(mixed[-1], targets[-1])
  kinds = [len(np.unique(np.asarray(o))) for o in out[:-1]]  # mixup: one grey; CutMix: two
  assert 16 < kinds.count(1) < 48 and 16 < kinds.count(2) < 48


def test_mix_config():
  assert augment.mix_from_config(None) is None
  assert augment.mix_from_config(_config()) is None
  assert augment.mix_from_config(default.get_config().data.augment) is None
  assert augment.mix_from_config(_config(cutmix=1)) == augment.Mix(cutmix=1.0)
  assert augment.describe(_config(mixup=0.8, cutmix=0.0)) == {
      "flip": False, "crop_scale": None, "mixup": 0.8}
  assert augment.describe(_config(flip=True, cutmix=1.0)) == {
      "flip": True, "crop_scale": None, "cutmix": 1.0}
  for fields in ({"mixup": -0.5}, {"cutmix": True}, {"mixup": "0.8"}, {"cutmix": None}):
    name, value = next(iter(fields.items()))
    with pytest.raises(ValueError, match=rf"{name}={value!r}; expected a Beta alpha > 0, or 0"):
      augment.mix_from_config(_config(**fields))


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


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_step_trains_on_the_mixed_images_and_targets(microbatches):
  """A mix that hands each example its neighbour's (smoothed) target and blanks the images gives
  the step of blank images labelled so; one that changes nothing gives the plain step."""
  state, frozen, batch, step = _step_pieces()
  step = functools.partial(step, microbatches=microbatches, label_smoothing=0.1)
  swap = np.arange(16) ^ 1  # the whole batch mixes before it is split into microbatches

  def relabel(images, targets, key):
    return jnp.zeros_like(images), targets[jnp.asarray(np.arange(len(targets)) ^ 1)]
  _, mixed = step(state, frozen, batch, jax.random.key(2), mix=relabel)
  _, want = step(state, frozen, {"image": jnp.zeros_like(batch["image"]),
                                 "label": batch["label"][swap]}, jax.random.key(2))
  np.testing.assert_allclose(mixed["grad_norm"], want["grad_norm"], rtol=1e-5)
  _, same = step(state, frozen, batch, jax.random.key(2), mix=lambda i, t, k: (i, t))
  _, plain = step(state, frozen, batch, jax.random.key(2))
  np.testing.assert_allclose(same["grad_norm"], plain["grad_norm"], rtol=1e-5)
  assert abs(float(mixed["grad_norm"]) - float(plain["grad_norm"])) > 1e-3


def test_mixing_comes_before_the_microbatch_split():
  """Parts of 1 example still mix (with the batch's neighbour): the step with 16 microbatches
  is the whole batch's mixed step."""
  state, frozen, batch, step = _step_pieces()
  mix = augment.Mix(mixup=0.8, cutmix=1.0)
  _, whole = step(state, frozen, batch, jax.random.key(2), mix=mix)
  _, parts = step(state, frozen, batch, jax.random.key(2), mix=mix, microbatches=16)
  _, plain = step(state, frozen, batch, jax.random.key(2), microbatches=16)
  np.testing.assert_allclose(parts["grad_norm"], whole["grad_norm"], rtol=1e-5)
  # (the zero head's gradient moves little with the mix: 2e-4 here, 10x the rounding above)
  assert abs(float(parts["grad_norm"]) - float(plain["grad_norm"])) > 1e-4


def test_every_device_draws_its_own_keys(monkeypatch):
  """pmap over 2 devices, 2 parts each: an augmentation and a mix key per device (each sees the
  device's whole share), a dropout key (the model's) per part, all different."""
  state, frozen, batch, step = _step_pieces()
  seen = {"augment": [], "mix": [], "dropout": []}

  def record(name, key):
    jax.debug.callback(lambda k: seen[name].append(np.asarray(k).tobytes()),
                       jax.random.key_data(key))

  def spy(images, key):
    record("augment", key)
    return images

  def mix_spy(images, targets, key):
    record("mix", key)
    return images, targets

  def dropout_spy(rng, *, train):
    record("dropout", rng)
    return train_rngs(rng, train=train)
  train_rngs = vit.train_rngs
  monkeypatch.setattr(vit, "train_rngs", dropout_spy)
  devices = jax.devices()[:2]
  pstep = jax.pmap(functools.partial(step, microbatches=2, augment=spy, mix=mix_spy,
                                     axis_name="batch"),
                   axis_name="batch", in_axes=(0, 0, 0, None), devices=devices)
  shard = lambda x: jnp.stack([x, x])  # noqa: E731
  per_device = {k: v.reshape(2, -1, *v.shape[1:]) for k, v in batch.items()}
  jax.block_until_ready(pstep(jax.tree.map(shard, state), jax.tree.map(shard, frozen),
                              per_device, jax.random.key(2)))
  assert [len(keys) for keys in seen.values()] == [2, 2, 4]
  assert len(set(sum(seen.values(), []))) == 8
