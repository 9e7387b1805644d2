"""``train_and_evaluate(config, workdir)``: the run a user starts with ``train.py``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from hydra_jax import adapters as adapters_lib
from hydra_jax import augment as augment_lib
from hydra_jax import checkpointing, checkpoints, data, export, metrics, optim, parallel, train_lib
from hydra_jax.build import build_model, checkpoint_name, data_dir, model_rng, open_source

# Merged vs factored logits: float32 agrees to rounding; bfloat16 rounds the two paths apart.
_MERGE_RTOL = {"float32": 1e-4, "bfloat16": 3e-2}

_LOG = logging.getLogger(__name__)


def _make_spec(config) -> adapters_lib.AdapterSpec | None:
  if config.adapter.kind == "none":
    unset = {f.name: f.default for f in dataclasses.fields(adapters_lib.AdapterSpec)}
    if ignored := {k: v for k, v in config.adapter.items() if k != "kind" and v != unset[k]}:
      _LOG.warning("adapter.kind is 'none': adapter fields %s are ignored", ignored)
    return None
  return adapters_lib.spec_from_config(config.adapter)


def _given_adapters(config, pre, recorded: dict | None = None
                    ) -> tuple[adapters_lib.AdapterSpec | None, dict | None]:
  """(spec, trainable tree to start from) of ``config.init_adapters``; else (config's spec, None).

  A directory is a PEFT LoRA adapter (``checkpoints.load_peft``), a file a hydra_jax adapters
  export (``export.load_adapters``); the spec comes from the file, or where the file is gone
  from ``recorded`` (the spec a checkpoint to resume recorded: its state replaces the start).
  """
  path = config.get("init_adapters")
  if not path:
    return _make_spec(config), None
  path = pathlib.Path(path).expanduser()
  if not path.exists() and recorded is not None:
    _LOG.warning("init_adapters %s is gone; resuming with the adapter spec the checkpoint "
                 "recorded", path)
    return adapters_lib.spec_from_config(recorded), None
  if not path.exists():
    raise FileNotFoundError(f"init_adapters: no adapters at {path} (expected a hydra_jax "
                            "adapters.safetensors or a PEFT adapter directory)")
  try:
    if path.is_dir():
      trainable, spec = checkpoints.load_peft(path, pre)
    else:
      trainable, spec = export.load_adapters(path)
  except ValueError as e:
    raise ValueError(f"init_adapters: {e}") from None
  if spec.kind != config.adapter.kind:
    _LOG.warning("init_adapters holds %s adapters: config.adapter (%s) is not used", spec.kind,
                 config.adapter.kind)
  return spec, trainable


def _init_state(config, model, params, spec, rng, steps_per_epoch: int, given=None):
  """Splits params, initialises adapters (or takes ``given`` ones) and the optimizer; logs what
  trains."""
  trainable_params, frozen = optim.split(params, list(config.train_patterns))
  if given is not None:
    adapters = given["adapters"]
    # each layer's factors fit the model (errors name the layer)
    list(adapters_lib.transform.adapted_layers(params, adapters, spec))
    trainable_params = _with_given_params(trainable_params, given["params"])
  else:
    adapters = {} if spec is None else adapters_lib.init(spec, params, rng)
  trainable = {"adapters": adapters, "params": trainable_params}
  # One report over everything: adapter factors and the params that train by pattern.
  patterns = (["adapters/.*"] if adapters else []) + [f"params/{p}" for p in config.train_patterns]
  report = optim.report({"adapters": adapters, "params": params}, patterns)
  _LOG.info("what trains:\n%s", report)
  opt = ml_collections.ConfigDict(config.optim.to_dict())
  opt.total_steps = config.num_epochs * steps_per_epoch
  opt.warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)
  opt.steps_per_epoch, opt.num_epochs = steps_per_epoch, config.num_epochs
  tx, schedule = train_lib.make_optimizer(opt)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  return state, frozen, tx, schedule, report


def _with_given_params(trainable_params, given):
  """The run's trainable params with the given ones in their place (same paths and shapes)."""
  flat = traverse_util.flatten_dict(trainable_params, sep="/")
  for path, value in traverse_util.flatten_dict(given, sep="/").items():
    if path not in flat or np.shape(flat[path]) != np.shape(value):
      raise ValueError(f"init_adapters carries params/{path} {np.shape(value)}, which is not a "
                       f"trainable param of this run of that shape "
                       f"({np.shape(flat[path]) if path in flat else 'train_patterns exclude it'})")
    flat[path] = np.asarray(value, np.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def sources(config):
  """The (train, validation, test) sources of ``config.data`` (Fashion-MNIST prepared offline on
  first use); each split's class count is checked against ``data.num_classes``."""
  cfg = config.data
  if cfg.name == "fashion_mnist_offline":
    if jax.process_index() == 0:  # one writer; the others wait for it
      data.prepare_fashion_mnist(data_dir(cfg.data_dir))
    multihost_utils.sync_global_devices("hydra_jax: data prepared")
    if jax.process_index() != 0:  # a no-op on a shared disk; a host's own disk gets its copy
      data.prepare_fashion_mnist(data_dir(cfg.data_dir))
  splits = (cfg.train_split, cfg.val_split, cfg.test_split)
  sources = tuple(open_source(cfg, split) for split in splits)
  for split, source in zip(splits, sources, strict=True):
    if source.num_classes != cfg.num_classes:  # before training, not at the test set after it
      raise ValueError(f"data.num_classes={cfg.num_classes} but split {split!r} of "
                       f"{cfg.name!r} has {source.num_classes} classes; set "
                       f"--config.data.num_classes={source.num_classes}")
  return sources


class _Runner:
  """Holds the compiled steps for one run (jit over a mesh, or pmap)."""

  def __init__(self, config, model, spec, tx, schedule, frozen, state):
    self.mesh = config_mesh(config)
    n = self.mesh.size
    parallel.check_divides(self.mesh, "batch_size", config.batch_size)
    parts = config.microbatches
    if config.batch_size % (n * parts):
      raise ValueError(f"batch_size {config.batch_size} does not split into microbatches={parts} "
                       f"equal parts on each of the {n} devices of the mesh; expected a multiple "
                       f"of {n * parts}")
    self.pmap = config.parallel.mode == "pmap"
    per_device = parts > 1 and n > 1 and not config.parallel.fsdp  # one all-reduce per step
    mix = augment_lib.mix_from_config(config.data.get("augment"))
    pairs = config.batch_size // n if self.pmap or per_device else config.batch_size
    if mix is not None and pairs % 2:
      raise ValueError(f"data.augment mixup / cutmix pair neighbouring examples of a batch of "
                       f"{pairs} (batch_size {config.batch_size}"
                       f"{f' on each of {n} devices' if pairs != config.batch_size else ''}): "
                       "expected an even number, or one example would mix with itself")
    step = functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                             schedule=schedule, axis_name="batch" if self.pmap else None,
                             microbatches=parts,
                             augment=augment_lib.from_config(config.data.get("augment")),
                             mix=mix, label_smoothing=config.get("label_smoothing", 0.0))
    rep = parallel.replicated(self.mesh)
    if self.pmap:
      devices = self.mesh.devices.tolist()
      self.frozen = parallel.replicate_for_pmap(frozen, self.mesh)
      self.step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, 0, None), donate_argnums=0,
                           devices=devices)
    else:
      self.frozen = jax.device_put(
          frozen, parallel.frozen_shardings(self.mesh, frozen, fsdp=config.parallel.fsdp,
                                            min_size=config.parallel.fsdp_min_size))
      if per_device:
        step = parallel.per_device(functools.partial(step, axis_name=parallel.DATA), self.mesh)
      self.step = jax.jit(step, donate_argnums=0, out_shardings=(rep, rep))
    self.state = self.place(state)
    self.predict = jax.jit(functools.partial(train_lib.predict_step, model=model, spec=spec))
    self.apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def place(self, state):
    if self.pmap:
      return parallel.replicate_for_pmap(state, self.mesh)
    return jax.device_put(state, parallel.replicated(self.mesh))

  def run_step(self, local_batch, rng):
    if self.pmap:  # pmap takes this process's devices' shares
      n = len(self.mesh.local_devices)
      batch = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in local_batch.items()}
      self.state, m = self.step(self.state, self.frozen, batch, rng)
      return jax.tree.map(lambda x: x[0], m)
    batch = parallel.global_batch(local_batch, self.mesh)
    self.state, m = self.step(self.state, self.frozen, batch, rng)
    return m

  def _unreplicate(self, tree):
    return parallel.unreplicate_from_pmap(tree, self.mesh) if self.pmap else tree

  def host_state(self):
    """The state as one copy, replicated over the mesh (pmap keeps one per device)."""
    return self._unreplicate(self.state)

  def frozen_params(self):
    return self._unreplicate(self.frozen)


