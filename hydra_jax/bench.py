"""Times the real ``train_lib.train_step`` and merged-model inference on synthetic batches.

  python -m hydra_jax.bench --model B/16 --batch 128 --adapters hydra,lora --dtype bfloat16 \\
      --attention cudnn
  python -m hydra_jax.bench --model Ti/16 --batch 8 --image_size 32 --steps 2   # CPU smoke test

One JSON line per configuration: img/s, step ms (median of repeats, warm-up excluded, device
synchronised), achieved TFLOP/s (the step's matmul FLOPs counted from the shapes by
``hydra_jax.flops``: XLA's cost analysis misses cuBLAS/cuDNN calls on GPU), peak device memory
of the training step, XLA's buffers of the compiled step (``xla_step_gib``: arguments, outputs
and temporaries; ``xla_temp_gib``: temporaries; on CPU too), and the same for inference of the
merged model against the plain ViT. The device's peak counter cannot be reset, so each of
several configurations runs in a process of its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax import adapters, flops, optim, train_lib
from hydra_jax.build import DTYPES
from hydra_jax.models import ViT, variant
from hydra_jax.models.vit import ATTENTIONS, REMATS, resolve_attention

# adapter name -> (AdapterSpec fields or None, params that train besides adapters)
ADAPTERS = {
    "hydra": (dict(kind="hydra"), ("head/.*",)),
    "hydra_dropout": (dict(kind="hydra", dropout=0.1), ("head/.*",)),  # activation-level path
    "lora": (dict(kind="lora"), ("head/.*",)),
    "sequential": (dict(kind="sequential", rank=4), ("head/.*",)),
    "hydralora": (dict(kind="hydralora"), ("head/.*",)),
    "linear": (None, ("head/.*",)),
    "full": (None, (".*",)),
}


def synthetic_batch(rng: np.random.Generator, args) -> dict[str, np.ndarray]:
  """Random uint8 images and labels, as the input pipeline yields them (the model normalises)."""
  shape = (args.batch, args.image_size, args.image_size, 3)
  return {"image": rng.integers(0, 256, shape, dtype=np.uint8),
          "label": rng.integers(0, args.num_classes, args.batch).astype(np.int32)}


def _timed(fn, *, steps: int, repeats: int) -> float:
  """Median seconds per call of ``fn`` (which returns something to block on)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def _peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _xla_memory_gib(compiled) -> dict[str, float | None]:
  """XLA's buffers of the compiled step: temporaries (activations kept for the backward pass
  and scratch) and the whole step (arguments + outputs - donated aliases + temporaries).

  Available on every backend, unlike the device's peak, so remat policies compare on CPU too.
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return dict(xla_step_gib=None, xla_temp_gib=None)
  step = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return dict(xla_step_gib=step / 2**30, xla_temp_gib=mem.temp_size_in_bytes / 2**30)


def _weight_grads(params, spec, patterns) -> list[str]:
  """Module paths whose kernel gets a full weight gradient in this step.

  Trained kernels always do; adapted kernels do when the step merges the adapters into the
  weights (autodiff then forms dL/dW' before the factors' gradients); the activation-level path
  only forms low-rank products.
  """
  kernels = [k[:-len("/kernel")] for k in traverse_util.flatten_dict(params, sep="/")
             if k.endswith("/kernel")]
  trained = [k for k in kernels if any(re.fullmatch(p, k + "/kernel") for p in patterns)]
  if spec is not None and adapters.merge_path(spec, train=True):
    trained += _adapted(params, spec)
  return sorted(set(trained))


def _adapted(params, spec) -> list[str]:
  return [] if spec is None else [layer.name for layer in adapters.find_layers(spec, params)]


def _setup(args, name: str):
  fields, patterns = ADAPTERS[name]
  grid = args.image_size // variant(args.model)["patch_size"]
  model = ViT(num_classes=args.num_classes, **variant(args.model), posemb_grid=(grid, grid),
              dtype=DTYPES[args.dtype], attention=args.attention, remat=args.remat,
              gelu_approximate=getattr(args, "gelu_approximate", False),
              pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))
  images = jnp.zeros((1, args.image_size, args.image_size, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  spec = None if fields is None else adapters.AdapterSpec(**fields)
  trainable_params, frozen = optim.split(params, list(patterns))
  ad = {} if spec is None else adapters.init(spec, params, jax.random.key(1))
  trainable = {"adapters": ad, "params": trainable_params}
  cfg = argparse.Namespace(lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=10,
                           total_steps=1000, grad_clip=0.0, schedule="cosine", min_lr=0.0,
                           warmup_init_lr=0.0)
  tx, schedule = train_lib.make_optimizer(cfg)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  step_flops = args.batch * flops.train_step_flops(
      model, args.image_size, _weight_grads(params, spec, patterns), _adapted(params, spec))
  return model, spec, tx, schedule, state, frozen, step_flops


def bench_one(args, name: str) -> dict:
  model, spec, tx, schedule, state, frozen, step_flops = _setup(args, name)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(synthetic_batch(rng, args)) for _ in range(3)]
  step = jax.jit(functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                                   schedule=schedule), donate_argnums=0)
  key = jax.random.key(2)
  compiled = step.lower(state, frozen, batches[0], key).compile()
  holder = {"state": state, "i": 0}

  def one_step():
    holder["i"] += 1
    holder["state"], m = compiled(holder["state"], frozen, batches[holder["i"] % 3], key)
    return m["loss"]

  step_s = _timed(one_step, steps=args.steps, repeats=args.repeats)
  result = dict(framework="jax", model=args.model, adapter=name, batch=args.batch,
                image_size=args.image_size, dtype=args.dtype,
                attention=resolve_attention(args.attention, DTYPES[args.dtype]),
                remat=args.remat, gelu_approximate=getattr(args, "gelu_approximate", False),
                img_per_s=args.batch / step_s, step_ms=step_s * 1e3,
                tflops=step_flops / step_s / 1e12, gflop_per_img=step_flops / args.batch / 1e9,
                peak_mem_gib=_peak_memory_gib(), **_xla_memory_gib(compiled),
                trainable_params=int(sum(x.size for x in jax.tree.leaves(state.trainable))))
  if args.infer:
    result.update(_bench_inference(args, model, spec, holder["state"], frozen, batches))
  result.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
  return result


def _bench_inference(args, model, spec, state, frozen, batches) -> dict:
  """Merged-model forward against the plain ViT (same architecture: should cost the same)."""
  if spec is None or not spec.mergeable:
    return {}
  merged = jax.jit(train_lib.merged_params, static_argnums=2)(state.trainable, frozen, spec)
  base = optim.join(state.trainable["params"], frozen)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  x = batches[0]["image"]
  merged_s = _timed(lambda: apply(merged, x), steps=args.steps, repeats=args.repeats)
  plain_s = _timed(lambda: apply(base, x), steps=args.steps, repeats=args.repeats)
  return dict(infer_merged_img_per_s=args.batch / merged_s,
              infer_plain_img_per_s=args.batch / plain_s,
              infer_merged_over_plain=merged_s / plain_s)


def _child_env() -> dict[str, str]:
  """This environment, with the directory holding this hydra_jax first on PYTHONPATH (a child
  process does not inherit the parent's sys.path)."""
  root = str(pathlib.Path(__file__).resolve().parents[1])
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def main(argv=None, *, isolate: bool = False):
  """The CLI; ``isolate`` runs even a single configuration in a process of its own."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="B/16")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=100)
  p.add_argument("--adapters", default="hydra,lora,hydralora,full",
                 help=f"comma-separated, of {sorted(ADAPTERS)}")
  p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
  p.add_argument("--attention", default="auto", choices=ATTENTIONS,
                 help="auto: cuDNN flash attention on a GPU with bf16/fp16, else XLA's")
  p.add_argument("--remat", default="none", choices=REMATS,
                 help="none; block (recompute each block); dots (keep matmul outputs)")
  p.add_argument("--gelu_approximate", action="store_true",
                 help="tanh GELU, as the Google ViT checkpoints use (XLA can fuse it into GEMMs)")
  p.add_argument("--no_infer", dest="infer", action="store_false",
                 help="skip the merged-vs-plain inference timing")
  p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  names = args.adapters.split(",")
  if unknown := [n for n in names if n not in ADAPTERS]:
    raise SystemExit(f"unknown adapter(s) {unknown}; expected some of {sorted(ADAPTERS)}")
  error_row = lambda name, error: json.dumps(dict(  # noqa: E731
      framework="jax", model=args.model, adapter=name, batch=args.batch, error=error))
  if len(names) > 1 or isolate:  # a process per configuration: each row's peak is its own
    for name in names:
      child = subprocess.run([sys.executable, "-m", "hydra_jax.bench", *argv, "--adapters", name],
                             stdout=subprocess.PIPE, text=True, check=False, env=_child_env())
      print(child.stdout.strip() or error_row(name, f"exit status {child.returncode}"), flush=True)
    return
  try:
    print(json.dumps(bench_one(args, names[0])), flush=True)
  except Exception as e:  # a failing configuration (e.g. out of memory) is a row, not a crash
    print(error_row(names[0], f"{type(e).__name__}: {str(e)[:300]}"), flush=True)


if __name__ == "__main__":
  main()
