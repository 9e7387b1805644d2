"""Task sums of finished runs (hydra_jax.merge): the arithmetic, two real runs, the CLI."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from ports import free_port

from configs import default
from hydra_jax import adapters, analysis, build, checkpoints, evaluate, export, merge
from hydra_jax.loop import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCORES = ("val_accuracy", "test_accuracy", "val_images", "test_images")


def _tree(rng, classes=3):
  return {"Dense_0": {"kernel": rng.normal(size=(4, 5)).astype(np.float32),
                      "bias": rng.normal(size=(5,)).astype(np.float32)},
          "head": {"kernel": rng.normal(size=(5, classes)).astype(np.float32),
                   "bias": rng.normal(size=(classes,)).astype(np.float32)}}


def test_task_sum_adds_weighted_changes_and_chooses_the_head():
  rng = np.random.default_rng(0)
  base, p, q = _tree(rng), _tree(rng), _tree(rng)
  out = merge.task_sum(base, [(0.3, p), (-0.5, q)])
  for k in ("kernel", "bias"):
    b = base["Dense_0"][k]
    np.testing.assert_allclose(out["Dense_0"][k], b + 0.3 * (p["Dense_0"][k] - b)
                               - 0.5 * (q["Dense_0"][k] - b), rtol=1e-6)
    np.testing.assert_allclose(out["head"][k], (0.3 * p["head"][k] - 0.5 * q["head"][k]) / -0.2,
                               rtol=1e-5)
  assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, base)
  chosen = merge.task_sum(base, [(1.0, p), (2.0, q)], head=1)
  np.testing.assert_array_equal(chosen["head"]["kernel"], q["head"]["kernel"])
  assert "head" not in merge.task_sum(base, [(1.0, p)], head=None)


def test_one_item_of_weight_one_is_that_item_exactly():
  rng = np.random.default_rng(1)
  base, p = _tree(rng), _tree(rng)
  out = merge.task_sum(base, [(1.0, p)])
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(p), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("items, head, message", [
    ([(1.0, "other_classes")], "mean", "heads of one shape"),
    ([(1.0, "same"), (-1.0, "same")], "mean", "divides by the weights' sum, 0 here"),
    ([(1.0, "same")], 3, "expected 'mean', None or an item index 0..0"),
    ([(1.0, "wider")], "mean", "item 0 does not fit the base's tree"),
])
def test_task_sum_refuses(items, head, message):
  rng = np.random.default_rng(2)
  base = _tree(rng)
  made = {"same": _tree(rng), "other_classes": _tree(rng, classes=4),
          "wider": {**_tree(rng), "Dense_0": {"kernel": np.zeros((4, 6)), "bias": np.zeros(6)}}}
  if items[0][1] == "other_classes":
    items = [*items, (1.0, "same")]
  with pytest.raises(ValueError, match=message):
    merge.task_sum(base, [(w, made[name]) for w, name in items], head=head)


def _vec(*values):
  return {"Dense_0": {"kernel": np.asarray(values, np.float32)},
          "head": {"kernel": np.zeros((1, 2), np.float32)}}


def _kernel(tree):
  return tree["Dense_0"]["kernel"]


def test_ties_trims_elects_the_sign_and_averages_agreeing_values():
  base = _vec(0, 0, 0, 0)
  # density 0.5 keeps [3, 0, 0, 2] and [-2, -4, 0, 0]: signs of the sum [+, -, 0, +]
  out = merge.task_sum(base, [(1.0, _vec(3, -1, 0.5, 2)), (1.0, _vec(-2, -4, 1, 1))],
                       method="ties", density=0.5)
  np.testing.assert_array_equal(_kernel(out), [3, -4, 0, 2])
  # all kept, signs agree: the weighted mean of the changes [1, 2] and [6, 8], times scale
  out = merge.task_sum(_vec(1, 1), [(1.0, _vec(2, 3)), (0.5, _vec(7, 9))], method="ties",
                       scale=0.5)
  np.testing.assert_allclose(_kernel(out), [1 + 0.5 * (1 + 3) / 1.5, 1 + 0.5 * (2 + 4) / 1.5])
  # a weighted sign election: 1 * (-1) + 3 * 0.5 > 0 elects +, and only the + value counts
  out = merge.task_sum(_vec(0), [(1.0, _vec(-1)), (3.0, _vec(0.5))], method="ties", density=1)
  np.testing.assert_allclose(_kernel(out), [0.5])


def test_ties_global_trim_keeps_the_largest_changes_of_the_whole_task_vector():
  def tree(a, b):
    return {"Dense_0": {"kernel": np.asarray(a, np.float32)},
            "Dense_1": {"kernel": np.asarray(b, np.float32)}}
  base, item = tree([0, 0], [0, 0, 0, 0]), tree([5, -4], [1, -0.5, 0.25, 3])
  # half of 6 changes: 5, -4 and 3 (per tensor: 5 of the first, 3 and 1 of the second)
  out = merge.task_sum(base, [(1.0, item)], method="ties", density=0.5, trim="global", head=None)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], [5, -4])
  np.testing.assert_array_equal(out["Dense_1"]["kernel"], [0, 0, 0, 3])
  out = merge.task_sum(base, [(1.0, item)], method="ties", density=0.5, head=None)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], [5, 0])
  np.testing.assert_array_equal(out["Dense_1"]["kernel"], [1, 0, 0, 3])
  # each run its own cut: the second's small changes are its largest
  small = tree([0.1, 0], [0, 0, -0.2, 0])
  out = merge.task_sum(base, [(1.0, item), (1.0, small)], method="ties", density=0.5,
                       trim="global", head=None)
  np.testing.assert_allclose(out["Dense_0"]["kernel"], [(5 + 0.1) / 2, -4])
  np.testing.assert_allclose(out["Dense_1"]["kernel"], [0, 0, -0.2, 3])


def test_dare_keeps_a_density_share_rescaled_and_is_seeded():
  rng = np.random.default_rng(3)
  base, item = _vec(*rng.normal(size=10_000)), _vec(*rng.normal(size=10_000))
  tau = _kernel(item) - _kernel(base)
  out = merge.task_sum(base, [(2.0, item)], method="dare", density=0.25, seed=1)
  change = _kernel(out) - _kernel(base)
  kept = np.abs(change) > 1e-6
  assert 0.23 < kept.mean() < 0.27
  np.testing.assert_allclose(change[kept], 2.0 * tau[kept] / 0.25, rtol=1e-4)
  again = merge.task_sum(base, [(2.0, item)], method="dare", density=0.25, seed=1)
  np.testing.assert_array_equal(_kernel(again), _kernel(out))
  other = merge.task_sum(base, [(2.0, item)], method="dare", density=0.25, seed=2)
  assert not np.array_equal(_kernel(other), _kernel(out))
  # one item: its own sign, and the weighted mean of one change is that change (the weight
  # cancels); its mask is drawn from (seed, item 0, the tensor's path) alone
  ties = merge.task_sum(base, [(2.0, item)], method="dare_ties", density=0.25, seed=1)
  once = merge.task_sum(base, [(1.0, item)], method="dare", density=0.25, seed=1)
  np.testing.assert_allclose(_kernel(ties), _kernel(once), rtol=1e-6)
  np.testing.assert_allclose(_kernel(once) - _kernel(base), change / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how, message", [
    ({"method": "mean"}, "unknown merge method 'mean'"),
    ({"method": "ties", "density": 0.0}, r"expected a share in \(0, 1\]"),
    ({"method": "sum", "density": 0.5}, "applies to ties and dare"),
    ({"method": "sum", "scale": float("nan")}, "must be finite numbers"),
    ({"method": "dare", "trim": "global"}, "'global' with method 'ties' only"),
    ({"method": "ties", "trim": "layer"}, "trim='layer'; expected one of"),
])
def test_task_sum_refuses_bad_methods(how, message):
  with pytest.raises(ValueError, match=message):
    merge.task_sum(_vec(0), [(1.0, _vec(1))], **how)
  with pytest.raises(ValueError, match=r"ties weighs the runs inside a mean: weights must be "
                     r"positive, got \[1.0, -1.0\]"):
    merge.task_sum(_vec(0), [(1.0, _vec(1)), (-1.0, _vec(2))], method="ties")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Finished runs of the testing config from one random base: Hydra, LoRA, full fine-tuning,
  HydraLoRA."""
  out = {}
  for kind in ("hydra", "lora", "full", "hydralora"):
    config = default.get_testing_config()
    if kind == "full":
      config.adapter, config.train_patterns = default.adapter_config("none"), (".*",)
    else:
      config.adapter.kind = kind
    workdir = tmp_path_factory.mktemp(kind)
    results = train_and_evaluate(config, str(workdir))
    out[kind] = (workdir, results)
  return out