def config_mesh(config):
  """The data-parallel mesh of ``config.parallel.num_devices``, which ``data.eval_batch_size``
  splits evenly over."""
  mesh = parallel.make_mesh(config.parallel.num_devices)
  parallel.check_divides(mesh, "data.eval_batch_size", config.data.eval_batch_size)
  return mesh


def _eval_batches(config, mesh, source, limit):
  """Padded, masked evaluation batches, each assembled across processes onto ``mesh``; of the
  first ``limit`` examples (None or 0: all)."""
  limit = limit or None
  return (parallel.global_batch(b, mesh)
          for b in data.eval_batches(
              source, batch_size=config.data.eval_batch_size, image_size=config.model.image_size,
              num_classes=config.data.num_classes, limit=limit,
              shard_index=jax.process_index(), shard_count=jax.process_count()))


_MODES = ("jit", "pmap")
# Recorded in each checkpoint; a resume must match them (its state, data, step and model all
# depend on them). num_epochs may grow: that extends a run. Checkpoints from before 2026-11-23
# recorded the seed only; from before 2026-11-24 not optim, pre_logits, pixel_mean or pixel_std;
# from before 2026-12-08 not head_init, reset_head (a frozen head is rebuilt) or label_key.
_RESUME_KEYS = ("seed", "batch_size", "adapter", "train_patterns", "init_adapters", "optim",
                "model.checkpoint", "model.variant", "model.overrides", "model.image_size",
                "model.pool", "model.pre_logits", "model.pixel_mean", "model.pixel_std",
                "model.drop_path", "model.head_init", "model.reset_head", "data.name",
                "data.train_split", "data.vtab_task", "data.label_key", "data.num_classes",
                "data.augment", "label_smoothing")


