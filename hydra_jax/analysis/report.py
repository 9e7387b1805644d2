"""Runs the whole analysis on a trained run's workdir: ``analysis.json``, ``report.md``, PNGs.

A workdir (``hydra_jax.loop.train_and_evaluate``) holds config.json, results.json and
export/adapters.safetensors (trained adapters + head, and the spec). The frozen backbone is
rebuilt from the config exactly as training built it (same seed), and checked against the run's
merged export where there is one (``export.run_model``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from hydra_jax import adapters as adapters_lib
from hydra_jax import data, export, optim, train_lib
from hydra_jax.adapters import kinds, transform
from hydra_jax.adapters.spec import AdapterSpec
from hydra_jax.analysis import activations, markdown, plots, weights
from hydra_jax.build import open_source, run_config

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """A trained run, ready to analyse."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: Any
  pre: Any  # checkpoints.Pretrained (mean / std for the data)
  params: dict  # frozen backbone joined with the trained params (head)
  adapters: dict
  spec: AdapterSpec
  results: dict


def load_run(workdir: str | pathlib.Path) -> Run:
  """Reads a workdir and rebuilds the frozen model the run trained against."""
  workdir = pathlib.Path(workdir)
  exported = workdir / "export" / "adapters.safetensors"
  for need in (workdir / "config.json", exported):
    if not need.exists():
      raise FileNotFoundError(f"{need} is missing; is {workdir} the workdir of a finished "
                              "adapter run (config.adapter.kind != 'none', config.export)?")
  config = run_config(workdir)
  trainable, spec = export.load_adapters(exported)
  model, pre = export.run_model(workdir, config)
  _, frozen = optim.split(pre.params, list(config.train_patterns))
  params = optim.join(trainable["params"], frozen)
  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  return Run(workdir, config, model, pre, params, trainable["adapters"], spec, results)


def eval_data(run: Run, num_examples: int,
              split: str | None = None) -> list[dict[str, np.ndarray]]:
  """The first ``num_examples`` images of ``split`` (the test split by default) as padded
  batches (held in memory, reused)."""
  cfg = run.config.data
  source = open_source(cfg, split or cfg.test_split)
  return list(data.eval_batches(source, batch_size=min(cfg.eval_batch_size, num_examples),
                                image_size=run.config.model.image_size,
                                num_classes=cfg.num_classes, limit=num_examples))


def branch_names(run: Run) -> list[str]:
  """The adapter's branches, as ``kinds.outputs`` names them."""
  _, f = next(transform.factor_dicts(run.adapters))
  return list(kinds.branch_names(run.spec, f))


def _router(run: Run, layers: list[dict], stats: dict) -> dict[str, Any]:
  """HydraLoRA: usage per head per layer and per class, routing entropy, head similarity."""
  usage, per_class = [], []
  for row in layers:
    s = stats[row["name"]]
    u, c = activations.router_usage(s["routing"], s["labels"], run.config.data.num_classes)
    row["router_usage"], row["router_per_class"] = u.tolist(), c.tolist()
    row["router_entropy"] = float(np.mean(s["entropy"]))
    usage.append(u)
    per_class.append(c)
  return {"usage": np.stack(usage), "per_class": np.nanmean(np.stack(per_class), 0)}


def mean_routing(run: Run, num_examples: int) -> tuple[dict[str, np.ndarray], int]:
  """A HydraLoRA run's mean routing weights per layer ({layer path: (N,)}) over the first
  ``num_examples`` training images (an input-independent stand-in for the router, which
  ``adapters.merge(..., routing=...)`` folds into a plain ViT), and the images seen."""
  if run.spec.kind != "hydralora":
    raise ValueError(f"{run.workdir} is a {run.spec.kind!r} run: only HydraLoRA has a router")
  train = eval_data(run, num_examples, run.config.data.train_split)
  stats = activations.output_stats(run.model, run.params, run.adapters, run.spec, train)
  return ({name: np.mean(s["routing"], 0) for name, s in stats.items()},
          int(sum(np.sum(b["mask"]) for b in train)))


def fixed_routing(run: Run, test_batches, num_examples: int) -> dict[str, Any]:
  """HydraLoRA merged into a plain ViT with ``mean_routing`` over ``num_examples`` training
  images, and that model's accuracy on ``test_batches``."""
  routing, seen = mean_routing(run, num_examples)
  merged = adapters_lib.merge(run.params, run.adapters, run.spec, routing=routing)
  apply = jax.jit(lambda p, x: run.model.apply({"params": p}, x))
  accuracy = train_lib.evaluate(lambda b: apply(merged, b["image"]), iter(test_batches))
  return {"images": seen, "accuracy": accuracy,
          "routing": {k: v.tolist() for k, v in routing.items()}}