def _body(params):
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: v for k, v in flat.items() if not k.startswith("head/")}


def test_a_run_alone_is_its_merged_export_and_scores_its_results(runs):
  workdir, results = runs["hydra"]
  run = merge.load_run(workdir)
  merged = merge.merge_runs([run], [1.0])
  for x, y in zip(jax.tree.leaves(merged.params), jax.tree.leaves(run.merged.params), strict=True):
    np.testing.assert_array_equal(x, y)
  assert merged.model == run.merged.model and merged.mean == run.merged.mean
  scores = evaluate.evaluate_pretrained(run.config, merged)
  assert {k: scores[k] for k in _SCORES} == {k: results[k] for k in _SCORES}
  features = merge.merge_runs([run], [1.0], head=None)
  with pytest.raises(ValueError, match="the model's head has None classes; data.num_classes is 10"):
    evaluate.evaluate_pretrained(run.config, features)


def test_evaluate_cli_of_two_processes_scores_a_checkpoint_as_its_run_did(runs):
  """Each process feeds its share of every batch to a mesh over both processes' devices."""
  workdir, results = runs["lora"]
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "hydra_jax.evaluate", "--config", str(ROOT / "configs" / "testing.py"),
       "--checkpoint", str(workdir / "export" / "merged.safetensors"),
       f"--config.parallel.distributed.coordinator=127.0.0.1:{port}",
       "--config.parallel.distributed.num_processes=2",
       f"--config.parallel.distributed.process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert '"checkpoint"' not in outs[1][0]  # process 0 prints (gloo logs to stdout)
  scores = json.loads(outs[0][0].splitlines()[-1])
  assert {k: scores[k] for k in _SCORES} == {k: results[k] for k in _SCORES}


