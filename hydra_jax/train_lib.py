"""Training: the state, the pure train step, evaluation, and ``train_and_evaluate``.

Data flow: config -> model + pre-trained params -> split into (trainable, frozen) ->
adapters.init -> optax -> ``train_step(state, frozen, batch, rng)`` -> orbax. The frozen
params are an argument of the step, never part of its state or optimizer; the step differentiates
only the trainable tree ``{"adapters": ..., "params": ...}`` (adapter factors and e.g. the head).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hydra_jax import adapters as adapters_lib
from hydra_jax import optim
from hydra_jax.models import vit

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
  """What a checkpoint holds: step, trainable tree and optimizer state (a pytree)."""
  step: jax.Array
  trainable: dict[str, Any]
  opt_state: optax.OptState


def forward(model: nn.Module, spec: adapters_lib.AdapterSpec | None, trainable, frozen,
            images: jax.Array, *, rng: jax.Array | None = None, train: bool = False,
            axis_name: str | None = None):
  """Logits (B, C) of the adapted model and aux losses; ``spec=None`` is the plain model."""
  params = optim.join(trainable["params"], frozen)
  if spec is None:
    logits = model.apply({"params": params}, images, rngs=vit.train_rngs(rng, train=train))
    return logits, {"balance_loss": jnp.zeros(())}
  return adapters_lib.forward(model, params, trainable["adapters"], spec, images, rng=rng,
                              train=train, axis_name=axis_name)


# the keys of the step's augmentation and mix: folded out of the step's key, whose dropout
# draws it keeps
_AUGMENT_STREAM = 0x417567
_MIX_STREAM = 0x4D6978


def loss_fn(trainable, frozen, batch: Batch, rng: jax.Array, *, model: nn.Module,
            spec: adapters_lib.AdapterSpec | None, axis_name: str | None = None,
            label_smoothing: float = 0.0):
  """Mean cross-entropy plus the router's load-balancing loss (already weighted by the spec).

  The targets are ``batch["target"]`` (B, C) where the batch has them (``augmented``'s mix),
  else the labels smoothed by ``label_smoothing`` (1 - e on the class, e spread evenly over all).
  """
  images, labels = batch["image"], batch["label"]
  logits, aux = forward(model, spec, trainable, frozen, images, rng=rng, train=True,
                        axis_name=axis_name)
  if "target" in batch:
    loss = optax.softmax_cross_entropy(logits, batch["target"]).mean()
  elif label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss + aux["balance_loss"], logits


def augmented(batch: Batch, rng: jax.Array, *, augment: Callable | None, mix: Callable | None,
              num_classes: int, label_smoothing: float = 0.0) -> Batch:
  """The batch with ``augment(images, key)`` (e.g. ``augment.Augment``) applied, then
  ``mix(images, targets, key)`` (e.g. ``augment.Mix``), which adds ``"target"`` (B, num_classes):
  the labels smoothed by ``label_smoothing`` (as timm does), blended as the images are."""
  out = dict(batch)
  if augment is not None:
    out["image"] = augment(batch["image"], jax.random.fold_in(rng, _AUGMENT_STREAM))
  if mix is not None:
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing)
    out["image"], out["target"] = mix(out["image"], targets, jax.random.fold_in(rng, _MIX_STREAM))
  return out


def train_step(state: TrainState, frozen, batch: Batch, rng: jax.Array, *, model: nn.Module,
               spec: adapters_lib.AdapterSpec | None, tx: optax.GradientTransformation,
               schedule: Callable[[jax.Array], jax.Array], axis_name: str | None = None,
               microbatches: int = 1, augment: Callable | None = None,
               mix: Callable | None = None,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Pure: jit it (state donated) or pmap it (``axis_name`` set).

  Args:
    state: the trainable tree, its optimizer state and the step.
    frozen: the frozen params (not differentiated, not updated).
    batch: {"image": (B, H, W, 3), "label": (B,) int32}; under pmap, this device's part.
    rng: the run's base key; each step folds in its step number (and device under pmap), so a
      resumed run draws the same dropout masks as an uninterrupted one.
    microbatches: M > 1 accumulates the gradient over M sequential parts of B / M examples
      (``_accumulated``): the same update with about 1/M of the activations' memory.
    augment: ``augment(images, key) -> images`` applied to the training images inside the step
      (``data.augment``), drawn from the step's key like dropout; None: the images as given.
    mix: ``mix(images, targets, key) -> (images, targets)`` after ``augment`` (mixup / CutMix,
      ``augment.Mix``). Both see the whole batch (under pmap or ``parallel.per_device`` the
      device's share) before any microbatch split. The metrics' accuracy counts each image's
      own label.
    label_smoothing: see ``loss_fn``.
  Returns:
    The new state and {"loss", "accuracy", "lr", "grad_norm", "update_norm"} scalars.
  """
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  loss = functools.partial(loss_fn, model=model, spec=spec, axis_name=axis_name,
                           label_smoothing=label_smoothing)
  if augment is not None or mix is not None:
    batch = augmented(batch, rng, augment=augment, mix=mix, num_classes=model.num_classes,
                      label_smoothing=label_smoothing)
  grads, metrics = _accumulated(loss, state.trainable, frozen, batch, rng, microbatches)
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics["lr"] = schedule(state.step)
  # a non-finite update (an overflowing gradient) spoils the new params even at a finite loss
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["update_norm"] = optax.tree.norm(updates)
  return TrainState(state.step + 1, trainable, opt_state), metrics


def _accumulated(loss: Callable, trainable, frozen, batch: Batch, rng: jax.Array,
                 microbatches: int) -> tuple[Any, dict[str, jax.Array]]:
  """Gradients of ``loss`` and {"loss", "accuracy"}, averaged over ``microbatches`` equal parts.

  Part i holds examples i, i + M, i + 2M, ...: a batch sharded over a mesh by contiguous rows
  gives every device its share of every part, so no part waits on one device and no images
  move. Under plain jit over a mesh GSPMD all-reduces the gradients inside the loop, once per
  part; with ``axis_name`` (pmap, or ``parallel.per_device``, which the run uses) each device
  accumulates its own rows and the step reduces once. The parts run in a ``lax.scan``, so one
  part's activations are alive at a time. With M > 1, part i draws dropout from
  ``fold_in(rng, i)`` and HydraLoRA's balancing loss sees one part's tokens (its statistics are
  not linear in the batch); otherwise the mean of the parts' gradients is the whole batch's up to
  float rounding.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def part(examples: Batch, key: jax.Array):
    (value, logits), grads = grad_fn(trainable, frozen, examples, key)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == examples["label"])
    return grads, {"loss": value, "accuracy": accuracy}

  if microbatches == 1:
    return part(batch, rng)
  size = len(batch["label"])
  if size % microbatches:
    raise ValueError(f"a batch of {size} examples does not split into microbatches="
                     f"{microbatches} equal parts; expected a multiple of {microbatches}")
  parts = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, microbatches, *x.shape[1:]), 0, 1),
                       batch)

  def add(total, xs):
    examples, i = xs
    return jax.tree.map(jnp.add, total, part(examples, jax.random.fold_in(rng, i))), None

  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(part, jax.tree.map(lambda x: x[0], parts),
                                                      rng))
  total, _ = jax.lax.scan(add, zero, (parts, jnp.arange(microbatches)))
  return jax.tree.map(lambda x: x / microbatches, total)


def predict_step(trainable, frozen, images: jax.Array, *, model: nn.Module,
                 spec: adapters_lib.AdapterSpec | None) -> jax.Array:
  """Logits of the unmerged adapted model in inference mode."""
  return forward(model, spec, trainable, frozen, images)[0]


def merged_params(trainable, frozen, spec: adapters_lib.AdapterSpec | None):
  """Full params with the adapters folded in: the plain ViT then runs at the base model's cost."""
  params = optim.join(trainable["params"], frozen)
  if spec is None:
    return params
  return adapters_lib.merge(params, trainable["adapters"], spec)


SCHEDULES = ("cosine", "timm_cosine")


def _timm_cosine(config) -> optax.Schedule:
  """timm's CosineLRScheduler (t in epochs, warm-up not a prefix) stepped after each epoch as
  the official Hydra VTAB-1k loop steps it, so epoch e trains at t = max(e - 1, 0): a linear
  warm-up from ``warmup_init_lr`` over ``warmup_epochs``, then
  ``min_lr + (lr - min_lr) (1 + cos(pi t / cosine_epochs)) / 2``."""
  period, warmup = config.cosine_epochs, max(config.warmup_epochs, 1e-9)
  if not period or period < config.num_epochs:
    raise ValueError(f"optim.cosine_epochs must be >= num_epochs ({config.num_epochs}) for the "
                     f"timm_cosine schedule (one cycle); got {period!r}")

  def schedule(step):
    t = jnp.maximum(step // config.steps_per_epoch - 1, 0).astype(jnp.float32)
    warm = config.warmup_init_lr + t * (config.lr - config.warmup_init_lr) / warmup
    cosine = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + jnp.cos(jnp.pi * t / period))
    return jnp.where(t < config.warmup_epochs, warm, cosine)

  return schedule


def make_schedule(config) -> optax.Schedule:
  """``config.schedule``: "cosine" (per step: linear warm-up from ``warmup_init_lr``, cosine to
  ``min_lr`` at the last step) or "timm_cosine" (see ``_timm_cosine``)."""
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_init_lr, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=config.min_lr)
  if config.schedule == "timm_cosine":
    return _timm_cosine(config)
  raise ValueError(f"unknown optim.schedule {config.schedule!r}; expected one of {SCHEDULES}")