def _field(config, name: str):
  """``config``'s dotted field ``name`` as JSON reads it back (None where the config lacks it)."""
  value = config
  for key in name.split("."):
    value = value.get(key) if value is not None else None
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value))


def resume_meta(config) -> dict[str, Any]:
  """The config fields a checkpoint records so that a resume can check them."""
  meta = {key: _field(config, key) for key in _RESUME_KEYS}
  meta["model.checkpoint"] = checkpoint_name(config.model)  # None and "random" agree
  meta["data.augment"] = augment_lib.describe(config.data.get("augment"))  # what it draws
  return meta


def _whole(value, least: int) -> bool:
  """Whether ``value`` is an int (not a bool) of at least ``least``."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_schedule(config) -> None:
  """The loop's counters: whole numbers, the step intervals at least 1 (errors name the field)."""
  if config.parallel.mode not in _MODES:
    raise ValueError(f"unknown parallel.mode {config.parallel.mode!r}; expected one of {_MODES}")
  if config.parallel.fsdp and config.parallel.mode == "pmap":
    raise ValueError("parallel.fsdp=True shards the frozen weights over a jit mesh; pmap keeps a "
                     "whole copy per device (set parallel.mode='jit')")
  for name, least in (("seed", 0), ("batch_size", 1), ("microbatches", 1),
                      ("data.eval_batch_size", 1),
                      ("num_epochs", 1),
                      ("eval_every_epochs", 1), ("log_every", 1), ("checkpoint_every", 0),
                      ("keep_checkpoints", 1)):
    value = functools.reduce(lambda c, key: c[key], name.split("."), config)
    if not _whole(value, least):
      raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
  smoothing = config.get("label_smoothing", 0.0)
  if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not (
      0 <= smoothing < 1):
    raise ValueError(f"label_smoothing must be a number in [0, 1); got {smoothing!r}")
  for name in ("val_limit", "test_limit"):  # evaluated after training: checked before it
    value = config.data.get(name)
    if value is not None and not _whole(value, 0):
      raise ValueError(f"data.{name} must be None or 0 (all) or an integer >= 1; got {value!r}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes, checkpoints, evaluates the merged model; returns the final results."""
  _check_schedule(config)
  parallel.initialize_distributed(**config.parallel.distributed)
  workdir = pathlib.Path(workdir)
  rng = jax.random.key(config.seed)
  model, pre = build_model(config, model_rng(config))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                    use_async=config.async_checkpoints)
  latest = ckpt.latest_step()
  spec, given = _given_adapters(
      config, pre, ckpt.meta(latest).get("adapter_spec") if latest else None)
  train_src, val_src, test_src = sources(config)
  steps_per_epoch = len(train_src) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_src)} train examples")
  state, frozen, tx, schedule, report = _init_state(
      config, model, pre.params, spec, jax.random.fold_in(rng, 1), steps_per_epoch, given)
  runner = _Runner(config, model, spec, tx, schedule, frozen, state)
  start = _restore(ckpt, runner, config, steps_per_epoch)
  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start,
                                finished=start >= config.num_epochs * steps_per_epoch)
  if jax.process_index() == 0:
    (workdir / "trainable.txt").write_text(report + "\n")
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  batches = data.train_batches(
      train_src, batch_size=config.batch_size, image_size=config.model.image_size,
      seed=config.seed, start_step=start,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      num_classes=config.data.num_classes)
  validate = lambda: _evaluate_unmerged(config, runner, val_src)  # noqa: E731
  # what each checkpoint records of the run (the same at every step)
  meta = {**resume_meta(config),
          "adapter_spec": None if spec is None else dataclasses.asdict(spec)}
  _train_loop(config, runner, ckpt, writer, batches, validate, meta, start=start,
              steps_per_epoch=steps_per_epoch, rng=jax.random.fold_in(rng, 2))
  results = _final(config, runner, spec, model, pre, val_src, test_src, workdir)
  writer.write(results["steps"], results)  # the line holding "steps" (metrics.RESULTS_KEY)
  writer.close()
  return results


