"""End-to-end training: one run, resume after SIGKILL, multi-device, pmap, 2 processes, NaN."""

import functools
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ports import free_port
from tensorboardX.proto import event_pb2

from configs import default
from hydra_jax import (
    adapters,
    build,
    checkpointing,
    checkpoints,
    data,
    export,
    loop,
    metrics,
    optim,
    parallel,
    train_lib,
)
from hydra_jax.build import build_model
from hydra_jax.loop import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _testing_config(**overrides):
  c = default.get_testing_config()
  c.update_from_flattened_dict(overrides)
  return c


def _adapters_of(workdir):
  trainable, _ = export.load_adapters(pathlib.Path(workdir) / "export" / "adapters.safetensors")
  return trainable


def _assert_trees_equal(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted end-to-end run of the testing config."""
  workdir = tmp_path_factory.mktemp("reference")
  results = train_and_evaluate(_testing_config(), str(workdir))
  return workdir, results


def test_end_to_end_run(reference_run):
  workdir, results = reference_run
  assert results["steps"] == 8  # 64 images / batch 16 x 2 epochs
  assert results["merge_rel_error"] < 1e-5
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert (results["val_images"], results["test_images"]) == (32, 64)  # what was scored
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("val_accuracy" in x for x in lines)
  assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
  report = (workdir / "trainable.txt").read_text()
  assert "adapters/.*" in report and "params/head/.*" in report
  assert (workdir / "export" / "merged.safetensors").exists()
  assert json.loads((workdir / "results.json").read_text())["steps"] == 8
  trained = _adapters_of(workdir)
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(trained["adapters"]))


@pytest.mark.parametrize("field,value", [("data.augment.flip", True),
                                         ("data.augment.mixup", 0.8)])
def test_augmentation_reaches_the_run(reference_run, tmp_path, field, value):
  """The same run with flips, or mixup, ends elsewhere (what the step saw changed)."""
  train_and_evaluate(_testing_config(**{field: value}), str(tmp_path))
  flipped, plain = _adapters_of(tmp_path), _adapters_of(reference_run[0])
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(flipped),
                                                      jax.tree.leaves(plain), strict=True))


@pytest.mark.parametrize("fields,pairs", [
    ({"batch_size": 7, "parallel.num_devices": 1}, r"a batch of 7 \(batch_size 7\)"),
    ({"batch_size": 6, "microbatches": 3, "parallel.num_devices": 2},  # parallel.per_device
     r"a batch of 3 \(batch_size 6 on each of 2 devices\)"),
    ({"batch_size": 6, "parallel.mode": "pmap", "parallel.num_devices": 2},
     r"a batch of 3 \(batch_size 6 on each of 2 devices\)")])
def test_mixing_an_odd_batch_is_refused(tmp_path, fields, pairs):
  """Each device mixes its share: an odd one would leave an example unmixed."""
  with pytest.raises(ValueError, match=f"mixup / cutmix pair neighbouring examples of {pairs}: "
                                       "expected an even number"):
    train_and_evaluate(_testing_config(**{"data.augment.cutmix": 1.0, **fields}), str(tmp_path))


_KILL_CHILD = """
import os, signal, sys
from hydra_jax import checkpointing
original = checkpointing.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
  original(self, step, *args, **kwargs)
  if step == 3:  # mid-epoch (4 steps each): the resume must find the data's position in it
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)
checkpointing.Checkpointer.save = save_then_die
sys.argv = ["train.py"] + sys.argv[1:]
from absl import app
import train
app.run(train.main)
"""


def _train_cmd(workdir, *flags):
  return ["--config", str(ROOT / "configs" / "testing.py"), "--workdir", str(workdir), *flags]


def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path):
  flags = ("--config.checkpoint_every=3", "--config.async_checkpoints=True")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  killed = subprocess.run([sys.executable, "-c", _KILL_CHILD, *_train_cmd(tmp_path, *flags)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (tmp_path / "results.json").exists()
  resumed = subprocess.run([sys.executable, "train.py", *_train_cmd(tmp_path, *flags)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 3" in resumed.stderr
  _assert_trees_equal(_adapters_of(tmp_path), _adapters_of(reference_run[0]))
  loss_steps = [x["step"] for x in map(json.loads, (
      tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
  assert loss_steps == [2, 3, 4, 6, 8]  # each line once: every log_every=2 steps and each save
  first = json.loads((tmp_path / "results.json").read_text())
  again = train_and_evaluate(_testing_config(checkpoint_every=3), str(tmp_path))  # finished
  assert again["steps"] == 8 and again["test_accuracy"] == first["test_accuracy"]
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines if metrics.RESULTS_KEY in x] == [8]  # one results line


def test_a_run_starts_from_given_adapters(reference_run, tmp_path):
  """init_adapters: an export's adapters and head (or a PEFT LoRA directory) are step 0's; at a
  negligible learning rate the run ends where they started and scores the same."""
  workdir, ref = reference_run
  given = workdir / "export" / "adapters.safetensors"
  tiny_lr = {"optim.lr": 1e-12, "init_adapters": str(given), "num_epochs": 1}
  results = train_and_evaluate(_testing_config(**tiny_lr), str(tmp_path / "hydra"))
  _assert_trees_equal(_adapters_of(tmp_path / "hydra"), _adapters_of(workdir), rtol=1e-5,
                      atol=1e-7)
  assert results["test_accuracy"] == ref["test_accuracy"]
  # a PEFT LoRA adapter (made here as if trained), with the head it saves
  config = _testing_config()
  _, base = build_model(config, build.model_rng(config))  # the run's base
  lora = adapters.AdapterSpec("lora")
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32) * 0.1, {
      "adapters": adapters.init(lora, base.params, jax.random.key(1)),
      "params": {"head": base.params["head"]}})
  checkpoints.save_peft(tmp_path / "peft", trainable, lora, base)
  train_and_evaluate(_testing_config(**{**tiny_lr, "init_adapters": str(tmp_path / "peft")}),
                     str(tmp_path / "lora"))
  _assert_trees_equal(_adapters_of(tmp_path / "lora"), trainable, rtol=1e-5, atol=1e-7)
  with pytest.raises(FileNotFoundError, match="init_adapters: no adapters at"):
    train_and_evaluate(_testing_config(init_adapters=str(tmp_path / "none")), str(tmp_path / "x"))
  (tmp_path / "notes.txt").write_text("not tensors")
  with pytest.raises(ValueError, match="init_adapters: .*notes.txt is not a hydra_jax adapters "
                                       "export \\(not a safetensors file"):
    train_and_evaluate(_testing_config(init_adapters=str(tmp_path / "notes.txt")),
                       str(tmp_path / "x"))


def test_a_resume_does_not_need_the_init_adapters_file(reference_run, tmp_path, caplog):
  """The checkpoint's state replaces the start; its recorded spec stands in for the file's."""
  given = tmp_path / "given.safetensors"
  shutil.copy(reference_run[0] / "export" / "adapters.safetensors", given)
  first = train_and_evaluate(_testing_config(init_adapters=str(given), num_epochs=1),
                             str(tmp_path / "run"))
  given.unlink()
  longer = train_and_evaluate(_testing_config(init_adapters=str(given)), str(tmp_path / "run"))
  assert (first["steps"], longer["steps"]) == (4, 8)
  assert "init_adapters" in caplog.text and "is gone; resuming with the adapter spec" in caplog.text
  with pytest.raises(FileNotFoundError, match="init_adapters: no adapters at"):  # nothing to resume
    train_and_evaluate(_testing_config(init_adapters=str(given)), str(tmp_path / "other"))


def test_a_metrics_line_averages_the_steps_since_the_last(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  progress = metrics.Progress(total=3, initial=0, batch_size=4, enabled=False)
  pending = [(s, {"loss": jnp.float32(s), "accuracy": jnp.float32(s / 8),
                  "lr": jnp.float32(s / 100)}) for s in (1, 2, 3)]
  loop._flush(pending, progress, writer, ckpt=None)
  writer.close()
  (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert (line["step"], line["loss"], line["accuracy"]) == (3, 2.0, 0.25)
  assert line["lr"] == pytest.approx(0.03)  # the schedule at the line's step


def _tb_events(path):
  """The events of a TensorBoard event file (TFRecord frames: length, crc, data, crc)."""
  raw, events, at = path.read_bytes(), [], 0
  while at < len(raw):
    (size,) = struct.unpack("<Q", raw[at:at + 8])
    events.append(event_pb2.Event.FromString(raw[at + 12:at + 12 + size]))
    at += 12 + size + 4
  return events


def test_metrics_of_a_resumed_run_hold_each_step_once(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # torn by the kill
  writer = metrics.MetricWriter(tmp_path, resume_step=3)  # the last checkpoint was step 3
  for step in range(4, 7):
    writer.write(step, {"loss": 10.0 + step})
  writer.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
  assert lines[3]["loss"] == 14.0
  # TensorBoard drops the first run's steps 4 and 5 on reading: the resumed writer's file starts
  # with a session START at step 4 (purge_step)
  events = [_tb_events(f) for f in sorted((tmp_path / "tensorboard").glob("events.*"))]
  assert [(e.step, e.session_log.status) for e in events[1] if e.HasField("session_log")] == [
      (4, event_pb2.SessionLog.START)]
  assert not any(e.HasField("session_log") for e in events[0])
  writer = metrics.MetricWriter(tmp_path, resume_step=6)
  writer.write(6, {metrics.RESULTS_KEY: 6, "test_accuracy": 0.5})  # the run's final line
  writer.close()
  writer = metrics.MetricWriter(tmp_path, resume_step=6, finished=True)  # run again
  writer.write(6, {metrics.RESULTS_KEY: 6, "test_accuracy": 0.5})
  writer.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 6]
  assert [metrics.RESULTS_KEY in x for x in lines].count(True) == 1
  writer = metrics.MetricWriter(tmp_path, resume_step=6)  # given more epochs: step 6's stays
  writer.write(7, {"loss": 1.0})
  writer.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines if metrics.RESULTS_KEY in x] == [6]


def test_a_checkpoint_head_of_the_run_classes_is_kept_unless_reset(reference_run):
  merged = str(reference_run[0] / "export" / "merged.safetensors")  # its trained 10-class head
  trained = checkpoints.load(merged).params["head"]["kernel"]
  for reset in (False, True):
    config = _testing_config(**{"model.checkpoint": merged, "model.reset_head": reset})
    _, pre = build_model(config, build.model_rng(config))
    want = np.zeros_like(trained) if reset else trained
    np.testing.assert_array_equal(pre.params["head"]["kernel"], want)


def test_a_random_backbone_resumes_under_any_spelling(reference_run, tmp_path):
  """The reference run's model.checkpoint is None; "random" names the same backbone."""
  shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
  again = train_and_evaluate(_testing_config(**{"model.checkpoint": "random"}), str(tmp_path))
  assert again["test_accuracy"] == reference_run[1]["test_accuracy"]


