"""How hydra_jax's Hydra step scales with batch and model size, and the largest batch that fits.

  python benchmarks/scale.py --part batch    # B/16, batch 32..512
  python benchmarks/scale.py --part size     # S/16, L/16 at batch 128 (B/16: the batch part)
  python benchmarks/scale.py --part maxbatch # ViT-L/16, ViT-H/14, remat none / dots / block
  python benchmarks/scale.py --part maxbatch --models H/14   # one model's rows
  python benchmarks/scale.py --part maxbatch --models Ti/16 --attention xla --capacity_gib 16 \\
      --probes 4,8 --image_size 64   # CPU smoke test
  python benchmarks/scale.py --part microbatches --models B/16,L/16 --attention xla
      # the step's buffers at batch 32 with its gradient accumulated over 1, 2, 4, 8 parts

maxbatch compiles the real train step at two probe batches and reads XLA's memory analysis of
each (arguments + outputs - donated aliases + temporaries): a line through the two points gives
the bytes per image (its slope) and the bytes that do not grow with the batch (its intercept:
params, adapters, optimizer state, but also batch-independent temporaries such as the bf16
casts of the weights and the merged weights and their gradients, which one probe would divide
by its batch and so overstate the per-image cost), so the largest batch is
(capacity - intercept) / slope. An estimate from the compiler, not a run; rows print as each
configuration's probes finish, which compile in parallel threads (XLA compiles outside the GIL).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json

import jax
import jax.numpy as jnp

from hydra_jax import bench, train_lib

# (model, remat) of the maxbatch part, in the order their rows are wanted
MAXBATCH = (("L/16", "none"), ("L/16", "dots"), ("L/16", "block"), ("H/14", "none"),
            ("H/14", "block"))


def _args(**kw) -> argparse.Namespace:
  base = dict(model="B/16", batch=128, image_size=224, num_classes=100, dtype="bfloat16",
              attention="cudnn", remat="none", steps=10, repeats=3, infer=False)
  return argparse.Namespace(**{**base, **kw})


def step_memory(args) -> dict[str, int]:
  """XLA's buffers (bytes) of the Hydra train step compiled at ``args.batch``; compiles only."""
  net, spec, tx, schedule, state, frozen, _ = bench._setup(args, "hydra")  # noqa: SLF001
  size = args.image_size
  batch = {"image": jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=net, spec=spec, tx=tx,
                                   schedule=schedule, microbatches=bench.microbatches(args)),
                 donate_argnums=0)
  mem = step.lower(state, frozen, batch, jax.random.key(0)).compile().memory_analysis()
  if mem is None:
    raise RuntimeError(f"XLA gave no memory analysis for {args.model} on {jax.default_backend()}")
  fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return dict(fixed=fixed, temp=mem.temp_size_in_bytes, total=fixed + mem.temp_size_in_bytes)