def analyze(workdir: str | pathlib.Path, *, out: str | pathlib.Path | None = None,
            num_examples: int = 500, top_fraction: float = 0.1) -> pathlib.Path:
  """Analyses a run and writes ``report.md``, ``analysis.json`` and ``plots/*.png`` to ``out``.

  Args:
    workdir: the run's workdir.
    out: output folder (None: the workdir).
    num_examples: test images for the data-dependent numbers and the ablations.
    top_fraction: W's top-k subspaces keep this fraction of min(d_in, d_out) directions.

  Returns:
    the path of report.md.
  """
  run = load_run(workdir)
  out = pathlib.Path(out) if out is not None else run.workdir
  out.mkdir(parents=True, exist_ok=True)
  _LOG.info("analysing %s (%s) on %d test images", run.workdir, run.spec.kind, num_examples)
  batches = eval_data(run, num_examples)
  stats = activations.output_stats(run.model, run.params, run.adapters, run.spec, batches)
  head_order, saved = None, run  # fixed routing is reported for the adapters as saved
  if run.spec.kind == "hydralora":  # comparable across layers by rank, not by number
    sorted_adapters, stats, head_order = activations.heads_by_usage(run.adapters, stats)
    run = dataclasses.replace(run, adapters=sorted_adapters)
  _LOG.info("branch outputs on data done; weight-space analysis")
  layers = weights.analyze_weights(run.params, run.adapters, run.spec, top_fraction=top_fraction)
  for row in layers:
    if head_order is not None:
      row["head_order"] = head_order[row["name"]]
    s = stats[row["name"]]
    row["output_norm"] = s["output_norm"]
    row.update({k: s[k] for k in ("cosine", "cka", "cosine_of_means") if k in s})
  depth = sum(k.startswith("encoderblock_") for k in run.params.get("Transformer", {}))
  plans = activations.ablation_plans([r["name"] for r in layers], run.spec, branch_names(run),
                                     depth, weights.layer_info)
  ablation = activations.run_ablations(run.model, run.params, run.adapters, run.spec, batches,
                                       plans)
  _LOG.info("%d ablations done; plots and report", len(ablation))
  router = _router(run, layers, stats) if run.spec.kind == "hydralora" else None
  if router is not None:  # the first ablation row is the model with its router, unablated
    router["fixed"] = {**fixed_routing(saved, batches, num_examples),
                       "router_accuracy": ablation[0]["accuracy"]}
  figures = _figures(run, layers, ablation, router, out / markdown.PLOT_DIR)
  num_seen = int(sum(np.sum(b["mask"]) for b in batches))
  summary = {"workdir": str(run.workdir), "kind": run.spec.kind,
             "spec": dataclasses.asdict(run.spec), "results": run.results,
             "num_examples": num_seen, "top_fraction": top_fraction, "layers": layers,
             "ablation": ablation,
             "fixed_routing": None if router is None else router["fixed"]}
  plain = _finite(json.loads(json.dumps(summary, default=_jsonable)))
  (out / "analysis.json").write_text(json.dumps(plain, indent=1, allow_nan=False))
  text = markdown.report(summary, figures, router)
  path = out / "report.md"
  path.write_text(text)
  return path


def _figures(run: Run, layers, ablation, router, plot_dir: pathlib.Path) -> dict[str, str]:
  figs = {"spectra": plots.spectra(layers, plot_dir), "energy": plots.energy(layers, plot_dir),
          "ablation": plots.ablation(ablation, plot_dir)}
  if run.spec.kind == "hydra":
    figs["similarity"] = plots.similarity([r for r in layers if r["block"] is not None],
                                          plot_dir)
  figs["norms"] = plots.norms(layers, plot_dir)
  if router is not None:
    names = [_short(r) for r in layers]
    figs["router_usage"] = plots.heatmap(router["usage"], plot_dir, "router_usage.png",
                                         title="mean routing weight per head", ylabels=names)
    figs["router_class"] = plots.heatmap(
        router["per_class"], plot_dir, "router_per_class.png",
        title="mean routing weight per head (by usage rank) by true class, mean over layers",
        ylabels=[str(c) for c in range(router["per_class"].shape[0])])
  return figs


def _short(row: dict) -> str:
  return row["name"] if row["block"] is None else f"{row['block']} {row['type']}"


def _finite(x):
  """``x`` (JSON types) with NaN and inf numbers (an untrained branch's angles, a class absent
  from the images) as None: null in strict JSON, which has no NaN."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite(v) for v in x]
  return x


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (frozenset, set, tuple)):
    return list(x)
  raise TypeError(f"cannot write {type(x).__name__} to analysis.json")
