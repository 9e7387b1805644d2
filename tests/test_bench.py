"""The bench CLI's rows (a process per configuration, training before inference, failures as
rows), its alternating A/B timing, and scale.py's two-probe largest-batch fit."""

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from benchmarks import scale
from hydra_jax import bench

_TINY = ["--model", "Ti/16", "--image_size", "32", "--batch", "4", "--num_classes", "3",
         "--dtype", "float32", "--steps", "1", "--repeats", "1"]


ROOT = pathlib.Path(__file__).resolve().parents[1]
# requirements.txt's packages that the lent GPU machine's image lacks
# (/work/.library/device/KINDS.md, read 2026-12-07)
_NOT_ON_THE_GPU_IMAGE = ("tensorflow_datasets", "grain", "array_record", "ml_collections",
                         "tensorboardX", "importlib_resources")


def test_the_benchmarks_import_without_what_the_gpu_image_lacks():
  """The device runs the benches under its own image: a package only the data pipeline or the
  configs need must not be imported by them (v2's bench failed there at import)."""
  blocked = ", ".join(repr(m) for m in _NOT_ON_THE_GPU_IMAGE)
  code = (f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
          "import hydra_jax.bench, benchmarks.scale, benchmarks.profile_step, benchmarks.summary\n"
          "import tensorflow_datasets\n")  # the block itself: this import must fail
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1 and done.stderr.strip().endswith(
      "ModuleNotFoundError: import of tensorflow_datasets halted; None in sys.modules"), \
      done.stderr[-2000:]