@pytest.mark.parametrize("field,value,match", [
    ("seed", 1, "seed=1 but the checkpoint at step 8"),
    ("batch_size", 8, "batch_size=8 but the checkpoint at step 8"),
    ("adapter.rank_parallel", 4, "adapter=.*'rank_parallel': 4.* but the checkpoint at step 8 in"),
    ("data.train_split", "train[:48]", "data.train_split='train\\[:48\\]' but the checkpoint"),
    ("model.image_size", 32, "model.image_size=32 but the checkpoint at step 8"),
    ("model.drop_path", 0.1, "model.drop_path=0.1 but the checkpoint at step 8"),
    ("data.augment.flip", True, "data.augment=.*'flip': True.* but the checkpoint at step 8"),
    ("data.augment.cutmix", 1.0, "data.augment=.*'cutmix': 1.0.* but the checkpoint at step 8"),
    ("label_smoothing", 0.1, "label_smoothing=0.1 but the checkpoint at step 8"),
    ("model.head_init", "torch", "model.head_init='torch' but the checkpoint at step 8"),
    ("optim.lr", 0.5, "optim=.*'lr': 0.5.* but the checkpoint at step 8"),
    ("num_epochs", 1, "step 8 .* is past this run's 4 steps \\(num_epochs=1\\); give "
                      "num_epochs >= 2"),
])
def test_resuming_another_run_is_refused_naming_the_field(reference_run, tmp_path, field, value,
                                                          match):
  """A resume continues the same run: other data, model, adapters or schedule are refused
  before any step (the workdir keeps its checkpoints)."""
  shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(_testing_config(**{field: value}), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_with_other_labels_is_refused(reference_run, tmp_path):
  """Fashion-MNIST has one label feature: the checkpoint says it trained on another."""
  shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
  meta_file = tmp_path / "checkpoints" / "8" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta["data.label_key"] == "label"
  meta_file.write_text(json.dumps({**meta, "data.label_key": "label_y_position"}))
  with pytest.raises(ValueError, match="data.label_key='label' but the checkpoint at step 8 .* "
                                       "was trained with data.label_key='label_y_position'"):
    train_and_evaluate(_testing_config(), str(tmp_path))


def test_an_older_checkpoint_that_does_not_fit_says_so(reference_run, tmp_path, caplog):
  """A checkpoint without ``optim`` in its meta (an earlier version's) and another optimizer
  state: orbax's error, said in the run's terms."""
  shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
  meta_file = tmp_path / "checkpoints" / "8" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["optim"]
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="does not fit this run's trainable params or optimizer"):
    train_and_evaluate(_testing_config(**{"optim.grad_clip": 1.0}), str(tmp_path))
  assert "does not record optim" in caplog.text