def _restore(ckpt: checkpointing.Checkpointer, runner: _Runner, config,
             steps_per_epoch: int) -> int:
  """Loads the latest checkpoint into ``runner``; returns its step (0 for a fresh run).

  Raises:
    ValueError: a ``_RESUME_KEYS`` field differs from the checkpoint's (the resumed run would
      not continue the same run: other data, model, adapters or schedule), the state does not
      fit, or the checkpoint is past this run's last step.
  """
  start = ckpt.latest_step() or 0
  if not start:
    return 0
  meta, want = ckpt.meta(start), resume_meta(config)
  missing = [key for key in _RESUME_KEYS if key not in meta]
  if missing:
    _LOG.warning("the checkpoint at step %d does not record %s (an earlier hydra_jax wrote "
                 "it); resuming as if they were this config's", start, ", ".join(missing))
  for key in _RESUME_KEYS:
    if key in meta and meta[key] != want[key]:
      raise ValueError(f"{key}={want[key]!r} but the checkpoint at step {start} in "
                       f"{ckpt.directory} was trained with {key}={meta[key]!r}; resume with "
                       "the same value, or start the changed run in a new workdir")
  total = config.num_epochs * steps_per_epoch
  if start > total:
    raise ValueError(f"the checkpoint at step {start} in {ckpt.directory} is past this run's "
                     f"{total} steps (num_epochs={config.num_epochs}); give num_epochs >= "
                     f"{-(-start // steps_per_epoch)} to resume it, or start in a new workdir")
  try:
    restored = ckpt.restore(start, runner.host_state())
  except ValueError as e:  # orbax's message suggests partial restores: not what is wrong here
    raise ValueError(f"the checkpoint at step {start} in {ckpt.directory} does not fit this "
                     f"run's trainable params or optimizer state (e.g. optim.grad_clip turned on "
                     f"or off); resume with the config it was written with, or start in a new "
                     f"workdir") from e
  runner.state = runner.place(restored)
  _LOG.info("resumed from step %d", start)
  return start


def _train_loop(config, runner, ckpt, writer, batches, validate, run: dict[str, Any], *,
                start: int, steps_per_epoch: int, rng: jax.Array) -> None:
  """Steps from ``start`` to the end: logs, validates and checkpoints (with ``run``, the run's
  meta) on the configured steps."""
  total = config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_epochs * steps_per_epoch
  progress = metrics.Progress(total=total, initial=start, batch_size=config.batch_size,
                              enabled=config.progress and jax.process_index() == 0)
  pending: list[tuple[int, Any]] = []
  for step in range(start + 1, total + 1):
    pending.append((step, runner.run_step(next(batches), rng)))
    evaluate = step % eval_every == 0 or step == total
    save = evaluate or bool(config.checkpoint_every and step % config.checkpoint_every == 0)
    if save or step % config.log_every == 0:  # a non-finite loss never reaches a checkpoint
      _flush(pending, progress, writer, ckpt)
      pending = []
    meta = {**run, "data_step": step}
    if evaluate:
      val = validate()
      writer.write(step, {"val_accuracy": val})
      ckpt.save(step, runner.host_state(), meta=meta, val_accuracy=val)
    elif save:
      ckpt.save(step, runner.host_state(), meta=meta)
    if save:
      progress.restart_clock(step)  # img_per_s counts training steps, not evaluations or saves
  progress.close()
  ckpt.close()