@pytest.mark.parametrize("fsdp", [False, True])
def test_evaluate_splits_batches_and_weights_over_the_config_mesh(runs, fsdp):
  workdir, results = runs["lora"]
  config = default.get_testing_config()
  config.parallel.num_devices = 4
  config.parallel.fsdp = fsdp
  config.parallel.fsdp_min_size = 1024  # the tiny ViT's kernels split over the 4 devices
  scores = evaluate.evaluate_checkpoint(config, workdir / "export" / "merged.safetensors")
  assert {k: scores[k] for k in _SCORES} == {k: results[k] for k in _SCORES}


def test_evaluate_refuses_what_does_not_fit_the_config(runs):
  workdir, _ = runs["lora"]
  config = default.get_testing_config()
  config.parallel.num_devices = 4
  config.data.eval_batch_size = 30
  with pytest.raises(ValueError, match="data.eval_batch_size 30 does not split evenly over the 4 "
                                       "devices of the mesh; expected a multiple of 4"):
    evaluate.evaluate_checkpoint(config, workdir / "export" / "merged.safetensors")
  config = default.get_testing_config()
  config.data.num_classes = 5
  with pytest.raises(ValueError, match="the model's head has 10 classes; data.num_classes is 5"):
    evaluate.evaluate_checkpoint(config, workdir / "export" / "merged.safetensors")


def test_two_runs_sum_as_adapters_combine_does(runs):
  loaded = [merge.load_run(runs[k][0]) for k in ("hydra", "lora")]
  merged = merge.merge_runs(loaded, [0.5, 0.7])
  config = loaded[0].config
  _, base = build.build_model(config, build.model_rng(config))
  items = []
  for run, w in zip(loaded, (0.5, 0.7), strict=True):
    trainable, spec = export.load_adapters(run.workdir / "export" / "adapters.safetensors")
    items.append((w, spec, trainable["adapters"]))
  want, got = _body(adapters.combine(base.params, items)), _body(merged.params)
  moved = max(float(np.abs(want[k] - _body(base.params)[k]).max()) for k in want)
  assert moved > 1e-3  # the adapters changed the weights: the comparison below can fail
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  heads = [run.merged.params["head"]["kernel"] for run in loaded]
  np.testing.assert_allclose(merged.params["head"]["kernel"],
                             (0.5 * heads[0] + 0.7 * heads[1]) / 1.2, rtol=1e-5, atol=1e-7)


