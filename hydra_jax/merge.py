"""Weighted sums of fine-tuned runs (task arithmetic, model soups) as one plain checkpoint.

A finished run's merged export is its base model plus a task vector: the adapters' folded weight
change and the change of any other param it trained. For runs fine-tuned from one base,

  merged = base + sum_i w_i (merged_i - base)

(summed in float64, stored float32) is the base architecture with the base's cost; for runs that
trained only adapters and a head it is the base plus the weighted sum of the adapters' weight
changes, what ``adapters.combine`` computes from the factors. Runs may mix adapter kinds (and
full fine-tuning); HydraLoRA runs have no merged export (their router depends on the input):
``--routing-images N`` merges them with each layer's mean routing over N training images.

``method`` "ties" (TIES-merging), "dare" or "dare_ties" replaces the plain sum (``task_sum``).

The classifier head is each task's own, not a change of the base: ``head="mean"`` takes the
weights' mean of the runs' heads (``sum_i w_i h_i / sum_i w_i``: a soup of runs of one task),
``head=i`` run i's head as it is, ``head=None`` no head (a features model).

  python -m hydra_jax.merge /tmp/soup.safetensors /tmp/h:0.5 /tmp/l:0.5 --eval
  python -m hydra_jax.merge /tmp/ta.safetensors /tmp/a:0.3 /tmp/b:0.3 --head /tmp/a --eval

``--eval`` scores the result on each run's validation and test splits (as the run scored itself)
with the head that run would use here: the written mean head, else the run's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import zlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from hydra_jax import adapters, analysis, build, checkpoints, evaluate, export

HEAD = "head"


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run: its workdir, config and merged model (``export/merged.safetensors``), and
  its rebuilt base where it was already built (a HydraLoRA run merged with mean routing)."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  merged: checkpoints.Pretrained
  base: checkpoints.Pretrained | None = None


def load_run(workdir: str | pathlib.Path, *, routing_images: int | None = None) -> Run:
  """Reads a finished run's config and merged export.

  A HydraLoRA run has none (its router depends on the input): with ``routing_images`` it is
  merged with each layer's mean routing over its first ``routing_images`` training images
  (``analysis.mean_routing``; a plain ViT that scores below the router's model).
  """
  workdir = pathlib.Path(workdir).expanduser()
  config, merged = build.run_config(workdir), workdir / "export" / "merged.safetensors"
  hydralora = config.adapter.get("kind") == "hydralora"
  if hydralora and routing_images:
    return Run(workdir, config, *_with_mean_routing(workdir, routing_images))
  if not merged.is_file():
    why = ("a HydraLoRA run has none: its router depends on the input; give --routing-images N "
           "(routing_images) to merge it with each layer's mean routing over N training images"
           if hydralora else "unfinished, or run with export=False")
    raise FileNotFoundError(f"{workdir} has no merged export {merged} ({why})")
  return Run(workdir, config, checkpoints.load(merged))


def _with_mean_routing(workdir: pathlib.Path, num_images: int) -> tuple[checkpoints.Pretrained,
                                                                         checkpoints.Pretrained]:
  """(the run merged with its mean routing, its base: ``export.run_model``'s, checked there)."""
  run = analysis.load_run(workdir)
  routing, seen = analysis.mean_routing(run, num_images)
  params = jax.device_get(adapters.merge(run.params, run.adapters, run.spec, routing=routing))
  merged = dataclasses.replace(
      run.pre, params=jax.tree.map(lambda x: np.asarray(x, np.float32), params),
      source=f"{workdir} merged with each layer's mean routing over {seen} training images")
  return merged, run.pre


def _flat(params) -> dict[str, np.ndarray]:
  return traverse_util.flatten_dict(params, sep="/")


METHODS = ("sum", "ties", "dare", "dare_ties")
TRIMS = ("tensor", "global")  # TIES' trim: per tensor, or over each run's whole task vector


def task_sum(base, items: Sequence[tuple[float, dict]], *, head: str | int | None = "mean",
             method: str = "sum", density: float = 1.0, scale: float = 1.0, seed: int = 0,
             trim: str = "tensor") -> dict:
  """``base + scale * merge_i(w_i, tau_i)`` over the changes ``tau_i = params_i - base`` of every
  param but the head, plus the chosen head.

  Methods, each param tensor on its own (as mergekit and PEFT do) but for TIES' trim with
  ``trim="global"`` (over the whole task vector, as TIES' paper does):

  - "sum": ``sum_i w_i tau_i`` (task arithmetic; ``scale`` multiplies every weight);
  - "ties" (TIES-merging, Yadav et al. 2023): keep ``tau_i``'s ``density`` share of largest
    magnitudes (of each tensor, or with ``trim="global"`` of all of ``tau_i``), elect each
    entry's sign as that of ``sum_i w_i tau_i`` over the kept values, and take the ``w``-weighted
    mean of the kept values of that sign (0 where none): the weights weigh the runs (their scale
    cancels, so they must be positive) and ``scale`` is the paper's lambda (equal weights and
    ``scale=1``: the paper's merge at lambda 1);
  - "dare" (Yu et al. 2023): keep each entry of each ``tau_i`` with probability ``density``,
    scaled by ``1 / density`` (the rest 0; item i's mask of a tensor draws from (``seed``, i, the
    tensor's path)), then "sum";
  - "dare_ties": DARE's draw, then TIES' sign election and weighted mean.

  Args:
    base: the param tree the runs started from (its head is not read).
    items: [(w_i, params_i), ...], each params_i of base's tree (heads may differ).
    head: "mean" (``sum_i w_i head_i / sum_i w_i``; the heads' shapes must agree), an index
      into ``items`` (that head as it is) or None (no head).
    method, density, scale, seed, trim: as above; density in (0, 1].

  Returns:
    the merged param tree, float32 numpy leaves (float64 arithmetic).
  """
  if not items:
    raise ValueError("task_sum needs at least one (weight, params) item")
  if method not in METHODS:
    raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
  if not 0 < density <= 1:
    raise ValueError(f"density={density}; expected a share in (0, 1]")
  if method == "sum" and density != 1:
    raise ValueError(f"density={density} applies to ties and dare, not to method 'sum'")
  if trim not in TRIMS or (trim != "tensor" and method != "ties"):
    raise ValueError(f"trim={trim!r}; expected one of {TRIMS}, and 'global' with method 'ties' "
                     f"only (method {method!r})")
  weights = [float(w) for w, _ in items]
  if not all(np.isfinite([*weights, scale])):
    raise ValueError(f"weights {weights} and scale {scale} must be finite numbers")
  if method.endswith("ties") and min(weights) <= 0:
    raise ValueError(f"{method} weighs the runs inside a mean: weights must be positive, got "
                     f"{weights} (scale sets the size of the change)")
  want, bodies = export.body(base), [export.body(params) for _, params in items]
  for i, body in enumerate(bodies):
    try:
      checkpoints.check_tree(want, body)
    except ValueError as e:
      raise ValueError(f"item {i} does not fit the base's tree: {e}") from None

  def changes(path):  # (base, [tau_i]) of one tensor, float64
    b = np.asarray(want[path], np.float64)
    return b, [np.asarray(body[path], np.float64) - b for body in bodies]

  cutoffs = [None] * len(items)  # per tensor; a global trim keeps |tau_i| >= cutoffs[i]
  if trim == "global":
    magnitudes = [[] for _ in items]
    for path in want:
      for m, t in zip(magnitudes, changes(path)[1], strict=True):
        m.append(np.abs(t).ravel())
    cutoffs = [_cutoff(np.concatenate(m), density) for m in magnitudes]
  out = {}
  for path in want:
    b, taus = changes(path)
    if method.startswith("dare"):
      keep = [np.random.default_rng([seed, i, zlib.crc32(path.encode())]).random(t.shape)
              < density for i, t in enumerate(taus)]
      taus = [t * k / density for t, k in zip(taus, keep, strict=True)]
    if method == "ties":
      taus = [_largest(t, density) if c is None else np.where(np.abs(t) >= c, t, 0.0)
              for t, c in zip(taus, cutoffs, strict=True)]
    change = (_sign_elected_mean(taus, weights) if method.endswith("ties") else
              sum(w * t for w, t in zip(weights, taus, strict=True)))
    out[path] = (b + scale * change).astype(np.float32)
  out.update({f"{HEAD}/{k}": v for k, v in _flat(_choose_head(items, head)).items()})
  return traverse_util.unflatten_dict(out, sep="/")


def _kept(size: int, density: float) -> int:
  return int(np.ceil(density * size))


def _cutoff(magnitudes: np.ndarray, density: float) -> float:
  """The smallest of the ceil(density * size) largest ``magnitudes`` (ties at it are kept)."""
  k = magnitudes.size - _kept(magnitudes.size, density)
  return float(np.partition(magnitudes, k)[k])


def _largest(t: np.ndarray, density: float) -> np.ndarray:
  """``t`` with all but its ceil(density * size) largest magnitudes set to 0."""
  keep = _kept(t.size, density)
  flat = t.ravel()
  out = np.zeros_like(flat)
  top = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
  out[top] = flat[top]
  return out.reshape(t.shape)


def _sign_elected_mean(taus: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
  """Per entry: the ``weights``-weighted mean of the non-zero values whose sign is that of
  their weighted sum (0 where none)."""
  stacked = np.stack(taus)
  w = np.asarray(weights, np.float64).reshape(-1, *[1] * (stacked.ndim - 1))
  agree = (np.sign(stacked) == np.sign((w * stacked).sum(0))) & (stacked != 0)
  total = (w * agree).sum(0)
  return np.where(total > 0, (w * stacked * agree).sum(0) / np.where(total > 0, total, 1), 0.0)


def _choose_head(items, head) -> dict:
  heads = [p.get(HEAD) for _, p in items]
  if head is None:
    return {}
  if head != "mean":
    if not isinstance(head, int) or not 0 <= head < len(items):
      raise ValueError(f"head={head!r}; expected 'mean', None or an item index 0..{len(items) - 1}")
    if heads[head] is None:
      raise ValueError(f"head={head}: item {head} has no head")
    return {k: np.asarray(v, np.float32) for k, v in heads[head].items()}
  shapes = [None if h is None else {k: np.shape(v) for k, v in h.items()} for h in heads]
  if any(s != shapes[0] for s in shapes) or shapes[0] is None:
    raise ValueError(f"head='mean' needs heads of one shape in every item; got {shapes} (choose "
                     "one item's head, or none)")
  weight = sum(w for w, _ in items)
  if abs(weight) <= 1e-6 * sum(abs(w) for w, _ in items):
    raise ValueError(f"head='mean' divides by the weights' sum, {weight:g} here (choose one "
                     "item's head, or none)")
  return {k: (sum(w * np.asarray(p[HEAD][k], np.float64) for w, p in items) / weight
              ).astype(np.float32) for k in heads[0]}


def _same_base(ref: checkpoints.Pretrained, other: checkpoints.Pretrained) -> str | None:
  """What differs between two bases (the heads aside), or None."""
  for field in ("model", "mean", "std"):
    if getattr(ref, field) != getattr(other, field):
      return f"{field} {getattr(ref, field)} vs {getattr(other, field)}"
  a, b = export.body(ref.params), export.body(other.params)
  if a.keys() != b.keys():
    return f"params {sorted(a.keys() ^ b.keys())[:3]} in only one"
  for path in sorted(a):
    if np.shape(a[path]) != np.shape(b[path]) or not np.array_equal(a[path], b[path]):
      return f"param {path}"
  return None


def merge_runs(runs: Sequence[Run], weights: Sequence[float], *,
               head: str | int | None = "mean", **merge) -> checkpoints.Pretrained:
  """``task_sum`` of finished runs over their common base, as a plain checkpoint; ``merge``:
  ``task_sum``'s method, density, scale, seed and trim.

  Each run's base is rebuilt from its config as the run built it; runs from different bases
  (checkpoint, image size, pooling, normalisation, a random backbone's seed) are refused, and so
  is a run whose rebuilt base differs from its merged export where the run changed nothing (its
  config names another base than it was trained from, say a checkpoint file since replaced; a
  full fine-tune changes every param, so its base is compared with the other runs' only).
  """
  if len(runs) != len(weights):
    raise ValueError(f"{len(runs)} runs but {len(weights)} weights")
  base = None
  for run in runs:
    pre = (run.base if run.base is not None
           else export.run_model(run.workdir, run.config, run.merged.params)[1])
    if base is None:
      base = pre
    elif (diff := _same_base(base, pre)) is not None:
      raise ValueError(f"{run.workdir} and {runs[0].workdir} were fine-tuned from different "
                       f"bases: {diff}")
  params = task_sum(base.params, [(w, r.merged.params) for w, r in zip(weights, runs, strict=True)],
                    head=head, **merge)
  terms = ", ".join(f"{w:g} * {r.workdir}" for w, r in zip(weights, runs, strict=True))
  how = ", ".join(f"{k}={v}" for k, v in sorted(merge.items()))
  return dataclasses.replace(base, params=params,
                             source=f"merge of runs ({how or 'method=sum'}): {terms}")


def with_head(pre: checkpoints.Pretrained, run: Run) -> checkpoints.Pretrained:
  """``pre`` with ``run``'s own head (its merged export's)."""
  return dataclasses.replace(pre, params={**pre.params, HEAD: run.merged.params[HEAD]})


def _parse(text: str) -> tuple[str, float]:
  """"RUN[:WEIGHT]" -> (RUN, weight); the weight defaults to 1 (also for an existing directory
  whose name ends in ":digits")."""
  path, sep, weight = text.rpartition(":")
  if not sep or pathlib.Path(text).expanduser().is_dir():
    return text, 1.0
  try:
    return path, float(weight)
  except ValueError:
    return text, 1.0


# TIES-merging's paper keeps the top 20%; for DARE, half (its paper drops 10% to 99%)
_DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5, "dare_ties": 0.5}


def main(argv: Sequence[str] | None = None) -> None:
  """Writes the task sum of finished runs; ``argv`` without the program name."""
  p = argparse.ArgumentParser(prog="python -m hydra_jax.merge", description=__doc__.split(
      "\n\n")[0].replace("\n", " "))
  p.add_argument("out", help="the .safetensors file to write (replaced atomically)")
  p.add_argument("runs", nargs="+", metavar="RUN[:WEIGHT]",
                 help="a finished run's workdir and its weight (default 1)")
  p.add_argument("--head", default="mean", help="'mean' (the weighted mean of the runs' heads), "
                 "'none', or one of the RUN workdirs (its head as it is)")
  p.add_argument("--method", default="sum", choices=METHODS, help="sum (task arithmetic), "
                 "ties, dare or dare_ties (see task_sum)")
  p.add_argument("--density", type=float, default=None, help="ties / dare: the share of each "
                 "run's change kept (default 0.2 for ties, 0.5 for dare)")
  p.add_argument("--scale", type=float, default=1.0, help="multiplies the merged change (TIES' "
                 "lambda)")
  p.add_argument("--seed", type=int, default=0, help="dare: the seed of the random drop")
  p.add_argument("--trim", default="tensor", choices=TRIMS, help="ties: keep the largest "
                 "changes of each tensor (mergekit, PEFT) or of each run's whole task vector "
                 "(TIES' paper)")
  p.add_argument("--eval", action="store_true", help="score the result on each run's "
                 "validation and test splits and print a JSON line per run")
  p.add_argument("--routing-images", type=int, default=None, help="merge HydraLoRA runs with "
                 "each layer's mean routing over this many of their training images (their "
                 "router depends on the input; the fixed routing costs accuracy)")
  args = p.parse_args(argv)
  try:
    _merge(args)
  except (ValueError, OSError) as e:  # refusals and bad paths name the reason
    p.error(str(e))


def _on_one_device(config) -> ml_collections.ConfigDict:
  """``config`` run on one device: the run's own mesh (its device count, FSDP) need not exist
  where its runs are merged."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.parallel.num_devices, config.parallel.fsdp = 1, False
  return config


def _merge(args: argparse.Namespace) -> None:
  parsed = [_parse(r) for r in args.runs]
  if args.routing_images is not None and args.routing_images < 1:
    raise ValueError(f"--routing-images {args.routing_images}; expected a count >= 1")
  runs = [load_run(path, routing_images=args.routing_images) for path, _ in parsed]
  head: str | int | None = {"mean": "mean", "none": None}.get(args.head, args.head)
  if head not in ("mean", None):
    dirs = [r.workdir.resolve() for r in runs]
    given = pathlib.Path(args.head).expanduser().resolve()
    if given not in dirs:
      raise ValueError(f"--head {args.head}: expected 'mean', 'none' or one of the runs "
                       f"{[str(r.workdir) for r in runs]}")
    head = dirs.index(given)
  how = {"method": args.method}
  density = args.density if args.density is not None else _DEFAULT_DENSITY.get(args.method)
  if density is not None:
    how["density"] = density
  if args.scale != 1:
    how["scale"] = args.scale
  if args.method.startswith("dare"):
    how["seed"] = args.seed
  if args.trim != "tensor":
    how["trim"] = args.trim
  merged = merge_runs(runs, [w for _, w in parsed], head=head, **how)
  checkpoints.save(args.out, merged)
  print(json.dumps({"wrote": str(args.out), "source": merged.source}))
  if args.eval:
    scored: dict[str, dict] = {}  # with one head for all, runs of one dataset score alike
    for run, (_, weight) in zip(runs, parsed, strict=True):
      own = json.loads((run.workdir / "results.json").read_text()) if (
          run.workdir / "results.json").is_file() else {}
      key = json.dumps([run.config.data.to_dict(), str(build.runtime_fields(run.config))],
                       sort_keys=True)
      if head != "mean" or key not in scored:
        scored[key] = evaluate.evaluate_pretrained(
            _on_one_device(run.config), merged if head == "mean" else with_head(merged, run))
      scores = scored[key]
      print(json.dumps({"run": str(run.workdir), "weight": weight, **scores,
                        **{f"run_{k}": own[k] for k in ("val_accuracy", "test_accuracy")
                           if k in own}}))


if __name__ == "__main__":
  main()
