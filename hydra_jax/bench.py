"""Times the real ``train_lib.train_step`` and merged-model inference on synthetic batches.

  python -m hydra_jax.bench --model B/16 --batch 128 --adapters hydra,lora --dtype bfloat16 \\
      --attention cudnn
  python -m hydra_jax.bench --model Ti/16 --batch 8 --image_size 32 --steps 2   # CPU smoke test

JSON lines, each configuration's training row (``"timing": "train"``) printed and flushed before
anything else runs: img/s, step ms (median of repeats, warm-up excluded, device synchronised),
achieved TFLOP/s (the step's matmul FLOPs counted from the shapes by ``hydra_jax.flops``: XLA's
cost analysis misses cuBLAS/cuDNN calls on GPU), peak device memory of the training step, XLA's
buffers of the compiled step (``xla_step_gib``: arguments, outputs and temporaries;
``xla_temp_gib``: temporaries; on CPU too). Then, for a mergeable adapter, an inference row
(``"timing": "infer"``): the merged model against the plain ViT, timed in alternating rounds
(merged, plain; plain, merged; ...) with medians and the per-round ratio's range. A failure
(e.g. out of memory) is a row with an ``error`` field and that ``timing``. The device's peak
counter cannot be reset, so each of several configurations runs in a process of its own.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax import adapters, augment, flops, optim, train_lib
from hydra_jax.models import ViT, variant
from hydra_jax.models.vit import ATTENTIONS, DTYPES, REMATS, resolve_attention

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


def _time_calls(fn: Callable, steps: int) -> float:
  """Seconds per call of ``fn`` over ``steps`` calls, blocking on the last result."""
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def _timed(fn, *, steps: int, repeats: int) -> float:
  """Median seconds per call of ``fn`` (which returns something to block on)."""
  jax.block_until_ready(fn())
  return statistics.median(_time_calls(fn, steps) for _ in range(repeats))


def _timed_ab(fns: dict[str, Callable], *, steps: int, rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each of ``fns`` in each of ``rounds`` rounds, taken in turn.

  The order flips every round (A B, B A, A B, ...), so drift (clocks, heat, other work on the
  host) and going first or second fall on every version alike; the rounds' spread is what a
  difference between the versions has to beat.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile and warm up outside the rounds
  times = {name: [] for name in fns}
  for r in range(rounds):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      times[name].append(_time_calls(fns[name], steps))
  return times


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


def _identity(args, name: str) -> dict:
  """The fields that name a configuration, in every row it prints (errors too).

  ``attention`` as given: resolving "auto" asks the device, which a parent process leaves to
  its children (on a GPU, starting the backend there would take the memory they need).
  ``xla_flags`` is the environment's XLA_FLAGS (children inherit it): a compiler experiment
  is a row of its own.
  """
  return dict(framework="jax", model=args.model, adapter=name, batch=args.batch,
              image_size=args.image_size, dtype=args.dtype, attention=args.attention,
              remat=args.remat, gelu_approximate=getattr(args, "gelu_approximate", False),
              microbatches=microbatches(args), augment=getattr(args, "augment", False),
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def microbatches(args) -> int:
  """``args.microbatches``; 1 for callers whose arguments predate it (scale.py, older trees)."""
  return getattr(args, "microbatches", 1)


# what --augment times: torchvision's RandomResizedCrop defaults and a flip, then DeiT's mixup
# and CutMix, on the device
AUGMENT = augment.Augment(flip=True, crop_scale=(0.08, 1.0))
MIX = augment.Mix(mixup=0.8, cutmix=1.0)


def _error_row(args, name: str, timing: str, error: str) -> dict:
  """The row of a configuration's part (``timing``) that failed."""
  return dict(_identity(args, name), timing=timing, error=error)


def _infers(args, name: str) -> bool:
  """Whether the configuration gets an inference row (a mergeable adapter, unless --no_infer)."""
  fields = ADAPTERS[name][0]
  return args.infer and fields is not None and adapters.AdapterSpec(**fields).mergeable


def bench_rows(args, name: str) -> Iterator[dict]:
  """The configuration's training row, then (``args.infer``, a mergeable adapter) its inference
  row: a generator, so the caller prints the first before the second's compiles start."""
  model, spec, tx, schedule, state, frozen, step_flops = _setup(args, name)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(synthetic_batch(rng, args)) for _ in range(3)]
  step = jax.jit(functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                                   schedule=schedule, microbatches=microbatches(args),
                                   **(dict(augment=AUGMENT, mix=MIX)
                                      if getattr(args, "augment", False) else {})),
                 donate_argnums=0)
  key = jax.random.key(2)
  compiled = step.lower(state, frozen, batches[0], key).compile()
  holder = {"state": state, "i": 0}

  def one_step():
    holder["i"] += 1
    holder["state"], m = compiled(holder["state"], frozen, batches[holder["i"] % 3], key)
    return m["loss"]

  step_s = _timed(one_step, steps=args.steps, repeats=args.repeats)
  ident = dict(_identity(args, name),
               attention=resolve_attention(args.attention, DTYPES[args.dtype]))
  env = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
  yield dict(ident, timing="train", img_per_s=args.batch / step_s,
             step_ms=step_s * 1e3, tflops=step_flops / step_s / 1e12,
             gflop_per_img=step_flops / args.batch / 1e9, peak_mem_gib=_peak_memory_gib(),
             **_xla_memory_gib(compiled),
             trainable_params=int(sum(x.size for x in jax.tree.leaves(state.trainable))), **env)
  if _infers(args, name):
    yield dict(ident, timing="infer",
               **_bench_inference(args, model, spec, holder["state"], frozen, batches), **env)