def fit_max_batch(probes: tuple[int, int], totals: tuple[int, int], capacity: float) -> dict:
  """The line through two (batch, step bytes) points and the largest batch under ``capacity``.

  Args:
    probes: two different batch sizes.
    totals: the step's bytes at each (arguments + outputs - aliases + temporaries).
    capacity: usable device bytes.

  Returns:
    ``gib_per_image`` (slope), ``intercept_gib`` (bytes at batch 0), ``est_max_batch`` (None
    where the bytes do not grow with the batch, so the line bounds nothing).
  """
  (b1, b2), (t1, t2) = probes, totals
  if b1 == b2:
    raise ValueError(f"the two probe batches must differ; got {probes}")
  slope = (t2 - t1) / (b2 - b1)
  intercept = t1 - slope * b1
  est = int((capacity - intercept) // slope) if slope > 0 else None
  return dict(gib_per_image=slope / 2**30, intercept_gib=intercept / 2**30, est_max_batch=est)


def max_batch(model: str, remat: str, *, probes: tuple[int, int], capacity: float,
              pool: concurrent.futures.Executor, **kw) -> dict:
  """One maxbatch row: both probes' buffers, the fitted line and the estimate."""
  mems = list(pool.map(lambda b: step_memory(_args(model=model, remat=remat, batch=b, **kw)),
                       probes))
  gib = lambda key: [round(m[key] / 2**30, 3) for m in mems]  # noqa: E731
  one_probe = int((capacity - mems[-1]["fixed"]) // (mems[-1]["temp"] / probes[-1]))
  return dict(model=model, remat=remat, probe_batches=list(probes), fixed_gib=gib("fixed"),
              temp_gib=gib("temp"), step_gib=gib("total"), capacity_gib=capacity / 2**30,
              **fit_max_batch(probes, (mems[0]["total"], mems[1]["total"]), capacity),
              est_max_batch_one_probe=one_probe, **kw)


def _capacity(capacity_gib: float | None) -> float:
  if capacity_gib is not None:
    return capacity_gib * 2**30
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise SystemExit(f"{jax.devices()[0]} reports no bytes_limit: pass --capacity_gib")
  return stats["bytes_limit"]


def _maxbatch(args) -> None:
  models = args.models.split(",")
  configs = [(m, r) for m, r in MAXBATCH if m in models] or [(m, "none") for m in models]
  capacity = _capacity(args.capacity_gib)
  probes = tuple(int(b) for b in args.probes.split(","))
  if len(probes) != 2:
    raise SystemExit(f"--probes takes two batch sizes; got {args.probes!r}")
  kw = dict(attention=args.attention, image_size=args.image_size)
  with (concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as rows):
    # each row waits on its two probes in `pool`; rows print in completion order
    futures = {rows.submit(max_batch, m, r, probes=probes, capacity=capacity, pool=pool, **kw):
               (m, r) for m, r in configs}
    for done in concurrent.futures.as_completed(futures):
      model, remat = futures[done]
      try:
        print(json.dumps(done.result()), flush=True)
      except Exception as e:  # noqa: BLE001 - one failing configuration is a row
        print(json.dumps(dict(model=model, remat=remat, error=f"{type(e).__name__}: "
                              f"{str(e)[:300]}")), flush=True)


def _microbatches(args) -> None:
  """Compiles only: XLA's buffers of the Hydra step at ``--batch`` for each model and number of
  parts its gradient is accumulated over (1 = the whole batch at once)."""
  for model in args.models.split(","):
    for parts in (1, 2, 4, 8):
      mem = step_memory(_args(model=model, batch=args.batch, microbatches=parts,
                              attention=args.attention, image_size=args.image_size))
      print(json.dumps(dict(model=model, batch=args.batch, microbatches=parts,
                            attention=args.attention, image_size=args.image_size,
                            **{f"{k}_gib": round(v / 2**30, 3) for k, v in mem.items()},
                            backend=jax.default_backend())), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", choices=("batch", "size", "maxbatch", "microbatches"), required=True)
  p.add_argument("--attention", default="cudnn", choices=("xla", "cudnn", "auto"))
  p.add_argument("--models", default="L/16,H/14",
                 help="maxbatch, microbatches: comma list; a model outside maxbatch's "
                 "built-in set gets remat none")
  p.add_argument("--batch", type=int, default=32, help="microbatches: the global batch")
  p.add_argument("--probes", default="32,128", help="maxbatch: the two batches compiled")
  p.add_argument("--capacity_gib", type=float,
                 help="maxbatch: usable device memory (default: the device's bytes_limit)")
  p.add_argument("--image_size", type=int, default=224, help="maxbatch, microbatches")
  p.add_argument("--jobs", type=int, default=4, help="maxbatch: compiles in flight at once")
  args = p.parse_args(argv)
  if args.part in ("maxbatch", "microbatches"):
    (_maxbatch if args.part == "maxbatch" else _microbatches)(args)
    return
  runs = {"batch": [dict(batch=b) for b in (32, 64, 256, 512)],
          "size": [dict(model=m) for m in ("S/16", "L/16")]}
  for kw in runs[args.part]:  # the bench CLI: a process per row (its own peak memory, OOM as a row)
    a = _args(**kw, attention=args.attention)
    bench.main(["--model", a.model, "--batch", str(a.batch), "--attention", a.attention,
                "--adapters", "hydra", "--no_infer", "--steps", str(a.steps),
                "--repeats", str(a.repeats)], isolate=True)


if __name__ == "__main__":
  main()