def test_cli_writes_a_checkpoint_and_scores_each_run(runs, tmp_path, capsys, monkeypatch):
  h, lora = (runs[k][0] for k in ("hydra", "lora"))
  out = tmp_path / "ta.safetensors"
  merge.main([str(out), f"{h}:0.4", f"{lora}:0.6", "--head", str(lora), "--eval"])
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert lines[0]["wrote"] == str(out) and f"0.6 * {lora}" in lines[0]["source"]
  assert [x["run"] for x in lines[1:]] == [str(h), str(lora)]
  assert all(0 <= x["test_accuracy"] <= 1 and x["test_images"] == 64 for x in lines[1:])
  assert lines[1]["run_test_accuracy"] == runs["hydra"][1]["test_accuracy"]
  written = checkpoints.load(out)
  np.testing.assert_array_equal(written.params["head"]["kernel"],
                                merge.load_run(lora).merged.params["head"]["kernel"])
  calls = []
  monkeypatch.setattr(evaluate, "evaluate_pretrained",
                      lambda config, pre: calls.append(config) or {"test_accuracy": 1})
  merge.main([str(out), f"{h}:0.4", f"{lora}:0.6", "--eval"])  # one head, one dataset
  assert len(calls) == 1 and len(capsys.readouterr().out.splitlines()) == 3
  merge.main([str(out), str(h), str(lora), "--method", "ties", "--density", "0.3"])
  assert "(density=0.3, method=ties)" in json.loads(capsys.readouterr().out)["source"]
  config = merge.load_run(h).config
  _, base = build.build_model(config, build.model_rng(config))
  want = merge.task_sum(base.params, [(1.0, merge.load_run(r).merged.params) for r in (h, lora)],
                        method="ties", density=0.3)
  for x, y in zip(jax.tree.leaves(checkpoints.load(out).params), jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  merge.main([str(out), str(h), str(lora), "--method", "ties", "--trim", "global"])
  assert "(density=0.2, method=ties, trim=global)" in capsys.readouterr().out
  merge.main([str(out), str(h), "--method", "dare"])
  assert "(density=0.5, method=dare, seed=0)" in capsys.readouterr().out
  merge.main([str(tmp_path / "features.safetensors"), str(h), "--head", "none"])
  assert "head" not in checkpoints.load(tmp_path / "features.safetensors").params


def _copy_run(src, dst, **config_changes):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
  config = json.loads((dst / "config.json").read_text())
  for key, value in config_changes.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  (dst / "config.json").write_text(json.dumps(config))
  return dst


def test_cli_scores_a_run_of_a_mesh_this_machine_lacks_on_one_device(runs, tmp_path, capsys):
  workdir, results = runs["hydra"]
  big = _copy_run(workdir, tmp_path / "big", **{"parallel.num_devices": 64, "parallel.fsdp": True})
  merge.main([str(tmp_path / "x.safetensors"), str(big), "--eval"])
  scores = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert {k: scores[k] for k in _SCORES} == {k: results[k] for k in _SCORES}


def test_a_full_fine_tune_mixes_in(runs):
  loaded = [merge.load_run(runs[k][0]) for k in ("hydra", "full")]
  merged = merge.merge_runs(loaded, [0.5, 0.5])
  config = loaded[0].config
  _, base = build.build_model(config, build.model_rng(config))
  b, got = _body(base.params), _body(merged.params)
  h, f = (_body(run.merged.params) for run in loaded)
  assert all(not np.array_equal(f[k], b[k]) for k in b)  # every param trained
  for k in b:
    np.testing.assert_allclose(got[k], b[k] + 0.5 * (h[k] - b[k]) + 0.5 * (f[k] - b[k]),
                               rtol=1e-6, atol=1e-7, err_msg=k)


def test_cli_refusals_name_the_reason(runs, tmp_path, capsys):
  h = runs["hydra"][0]
  # a run trained from seed 0's random backbone whose config now names seed 1's
  wrong_base = _copy_run(h, tmp_path / "wrong", seed=1)
  # a run of seed 1's backbone that changed nothing: consistent, but not hydra's base
  other_base = _copy_run(h, tmp_path / "other", seed=1)
  config = merge.load_run(other_base).config
  checkpoints.save(other_base / "export" / "merged.safetensors",
                   build.build_model(config, build.model_rng(config))[1])
  (other_base / "export" / "adapters.safetensors").unlink()
  hydralora = _copy_run(h, tmp_path / "hl", **{"adapter.kind": "hydralora"})
  (hydralora / "export" / "merged.safetensors").unlink()
  out = str(tmp_path / "x.safetensors")
  for argv, message in [
      ([out, str(wrong_base)], "which the run neither trained nor adapted: it was fine-tuned from "
                               "another base"),
      ([out, str(h), str(other_base)], "were fine-tuned from different bases: param "),
      ([out, f"{h}:nan"], "must be finite numbers"),
      ([out, str(h), str(hydralora)], "give --routing-images N"),
      ([out, str(h), "--routing-images", "0"], "--routing-images 0; expected a count >= 1"),
      ([out, str(h), "--head", str(tmp_path)], "expected 'mean', 'none' or one of the runs"),
      ([out, str(tmp_path / "nowhere")], "is not a run directory"),
  ]:
    with pytest.raises(SystemExit):
      merge.main(argv)
    assert message in capsys.readouterr().err, argv
  assert not (tmp_path / "x.safetensors").exists()


def test_every_reader_of_a_run_rebuilds_its_base_checked(runs, tmp_path):
  """analysis, merge and the PEFT export rebuild a run's base through export.run_model: a base
  another seed builds is refused; one that differs by float rounding (another backend's
  resampling) is not."""
  h, lora = runs["hydra"][0], runs["lora"][0]
  rounded = _copy_run(h, tmp_path / "rounded")
  path = rounded / "export" / "merged.safetensors"
  pre = checkpoints.load(path)
  pos = pre.params["pos_embedding"]
  params = {**pre.params, "pos_embedding": np.nextafter(pos, np.inf).astype(np.float32)}
  checkpoints.save(path, dataclasses.replace(pre, params=params))
  config = build.run_config(rounded)
  model, base = export.run_model(rounded, config)
  assert not np.array_equal(base.params["pos_embedding"], checkpoints.load(path).params[
      "pos_embedding"])  # the rounding reached the file
  params["pos_embedding"] = pos + np.float32(1e-3)
  checkpoints.save(path, dataclasses.replace(pre, params=params))
  with pytest.raises(ValueError, match="differs from the run's merged export at pos_embedding"):
    export.run_model(rounded, config)
  wrong = [_copy_run(r, tmp_path / f"wrong_{r.name}", seed=1) for r in (h, lora)]
  why = "which the run neither trained nor adapted: it was fine-tuned from another base"
  with pytest.raises(ValueError, match=why):
    analysis.load_run(wrong[0])
  with pytest.raises(ValueError, match=why):
    merge.merge_runs([merge.load_run(wrong[0])], [1.0])
  with pytest.raises(ValueError, match=why):
    export.save_peft_run(wrong[1], tmp_path / "peft")
  assert not (tmp_path / "peft").exists()


def test_a_hydralora_run_merges_with_its_mean_routing(runs, tmp_path, capsys):
  """The merged ViT computes the factored model with each layer's routing fixed at its mean
  over the first training images (recorded here through the activations path)."""
  hl, results = runs["hydralora"]
  run = merge.load_run(hl, routing_images=20)
  factored = analysis.load_run(hl)
  # the base the routing merge was built on comes along (merge_runs does not build it again)
  jax.tree.map(np.testing.assert_array_equal, run.base.params, factored.pre.params)
  train = analysis.report.eval_data(factored, 20, factored.config.data.train_split)
  recorded = [adapters.apply_intercepted(factored.model, factored.params, factored.adapters,
                                         factored.spec, b["image"], record=True)[1]["routing"]
              for b in train]
  pairs = list(zip(recorded, train, strict=True))
  mean = {k: np.concatenate([np.asarray(r[k])[b["mask"]] for r, b in pairs]).mean((0, 1))
          for k in recorded[0]}
  assert all(np.abs(w - 1 / 3).max() > 1e-3 for w in mean.values())  # not the uniform routing
  images = train[0]["image"]
  want, _ = adapters.apply_intercepted(factored.model, factored.params, factored.adapters,
                                       factored.spec, images, routing=mean)
  got = factored.model.apply({"params": run.merged.params}, images)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
  out = tmp_path / "hl.safetensors"
  merge.main([str(out), f"{hl}:0.5", f"{runs['hydra'][0]}:0.5", "--routing-images", "20",
              "--eval"])
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert lines[0]["wrote"] == str(out) and out.is_file()
  assert lines[1]["run_test_accuracy"] == results["test_accuracy"]
  assert 0 <= lines[1]["test_accuracy"] <= 1


def test_parse_reads_an_optional_weight(tmp_path):
  assert merge._parse("/r/a:0.25") == ("/r/a", 0.25)
  (tmp_path / "run:12").mkdir()  # a directory's own name wins over a weight
  assert merge._parse(str(tmp_path / "run:12")) == (str(tmp_path / "run:12"), 1.0)
  assert merge._parse("/r/a") == ("/r/a", 1.0)
  assert merge._parse("/r/a:-1e-1") == ("/r/a", -0.1)
  assert merge._parse("/r/a:b") == ("/r/a:b", 1.0)