def bench_one(args, name: str) -> dict:
  """The training row alone (what ``benchmarks/gpu_ab.sh`` calls in an older tree)."""
  return next(bench_rows(args, name))


def _bench_inference(args, model, spec, state, frozen, batches) -> dict:
  """Merged-model forward against the plain ViT (same architecture: should cost the same).

  ``infer_merged_over_plain`` is the median of the rounds' latency ratios (each round times
  both, in alternating order); ``infer_ratio_min``/``_max`` are their range, and
  ``infer_*_spread`` each version's own (max / min - 1 of its rounds): a ratio inside them is
  noise.
  """
  merged = jax.jit(train_lib.merged_params, static_argnums=2)(state.trainable, frozen, spec)
  base = optim.join(state.trainable["params"], frozen)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def forward(params):  # rotates over the batches: the same inputs for both versions
    images = itertools.cycle([b["image"] for b in batches])
    return lambda: apply(params, next(images))

  times = _timed_ab({"merged": forward(merged), "plain": forward(base)}, steps=args.steps,
                    rounds=args.infer_rounds)
  ratios = [m / p for m, p in zip(times["merged"], times["plain"], strict=True)]
  spread = {f"infer_{k}_spread": max(t) / min(t) - 1 for k, t in times.items()}
  return dict(infer_merged_img_per_s=args.batch / statistics.median(times["merged"]),
              infer_plain_img_per_s=args.batch / statistics.median(times["plain"]),
              infer_merged_over_plain=statistics.median(ratios),
              infer_ratio_min=min(ratios), infer_ratio_max=max(ratios),
              infer_rounds=args.infer_rounds, **spread)


def _child_env() -> dict[str, str]:
  """This environment, with the directory holding this hydra_jax first on PYTHONPATH (a child
  process does not inherit the parent's sys.path)."""
  root = str(pathlib.Path(__file__).resolve().parents[1])
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _print_rows(args, name: str) -> None:
  """Prints the configuration's rows as they come; a failing part (e.g. out of memory) is a row
  with ``error``, not a crash: a failed inference keeps the training row printed before it."""
  rows = bench_rows(args, name)
  for timing in ("train", "infer"):
    try:
      row = next(rows, None)
    except Exception as e:  # noqa: BLE001
      row = _error_row(args, name, timing, f"{type(e).__name__}: {str(e)[:300]}")
    if row is None:
      return
    print(json.dumps(row), flush=True)
    if "error" in row:
      return


def _parse_row(line: str) -> dict | None:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row if isinstance(row, dict) else None


def _run_isolated(args, argv: list[str], name: str) -> None:
  """Runs one configuration in a process of its own, passing its rows on as they come (so a
  row printed before the child dies or the caller's ``timeout`` kills both is kept); a child
  that fails without its rows gets an error row for the first one missing."""
  cmd = [sys.executable, "-m", "hydra_jax.bench", *argv, "--adapters", name]
  seen = []
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_child_env()) as child:
    for line in child.stdout:
      if (row := _parse_row(line)) is None:  # not a row: keep stdout all JSON lines
        print(line, end="", file=sys.stderr, flush=True)
        continue
      print(json.dumps(row), flush=True)
      seen.append(row.get("timing"))
  expected = ["train", "infer"] if _infers(args, name) else ["train"]
  missing = [t for t in expected if t not in seen]
  if child.returncode != 0 and missing:
    print(json.dumps(_error_row(args, name, missing[0], f"exit status {child.returncode}")),
          flush=True)


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
  p.add_argument("--microbatches", type=int, default=1,
                 help="accumulate each step's gradient over this many parts of the batch")
  p.add_argument("--augment", action="store_true", help="with a random resized crop (area "
                 "0.08-1), a flip, and mixup 0.8 / CutMix 1.0 of each image inside the step "
                 "(data.augment)")
  p.add_argument("--steps", type=int, default=10, help="steps per timed repeat (and round)")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats of the training step")
  p.add_argument("--infer_rounds", type=int, default=10,
                 help="inference rounds, each timing merged and plain (order alternating)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  names = args.adapters.split(",")
  if unknown := [n for n in names if n not in ADAPTERS]:
    raise SystemExit(f"unknown adapter(s) {unknown}; expected some of {sorted(ADAPTERS)}")
  if min(args.steps, args.repeats, args.infer_rounds) < 1:
    raise SystemExit(f"--steps {args.steps}, --repeats {args.repeats} and --infer_rounds "
                     f"{args.infer_rounds} must each be at least 1")
  if args.microbatches < 1 or args.batch % args.microbatches:
    raise SystemExit(f"--microbatches {args.microbatches} must be at least 1 and divide "
                     f"--batch {args.batch}")
  if len(names) > 1 or isolate:  # a process per configuration: each row's peak is its own
    for name in names:
      _run_isolated(args, argv, name)
    return
  _print_rows(args, names[0])


if __name__ == "__main__":
  main()