def _flush(pending, progress, writer, ckpt) -> None:
  """Fetches the pending steps' metrics; a NaN or inf loss, gradient or update stops the run
  naming its step."""
  history = [(s, jax.device_get(m)) for s, m in pending]
  bad = train_lib.first_nonfinite(history)
  if bad is not None:
    ckpt.close()
    step, what, value = bad
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}" if last
            else "no checkpoint was written before it")
    raise FloatingPointError(f"{what} is {value} at step {step}; {kept}")
  step, last = history[-1]
  # the steps since the last line, averaged (lr is the schedule's value at ``step``)
  mean = {k: float(np.mean([m[k] for _, m in history])) for k in last if k != "lr"}
  line = {**last, **mean}
  writer.write(step, {**line, "img_per_s": progress.update(step, line)})


def _evaluate_unmerged(config, runner, source) -> float:
  state, frozen = runner.host_state(), runner.frozen_params()
  return train_lib.evaluate(
      lambda b: runner.predict(state.trainable, frozen, b["image"]),
      _eval_batches(config, runner.mesh, source, config.data.val_limit))


def _check_merge(config, runner, model, spec, state, frozen, merged, images) -> float:
  """Relative error of the merged model against the activation-level (factored) adapters.

  The two paths share no code beyond the frozen ViT: the merged one runs the plain model on
  folded weights, the factored one intercepts every adapted layer and adds its branches.
  """
  params = optim.join(state.trainable["params"], frozen)
  factored = jax.jit(lambda p, a, x: adapters_lib.apply_intercepted(model, p, a, spec, x)[0])(
      params, state.trainable["adapters"], images)
  plain = runner.apply(merged, images)
  err = float(jnp.linalg.norm(plain - factored) / (jnp.linalg.norm(factored) + 1e-12))
  rtol = _MERGE_RTOL[config.model.dtype]
  if err > rtol:
    raise RuntimeError(f"the merged model differs from the factored one: relative error "
                       f"{err:.2e} > {rtol:.0e}")
  return err


def score(config, mesh, logits_fn, val_src, test_src) -> dict[str, Any]:
  """Accuracy of ``logits_fn`` (a batch -> (b, classes) logits) on the validation and test
  sources, over the first ``data.val_limit`` / ``data.test_limit`` examples of each, with the
  images scored and the seconds taken."""
  t0 = time.perf_counter()
  results: dict[str, Any] = {}
  for name, src, limit in (("val", val_src, config.data.val_limit),
                           ("test", test_src, config.data.test_limit)):
    results[f"{name}_accuracy"] = train_lib.evaluate(
        logits_fn, _eval_batches(config, mesh, src, limit))
    results[f"{name}_images"] = data.eval_size(src, limit or None)
  results["eval_seconds"] = time.perf_counter() - t0
  return results


def _final(config, runner, spec, model, pre, val_src, test_src, workdir) -> dict[str, Any]:
  """Evaluates the merged model (checking it against the unmerged one) and exports it."""
  state, frozen = runner.host_state(), runner.frozen_params()
  exact = spec is None or spec.mergeable
  merged = train_lib.merged_params(state.trainable, frozen, spec) if exact else None
  results: dict[str, Any] = {
      "steps": int(state.step),
      "trainable_params": sum(int(x.size) for x in jax.tree.leaves(state.trainable))}
  if merged is not None:
    if spec is not None:
      images = next(_eval_batches(config, runner.mesh, val_src, 8))["image"]
      results["merge_rel_error"] = _check_merge(config, runner, model, spec, state, frozen,
                                                merged, images)
    logits_fn = lambda b: runner.apply(merged, b["image"])  # noqa: E731
  else:
    logits_fn = lambda b: runner.predict(state.trainable, frozen, b["image"])  # noqa: E731
  results.update(score(config, runner.mesh, logits_fn, val_src, test_src))
  results["model"] = "merged" if merged is not None else "unmerged (input-dependent router)"
  # on every process: FSDP across hosts leaves parts of the merged params on other hosts
  merged = parallel.fetch(merged) if config.export and merged is not None else None
  if jax.process_index() == 0:
    if merged is not None:
      export.save_merged(workdir / "export" / "merged.safetensors", merged, pre)
    if config.export and spec is not None:
      export.save_adapters(workdir / "export" / "adapters.safetensors",
                           parallel.fetch(state.trainable), spec)
    checkpointing.write_json_atomic(workdir / "results.json", results)
  _LOG.info("results: %s", results)
  return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in results.items()}