def _step_setup(adapter=None, microbatches=1):
  """The pieces of a train step for the testing config (or ``adapter``), on random data."""
  config = _testing_config()
  if adapter is not None:
    config.adapter = adapter
  model, pre = build_model(config, jax.random.key(0))
  spec = adapters.spec_from_config(config.adapter)
  trainable_params, frozen = optim.split(pre.params, list(config.train_patterns))
  ad = adapters.init(spec, pre.params, jax.random.key(1))
  # random B: gradients reach every factor (a constant B passes A none: the LayerNorm after
  # the residual add makes the stream's gradient sum to zero over the features)
  keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(ad))))
  ad = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(next(keys), x.shape), ad)
  trainable = {"adapters": ad, "params": trainable_params}
  config.optim.total_steps, config.optim.warmup_steps = 10, 2
  tx, schedule = train_lib.make_optimizer(config.optim)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 10, size=(16,)).astype(np.int32)} for _ in range(3)]
  step = functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                           schedule=schedule, microbatches=microbatches)
  return state, frozen, batches, step


def test_label_smoothing_spreads_the_targets():
  state, frozen, batches, step = _step_setup()
  rng = np.random.default_rng(5)
  trainable = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=np.shape(x)).astype(np.float32),
                           state.trainable)  # a non-zero head: logits that differ per class
  batch = jax.tree.map(jnp.asarray, batches[0])
  loss, logits = train_lib.loss_fn(trainable, frozen, batch, jax.random.key(0),
                                   model=step.keywords["model"], spec=step.keywords["spec"],
                                   label_smoothing=0.2)
  logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
  nll = -logp[np.arange(len(logp)), np.asarray(batch["label"])]
  want = np.mean(0.8 * nll + 0.2 * -logp.mean(-1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert abs(want - nll.mean()) > 1e-3  # smoothing changed the loss


def _run_jit(num_devices, *, fsdp=False, adapter=None, microbatches=1):
  state, frozen, batches, step = _step_setup(adapter, microbatches)
  mesh = parallel.make_mesh(num_devices)
  shardings = parallel.frozen_shardings(mesh, frozen, fsdp=fsdp, min_size=1024)
  if fsdp:  # the testing model's kernels really are split
    assert any(s.spec != parallel.PartitionSpec() for s in jax.tree.leaves(shardings))
  frozen = jax.device_put(frozen, shardings)
  state = jax.device_put(state, parallel.replicated(mesh))
  fn = jax.jit(step, donate_argnums=0)
  for b in batches:
    state, _ = fn(state, frozen, parallel.global_batch(b, mesh), jax.random.key(2))
  return jax.device_get(state.trainable)


def test_eight_device_step_equals_single_device():
  assert jax.device_count() == 8
  single = _run_jit(1)
  _assert_trees_equal(_run_jit(8), single, rtol=2e-5, atol=1e-6)
  _assert_trees_equal(_run_jit(8, fsdp=True), single, rtol=2e-5, atol=1e-6)


def _run_pmap(adapter=None, microbatches=1):
  """(trainable of device 0, the pmapped state, mesh) after the steps of ``_step_setup``."""
  state, frozen, batches, step = _step_setup(adapter, microbatches)
  fn = jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch",
                in_axes=(0, 0, 0, None))
  mesh = parallel.make_mesh()
  state = parallel.replicate_for_pmap(state, mesh)
  frozen = parallel.replicate_for_pmap(frozen, mesh)
  for b in batches:
    sharded = {k: v.reshape(8, -1, *v.shape[1:]) for k, v in b.items()}
    state, _ = fn(state, frozen, sharded, jax.random.key(2))
  return jax.tree.map(lambda x: np.asarray(x[0]), state.trainable), state, mesh


def test_pmap_step_equals_jit_step():
  pmapped, state, mesh = _run_pmap()
  _assert_trees_equal(pmapped, _run_jit(1), rtol=2e-5, atol=1e-6)
  one = parallel.unreplicate_from_pmap(state.trainable, mesh)  # on device, one copy per device
  for leaf, ref in zip(jax.tree.leaves(one), jax.tree.leaves(pmapped), strict=True):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
    assert {s.device for s in leaf.addressable_shards} == set(mesh.devices.flat)
    np.testing.assert_array_equal(np.asarray(leaf), ref)


def test_pmap_balance_loss_is_the_global_batchs():
  """HydraLoRA's balancing loss under pmap: statistics over the whole batch, as under jit."""
  adapter = default.adapter_config("hydralora", balance_weight=0.5)
  pmapped, _, _ = _run_pmap(adapter)
  _assert_trees_equal(pmapped, _run_jit(1, adapter=adapter), rtol=2e-5, atol=1e-6)


def _gradients(adapter, microbatches):
  """Gradients and metrics of the testing model's loss on a batch of 16, with a random head (a
  zero head passes no gradient to the adapters)."""
  state, frozen, batches, step = _step_setup(adapter)
  trainable = state.trainable
  head = trainable["params"]["head"]["kernel"]
  trainable["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(3), head.shape) / 4
  loss = functools.partial(train_lib.loss_fn, model=step.keywords["model"],
                           spec=step.keywords["spec"])
  return jax.jit(train_lib._accumulated, static_argnums=(0, 5))(
      loss, trainable, frozen, batches[0], jax.random.key(2), microbatches)


@pytest.mark.parametrize("adapter", [None, default.adapter_config("hydralora")],
                         ids=["hydra-merged", "hydralora-activations"])
def test_microbatches_give_the_whole_batchs_gradient(adapter):
  """4 parts of 4 examples: the mean of their gradients, loss and accuracy is the batch's."""
  whole, whole_metrics = _gradients(adapter, 1)
  parted, parted_metrics = _gradients(adapter, 4)
  _assert_trees_equal(parted_metrics, whole_metrics, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(parted), jax.tree.leaves(whole), strict=True):
    scale = np.abs(y).max()
    assert scale > 1e-4  # every leaf has a gradient: the comparison can fail
    np.testing.assert_allclose(x, y, atol=1e-5 * scale)


def test_microbatches_over_a_mesh_and_under_pmap():
  """Each device holds its share of every part (parts are strided over the batch): 8 devices
  with 2 parts each, jit (also FSDP) and pmap, train as one device does on whole batches."""
  single = _run_jit(1)
  _assert_trees_equal(_run_jit(8, microbatches=2), single, rtol=2e-5, atol=1e-6)
  _assert_trees_equal(_run_jit(8, fsdp=True, microbatches=2), single, rtol=2e-5, atol=1e-6)
  _assert_trees_equal(_run_pmap(microbatches=2)[0], single, rtol=2e-5, atol=1e-6)


def test_microbatched_step_moves_no_images_between_devices():
  """The parts' reshape keeps the batch's sharding: the compiled 8-device step gathers and
  exchanges no more than the whole-batch step does (only the gradients' reductions differ)."""
  def collectives(microbatches):
    state, frozen, batches, step = _step_setup(microbatches=microbatches)
    mesh = parallel.make_mesh(8)
    batch = parallel.global_batch(batches[0], mesh)
    text = jax.jit(step).lower(state, frozen, batch, jax.random.key(2)).compile().as_text()
    return {op: text.count(f" {op}(") for op in ("all-gather", "all-to-all",
                                                 "collective-permute")}
  assert collectives(2) == collectives(1)


def _loop_bodies_with_all_reduce(hlo: str) -> list[str]:
  """The while-loop bodies (the microbatch scan) of compiled HLO that all-reduce."""
  computations = {c.split(" ", 1)[0]: c for c in re.split(r"\n(?=\S)", hlo)}
  return [body for body in set(re.findall(r"body=(%[\w.\-]+)", hlo))
          if re.search(r" all-reduce(-start)?\(", computations.get(body, ""))]


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_microbatched_runner_reduces_the_gradients_once_per_step(fsdp):
  """The run's jit step accumulates on each device's rows (shard_map) and all-reduces after the
  scan; with FSDP it stays with GSPMD, which reduces inside it (once per part: documented)."""
  state, frozen, batches, step = _step_setup()
  config = _testing_config(microbatches=2, **{"parallel.fsdp": fsdp})
  runner = loop._Runner(config, *(step.keywords[k] for k in ("model", "spec", "tx", "schedule")),
                        frozen, state)
  batch = parallel.global_batch(batches[0], runner.mesh)
  hlo = runner.step.lower(runner.state, runner.frozen, batch, jax.random.key(2)).compile()
  hlo = hlo.as_text()
  assert " all-reduce" in hlo
  assert bool(_loop_bodies_with_all_reduce(hlo)) == fsdp


def test_microbatches_keep_one_parts_activations():
  """XLA's temporaries of the compiled step (a batch of 64) shrink with the parts: the scan
  keeps one part's activations alive, not all of them."""
  def temp_bytes(microbatches):
    state, frozen, batches, step = _step_setup(microbatches=microbatches)
    batch = {k: np.concatenate([v] * 4) for k, v in batches[0].items()}
    compiled = jax.jit(step).lower(state, frozen, batch, jax.random.key(2)).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes(4) < temp_bytes(1) / 2


def test_a_batch_that_does_not_split_into_microbatches_is_refused():
  state, frozen, batches, step = _step_setup(microbatches=3)
  with pytest.raises(ValueError, match="a batch of 16 examples does not split into "
                                       "microbatches=3 equal parts; expected a multiple of 3"):
    step(state, frozen, batches[0], jax.random.key(2))


@pytest.mark.parametrize("overrides", [{"parallel.mode": "pmap"}, {"microbatches": 2}],
                         ids=["pmap", "microbatches"])
def test_a_run_another_way_ends_with_the_reference_params(reference_run, tmp_path, overrides):
  results = train_and_evaluate(_testing_config(**overrides), str(tmp_path))
  assert results["steps"] == 8
  _assert_trees_equal(_adapters_of(tmp_path), _adapters_of(reference_run[0]),
                      rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["jit", "pmap", "fsdp", "microbatches"])
def test_two_process_run_equals_one_process(reference_run, tmp_path, mode):
  """fsdp: the frozen kernels split over both hosts' devices (the merged export gathers them);
  microbatches: each device accumulates its rows (shard_map over both hosts' devices)."""
  port = free_port()
  flags = {"jit": [], "pmap": ["--config.parallel.mode=pmap"],
           "fsdp": ["--config.parallel.fsdp=True", "--config.parallel.fsdp_min_size=1024"],
           "microbatches": ["--config.microbatches=2"]}[mode]
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [sys.executable, "train.py", *_train_cmd(
          tmp_path, f"--config.parallel.distributed.coordinator=127.0.0.1:{port}",
          "--config.parallel.distributed.num_processes=2",
          f"--config.parallel.distributed.process_id={i}", *flags)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  _assert_trees_equal(_adapters_of(tmp_path), _adapters_of(reference_run[0]),
                      rtol=1e-4, atol=1e-6)
  merged = checkpoints.load(tmp_path / "export" / "merged.safetensors").params
  _assert_trees_equal(merged, checkpoints.load(
      reference_run[0] / "export" / "merged.safetensors").params, rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real = data.train_batches

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step + 1):
      if step == 2:  # float images are taken as normalised: NaNs reach the loss
        batch = {**batch, "image": np.full(batch["image"].shape, np.nan, np.float32)}
      yield batch

  monkeypatch.setattr(data, "train_batches", poisoned)
  # checkpoints every step, metrics fetched every 5: the NaN of step 2 must stop step 2's save
  config = _testing_config(**{"checkpoint_every": 1, "log_every": 5})
  with pytest.raises(FloatingPointError, match="at step 2; the last good checkpoint \\(step 1\\)"):
    train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1]


def test_final_merge_check_catches_a_wrong_merge(tmp_path, monkeypatch):
  real = train_lib.merged_params

  def off_by_one(trainable, frozen, spec):
    params = real(trainable, frozen, spec)
    return {**params, "head": {**params["head"], "bias": params["head"]["bias"] + 1.0}}

  monkeypatch.setattr(train_lib, "merged_params", off_by_one)
  with pytest.raises(RuntimeError, match="differs from the factored one"):
    train_and_evaluate(_testing_config(), str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("eval_every_epochs", 0, "eval_every_epochs must be an integer >= 1; got 0"),
    ("log_every", 0, "log_every must be an integer >= 1"),
    ("checkpoint_every", -1, "checkpoint_every must be an integer >= 0"),
    ("parallel.mode", "pmapp", "unknown parallel.mode 'pmapp'"),
    ("batch_size", 0, "batch_size must be an integer >= 1; got 0"),
    ("microbatches", 0, "microbatches must be an integer >= 1; got 0"),
    ("microbatches", 32, "batch_size 16 does not split into microbatches=32 equal parts on "
                         "each of the 8 devices of the mesh; expected a multiple of 256"),
    ("data.eval_batch_size", 0, "data.eval_batch_size must be an integer >= 1"),
    ("keep_checkpoints", -1, "keep_checkpoints must be an integer >= 1; got -1"),
    ("model.image_size", 15, "model.image_size 15 is not a positive multiple of the patch size 4"),
    ("model.image_size", 0, "model.image_size 0 is not a positive multiple of the patch size 4"),
    ("data.test_limit", -1, "data.test_limit must be None or 0 \\(all\\) or an integer >= 1; "
                            "got -1"),
    ("optim.lr", -1e-3, "optim.lr must be > 0; got -0.001"),
    ("optim.grad_clip", -1.0, "optim.grad_clip must be >= 0"),
    ("optim.b2", 1.5, "optim.b2 must be in \\[0, 1\\)"),
    ("optim.min_lr", 0.1, "optim.min_lr must be in \\[0, lr=0.001\\]"),
    ("optim.cosine_epochs", 10, "optim.cosine_epochs must be None unless optim.schedule is"),
    ("optim.warmup_epochs", -1, "optim.warmup_epochs must be >= 0; got -1"),
    ("seed", -1, "seed must be an integer >= 0; got -1"),
    ("label_smoothing", 1.0, "label_smoothing must be a number in \\[0, 1\\); got 1.0"),
    ("data.num_classes", 3, "data.num_classes=3 but split 'train\\[:64\\]' of "
                            "'fashion_mnist_offline' has 10 classes"),
    ("parallel.distributed.num_processes", 2, "need distributed.coordinator"),
])
def test_bad_schedule_fields_are_named(tmp_path, field, value, match):
  """Refused before any training step (nothing is written but the logs; no empty
  checkpoints/ directory either)."""
  config = _testing_config(**{field: value})
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_fsdp_under_pmap_is_refused(tmp_path):
  config = _testing_config(**{"parallel.fsdp": True, "parallel.mode": "pmap"})
  with pytest.raises(ValueError, match="parallel.fsdp=True shards the frozen weights over a jit"):
    train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
@pytest.mark.parametrize("field,value", [("batch_size", 18), ("data.eval_batch_size", 30)])
def test_batches_that_do_not_split_over_the_devices_are_refused_before_training(
    tmp_path, mode, field, value):
  config = _testing_config(**{field: value, "parallel.num_devices": 4, "parallel.mode": mode})
  with pytest.raises(ValueError, match=rf"{field} {value} does not split evenly over the 4 "
                                       "devices of the mesh; expected a multiple of 4"):
    train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()  # it used to train a whole epoch first


def test_every_config_field_can_be_overridden():
  """A field set to a bare None has type NoneType, which ml_collections refuses to override."""
  import importlib

  import ml_collections

  from hydra_jax import data

  def untyped(c, prefix=""):
    for key in c.keys():
      if isinstance(c[key], ml_collections.ConfigDict):
        yield from untyped(c[key], f"{prefix}{key}.")
      elif c.get_type(key) is type(None):
        yield prefix + key

  configs = {name: importlib.import_module(f"configs.{name}").get_config() for name in (
      "default", "lora", "sequential", "hydralora", "linear_probe", "full_finetune")}
  configs["testing"] = default.get_testing_config()
  vtab1k = importlib.import_module("configs.vtab1k")
  configs.update({f"vtab1k:{task}": vtab1k.get_config(task) for task in data.VTAB1K})
  assert {name: list(untyped(c)) for name, c in configs.items()} == {n: [] for n in configs}
  for c in configs.values():  # a fraction of an epoch (an int field refuses a float)
    c.optim.warmup_epochs = 0.5


def test_images_per_second_count_training_time_only(monkeypatch):
  """The loop restarts the clock after an evaluation or save: the next line's img/s is the
  steps' own (was the evaluation's time too: 10 img/s between 2,500 and 4,000)."""
  clock = iter([0.0, 1.0, 101.0, 102.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(total=4, initial=0, batch_size=2, enabled=False)
  line = {"loss": 1.0, "accuracy": 0.5, "lr": 1e-3}
  assert progress.update(1, line) == 2.0  # 1 step of 2 images in 1 s
  progress.restart_clock(1)  # 100 s of evaluation
  assert progress.update(2, line) == 2.0


def test_checkpointer_keeps_and_names_the_best(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=1, use_async=False)
  for step, acc in ((1, 0.9), (2, 0.5), (3, 0.4), (4, None)):
    ckpt.save(step, {"x": np.full(3, step, np.float32)}, meta={"step": step}, val_accuracy=acc)
  ckpt.wait()
  assert (ckpt.latest_step(), ckpt.best_step()) == (4, 1)
  state = ckpt.restore(ckpt.best_step(), {"x": np.zeros(3, np.float32)})
  assert ckpt.meta(ckpt.best_step()) == {"step": 1} and float(state["x"][0]) == 1.0
  ckpt.close()


def test_multi_process_mesh_takes_every_device(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="a run of 2 processes uses all 8 devices"):
    parallel.make_mesh(4)
  assert parallel.make_mesh(8).size == 8


def test_vtab1k_model_is_the_official_codes(tmp_path):
  """configs/vtab1k.py: ImageNet mean / std inputs and no pre_logits layer, as timm runs the
  original i21k file in the official code; the head reads the class token directly."""
  from configs import vtab1k

  fields = dict(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2, posemb_grid=(2, 2),
                representation_size=32)
  vit = checkpoints.build_model(checkpoints.Pretrained({}, fields, (0.5,) * 3, (0.5,) * 3, ""),
                                num_classes=None)
  params = vit.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  model = dict(fields, class_token=True, pool="tok", layer_scale=False, gelu_approximate=True)
  checkpoints.save(tmp_path / "i21k.safetensors",
                   checkpoints.Pretrained(params, model, (0.5,) * 3, (0.5,) * 3, "test"))
  config = vtab1k.get_config("cifar100")
  config.model.checkpoint, config.model.image_size = str(tmp_path / "i21k.safetensors"), 16
  model, pre = build_model(config, jax.random.key(0))
  assert model.representation_size is None and "pre_logits" not in pre.params
  assert model.drop_path == 0.1
  assert model.pixel_mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
  head = pre.params["head"]  # drawn as nn.Linear: uniform in +-1/sqrt(32), the bias too
  assert head["kernel"].shape == (32, 100)
  for leaf in (head["kernel"], head["bias"]):
    assert 0.8 / np.sqrt(32) < np.abs(leaf).max() <= 1 / np.sqrt(32)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  cls = model.apply({"params": pre.params}, images, method="encode")[:, 0]
  np.testing.assert_allclose(model.apply({"params": pre.params}, images, method="features"), cls)


def test_head_init_draws_only_a_fresh_head():
  params = {"head": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  assert build.init_head(params, "zeros", jax.random.key(0)) is params
  drawn = build.init_head(params, "torch", jax.random.key(0))["head"]
  assert np.all(drawn["kernel"] != 0) and np.abs(drawn["kernel"]).max() <= 0.5  # 1/sqrt(4)
  trained = {"head": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  assert build.init_head(trained, "torch", jax.random.key(0)) is trained  # a checkpoint's head
  with pytest.raises(ValueError, match="unknown model.head_init 'normal'; expected one of"):
    build.init_head(params, "normal", jax.random.key(0))


@pytest.mark.parametrize("given", ["random", "None"])  # "None": what --config...=None gives
def test_a_random_backbone_is_reachable_from_the_command_line(given):
  config = _testing_config()
  config.model.checkpoint = given
  _, pre = build_model(config, jax.random.key(0))
  assert pre.source == "random Ti/16"


def test_stochastic_depth_trains_and_evaluates_the_plain_model(reference_run, tmp_path):
  """drop_path acts in the train step only: the run differs from the reference, and the final
  merged model (evaluated without it) still matches the factored one."""
  results = train_and_evaluate(_testing_config(**{"model.drop_path": 0.3}), str(tmp_path))
  assert results["merge_rel_error"] < 1e-5
  ours, ref = _adapters_of(tmp_path), _adapters_of(reference_run[0])
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref),
                                                   strict=True))


def test_a_non_finite_update_at_a_finite_loss_is_never_checkpointed(tmp_path, monkeypatch):
  """An overflowing gradient spoils the params after step 2 while step 2's loss is finite."""
  real = train_lib.make_optimizer

  def poisoned(config):
    tx, schedule = real(config)

    def update(grads, state, params=None):
      inner, count = state
      updates, inner = tx.update(grads, inner, params)
      updates = jax.tree.map(lambda u: jnp.where(count == 1, jnp.inf, u), updates)
      return updates, (inner, count + 1)

    return optax.GradientTransformation(
        lambda p: (tx.init(p), jnp.zeros((), jnp.int32)), update), schedule

  monkeypatch.setattr(train_lib, "make_optimizer", poisoned)
  config = _testing_config(**{"checkpoint_every": 1, "log_every": 5})
  with pytest.raises(FloatingPointError, match=r"update_norm is inf at step 2; the last good "
                                               r"checkpoint \(step 1\)"):
    train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1]
