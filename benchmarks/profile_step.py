"""Where a train step's time goes: traces the real step and sums device kernel time by kind.

  python benchmarks/profile_step.py --model B/16 --batch 128 --adapter hydra --attention cudnn

Prints the top kernels and a breakdown (matmul / attention / fusions / copies / other) as one
JSON line on stdout, and nothing else there (diagnostics go to stderr).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import re
import sys
import tempfile

import jax
import numpy as np

from hydra_jax import bench, train_lib

_KINDS = [
    ("attention", re.compile(r"fmha|flash|cudnn|sdpa|attention", re.I)),
    # nvjet: cuBLAS's kernels under CUDA 13, named without "gemm" or "sm90_"
    ("matmul", re.compile(r"gemm|cutlass|cublas|matmul|dot|xmma|sm90_|nvjet", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|pad|slice", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|reduce", re.I)),
]


def _kind(name: str) -> str:
  return next((k for k, rx in _KINDS if rx.search(name)), "other")


def kernel_times(trace_dir: pathlib.Path) -> dict[str, float]:
  """Sums event durations (ms) by name on the first GPU plane of an xplane trace."""
  path = next(trace_dir.rglob("*.xplane.pb"))
  data = jax.profiler.ProfileData.from_file(str(path))
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "stream" not in line.name.lower() or "xla ops" in line.name.lower():
        continue
      for event in line.events:
        totals[event.name] += event.duration_ns / 1e6
    if not totals:  # say what the trace holds (on stderr: stdout is the JSON result)
      print("no stream events; lines:", [line.name for line in plane.lines], file=sys.stderr)
    break
  return totals


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="B/16")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=100)
  p.add_argument("--adapter", default="hydra")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--remat", default="none")
  p.add_argument("--gelu_approximate", action="store_true")
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args(argv)
  model, spec, tx, schedule, state, frozen, _ = bench._setup(args, args.adapter)  # noqa: SLF001
  rng = np.random.default_rng(0)
  batch = jax.device_put(bench.synthetic_batch(rng, args))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                                   schedule=schedule), donate_argnums=0)
  key = jax.random.key(0)
  for _ in range(3):
    state, m = step(state, frozen, batch, key)
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(args.steps):
        state, m = step(state, frozen, batch, key)
      jax.block_until_ready(m)
    totals = kernel_times(pathlib.Path(tmp))
  per_step = {k: v / args.steps for k, v in totals.items()}
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, ms in per_step.items():
    by_kind[_kind(name)] += ms
  top = sorted(per_step.items(), key=lambda kv: -kv[1])[:25]
  print(json.dumps({"config": vars(args), "device_ms_per_step": sum(per_step.values()),
                    "by_kind_ms": dict(by_kind),
                    "top_kernels_ms": [(n[:120], round(ms, 3)) for n, ms in top]}), flush=True)


if __name__ == "__main__":
  main()