def _check_optim(config) -> None:
  """Refuses values AdamW and the schedule would take silently (a negative clip flips every
  gradient, a negative lr ascends); errors name the ``optim`` field."""
  def bad(name: str, want: str):
    raise ValueError(f"optim.{name} must be {want}; got {getattr(config, name)!r}")
  if not config.lr > 0:
    bad("lr", "> 0")
  for name in ("weight_decay", "grad_clip", "warmup_init_lr"):
    if not getattr(config, name) >= 0:
      bad(name, ">= 0")
  for name in ("b1", "b2"):
    if not 0 <= getattr(config, name) < 1:
      bad(name, "in [0, 1)")
  if not 0 <= config.min_lr <= config.lr:
    bad("min_lr", f"in [0, lr={config.lr}]")
  if getattr(config, "cosine_epochs", None) is not None and config.schedule != "timm_cosine":
    bad("cosine_epochs", f"None unless optim.schedule is 'timm_cosine' (it is {config.schedule!r})")
  warmup, epochs = getattr(config, "warmup_epochs", 0), getattr(config, "num_epochs", None)
  if not warmup >= 0:
    bad("warmup_epochs", ">= 0")
  if epochs and warmup >= epochs:
    logging.warning("optim.warmup_epochs=%s covers all %s epochs: the learning rate rises the "
                    "whole run and never decays", warmup, epochs)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on ``make_schedule(config)``, optional global-norm clipping.

  Raises:
    ValueError: a field out of range (named).
  """
  _check_optim(config)
  schedule = make_schedule(config)
  tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  if config.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx, schedule


def evaluate(logits_fn: Callable[[Batch], jax.Array], batches: Iterator[Batch]) -> float:
  """Accuracy over padded batches ({"image", "label", "mask"}); padding rows do not count."""
  correct = total = 0
  for batch in batches:
    hits = (jnp.argmax(logits_fn(batch), -1) == batch["label"]) & batch["mask"]
    correct += int(jnp.sum(hits))
    total += int(jnp.sum(batch["mask"]))
  if total == 0:
    raise ValueError("evaluation saw no examples")
  return correct / total


def first_nonfinite(history: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
  """(step, metric, value) of the first NaN or inf loss, gradient norm or update norm among
  fetched (step, metrics) pairs; None when all are finite (the state after them is too)."""
  for step, metrics in history:
    for key in ("loss", "grad_norm", "update_norm"):
      if key in metrics and not np.isfinite(metrics[key]):
        return step, key, float(metrics[key])
  return None