def _rows(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def test_bench_cli_runs_each_configuration_in_its_own_process(capfd, monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.chdir(tmp_path)  # the children find hydra_jax wherever this process found it
  flags = "--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false"
  monkeypatch.setenv("XLA_FLAGS", flags)  # what a compiler experiment sets; children inherit it
  bench.main([*_TINY, "--infer_rounds", "3", "--adapters", "hydra,linear"])
  rows = _rows(capfd.readouterr().out)
  assert [(r["adapter"], r["timing"]) for r in rows] == [
      ("hydra", "train"), ("hydra", "infer"), ("linear", "train")]  # linear: nothing merges
  for r in rows:
    assert "error" not in r, r
    assert r["model"] == "Ti/16" and r["attention"] == "xla"  # "auto", resolved by the child
    assert r["xla_flags"] == flags
  for r in (rows[0], rows[2]):
    assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0
    assert r["xla_step_gib"] > r["xla_temp_gib"] > 0
  infer = rows[1]
  assert infer["infer_rounds"] == 3 and infer["infer_merged_img_per_s"] > 0
  assert infer["infer_ratio_min"] <= infer["infer_merged_over_plain"] <= infer["infer_ratio_max"]
  assert 0.5 < infer["infer_merged_over_plain"] < 2  # the merged model is the plain ViT
  with pytest.raises(SystemExit, match=r"unknown adapter\(s\) \['nope'\]"):
    bench.main(["--adapters", "hydra,nope"])
  with pytest.raises(SystemExit, match="--infer_rounds 0 must"):
    bench.main(["--infer_rounds", "0"])
  with pytest.raises(SystemExit, match="--microbatches 3 must be at least 1 and divide --batch 4"):
    bench.main([*_TINY, "--microbatches", "3"])


def test_bench_times_a_microbatched_augmented_step(capsys):
  bench.main([*_TINY, "--microbatches", "2", "--augment", "--adapters", "hydra", "--no_infer"])
  (row,) = _rows(capsys.readouterr().out)
  assert row["microbatches"] == 2 and row["augment"] and row["img_per_s"] > 0
  assert "error" not in row


def test_a_failed_inference_keeps_the_training_row(capsys, monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory merging")

  monkeypatch.setattr(bench, "_bench_inference", out_of_memory)
  args = argparse.Namespace(model="Ti/16", batch=2, image_size=32, num_classes=3,
                            dtype="float32", attention="xla", remat="none", steps=1, repeats=1,
                            infer=True, infer_rounds=1)
  bench._print_rows(args, "hydra")  # noqa: SLF001
  train, infer = _rows(capsys.readouterr().out)
  assert train["timing"] == "train" and train["img_per_s"] > 0 and "error" not in train
  assert infer["timing"] == "infer" and infer["adapter"] == "hydra"
  assert infer["error"] == "RuntimeError: RESOURCE_EXHAUSTED: out of memory merging"
  row = bench.bench_one(args, "hydra")  # the training row alone, as gpu_ab.sh asks an old tree
  assert row["timing"] == "train" and row["trainable_params"] == train["trainable_params"]


@pytest.mark.parametrize("printed, code, adapter, want", [
    ('{"timing": "train"}', 3, "hydra", ["train", "infer: exit status 3"]),
    ('{"timing": "train"}\n{"timing": "infer"}', 0, "hydra", ["train", "infer"]),
    ("", -9, "hydra", ["train: exit status -9"]),
    ('{"timing": "train"}', 1, "linear", ["train"]),  # no inference row was due
])
def test_a_dying_child_gets_an_error_row_for_what_it_did_not_print(
    capsys, monkeypatch, tmp_path, printed, code, adapter, want):
  fake = tmp_path / "python"  # stands in for the child interpreter
  kill = f"kill -{-code} $$" if code < 0 else f"exit {code}"
  fake.write_text(f"#!/bin/sh\necho 'compiling...'\nprintf '%s\\n' '{printed}'\n{kill}\n")
  fake.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(fake))
  args = argparse.Namespace(model="Ti/16", batch=2, image_size=32, dtype="float32",
                            attention="auto", remat="none", infer=True)
  bench._run_isolated(args, [], adapter)  # noqa: SLF001
  out = capsys.readouterr()
  got = [r["timing"] + (f": {r['error']}" if "error" in r else "") for r in _rows(out.out)]
  assert got == want
  assert "compiling..." in out.err  # not a row: kept off stdout


def test_timed_ab_alternates_the_order_every_round():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
  times = bench._timed_ab(fns, steps=1, rounds=3)  # noqa: SLF001
  assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then a b | b a | a b
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_max_batch_fit_uses_slope_and_intercept():
  gib = 2**30
  intercept, per_image = 6 * gib, 0.25 * gib  # weights, optimizer, bf16 casts, merged weights
  totals = tuple(intercept + per_image * b for b in (32, 128))
  fit = scale.fit_max_batch((32, 128), totals, 80 * gib)
  assert fit == dict(gib_per_image=0.25, intercept_gib=6.0, est_max_batch=296)
  assert scale.fit_max_batch((32, 128), (totals[0], totals[0]), 80 * gib)["est_max_batch"] is None
  with pytest.raises(ValueError, match=r"probe batches must differ; got \(32, 32\)"):
    scale.fit_max_batch((32, 32), totals, 80 * gib)


def test_summary_reports_rows_errors_and_what_is_missing(tmp_path):
  """benchmarks/summary.py: the lines a GPU call's reply ends with."""
  from benchmarks import summary

  rows = [dict(framework="jax", adapter="hydra", timing="train", img_per_s=3615.4, step_ms=35.4,
               peak_mem_gib=10.8, xla_flags="--xla_gpu_triton_gemm_any=true", remat="none"),
          dict(framework="jax", adapter="hydra", timing="infer", infer_merged_over_plain=0.98,
               infer_merged_img_per_s=8125, infer_plain_img_per_s=7967),
          dict(framework="torch", adapter="lora", compile=True, error="OutOfMemoryError: x"),
          dict(framework="jax", adapter="hydra", model="B/16", batch=256, microbatches=2,
               augment=True, attention="xla", dtype="float32", img_per_s=1.0, step_ms=2.0)]
  (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\ncut off {")
  (tmp_path / "remat.jsonl").write_text("")
  (tmp_path / "profile.jsonl").write_text(json.dumps(dict(
      device_ms_per_step=34.48, by_kind_ms={"matmul": 14.243}, top_kernels_ms=[["nvjet_a", 2.9]])))
  assert summary.summary(tmp_path, ["old", "new", "remat"]) == [
      "old.jsonl: no output (see old.err or err.log)",
      "remat.jsonl: no output (see remat.err or err.log)",
      "new        jax hydra --xla_gpu_triton_gemm_any=true 3615 img/s 35.4 ms peak 10.80 GiB",
      "new        jax hydra infer merged/plain 0.980 8125 7967 img/s",
      "new        torch lora compile ERROR OutOfMemoryError: x",
      "new        jax hydra B/16x256 mb=2 augment xla float32 1 img/s 2.0 ms peak 0.00 GiB",
      "new.jsonl: not JSON: cut off {",
      "profile    34.48 ms/step {'matmul': 14.24}", "    2.900 nvjet_a"]
