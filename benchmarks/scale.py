"""How hydra_jax's Hydra step scales with batch and model size, and the largest batch that fits.

  python benchmarks/scale.py --part batch    # B/16, batch 32..512
  python benchmarks/scale.py --part size     # S/16, B/16, L/16 at batch 128
  python benchmarks/scale.py --part maxbatch # ViT-L/16, ViT-H/14, remat none / dots / block

maxbatch compiles the real train step at one batch and reads XLA's memory analysis: arguments
(params, adapters, optimizer state) stay fixed, temporaries (activations) grow with the batch,
so the largest batch is (capacity - fixed) / (temporaries per image). An estimate, not a run.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from hydra_jax import bench, train_lib


def _args(**kw) -> argparse.Namespace:
  base = dict(model="B/16", batch=128, image_size=224, num_classes=100, dtype="bfloat16",
              attention="cudnn", remat="none", steps=10, repeats=3, infer=False)
  return argparse.Namespace(**{**base, **kw})


def max_batch(model: str, remat: str, *, probe: int = 32) -> dict:
  args = _args(model=model, remat=remat, batch=probe)
  net, spec, tx, schedule, state, frozen, _ = bench._setup(args, "hydra")  # noqa: SLF001
  batch = {"image": jax.ShapeDtypeStruct((probe, 224, 224, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((probe,), jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=net, spec=spec, tx=tx,
                                   schedule=schedule), donate_argnums=0)
  mem = step.lower(state, frozen, batch, jax.random.key(0)).compile().memory_analysis()
  capacity = jax.devices()[0].memory_stats()["bytes_limit"]
  fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  per_image = mem.temp_size_in_bytes / probe
  return dict(model=model, remat=remat, probe_batch=probe, fixed_gib=fixed / 2**30,
              temp_gib_per_image=per_image / 2**30, capacity_gib=capacity / 2**30,
              est_max_batch=int((capacity - fixed) // per_image))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--part", choices=("batch", "size", "maxbatch"), required=True)
  part = p.parse_args().part
  runs = {"batch": [dict(batch=b) for b in (32, 64, 256, 512)],
          "size": [dict(model=m) for m in ("S/16", "L/16")]}
  if part == "maxbatch":
    for model, remat in (("L/16", "none"), ("L/16", "dots"), ("L/16", "block"), ("H/14", "none"),
                         ("H/14", "block")):
      print(json.dumps(max_batch(model, remat)), flush=True)
    return
  for kw in runs[part]:  # the bench CLI: a process per row (its own peak memory, OOM as a row)
    a = _args(**kw)
    bench.main(["--model", a.model, "--batch", str(a.batch), "--attention", a.attention,
                "--adapters", "hydra", "--no_infer", "--steps", str(a.steps),
                "--repeats", str(a.repeats)], isolate=True)


if __name__ == "__main__":
  main()
