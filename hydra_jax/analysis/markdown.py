"""report.md: a header, one section (explanation, table, figure) per metric group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hydra_jax.adapters.spec import fields_read

PLOT_DIR = "plots"


def _f(v: Any) -> str:
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return "-"
  if isinstance(v, (int, np.integer)):
    return str(v)
  return f"{v:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; floats to 3 significant digits, None / NaN as "-"."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _image(figures: Mapping[str, str], key: str, alt: str) -> str:
  return f"![{alt}]({PLOT_DIR}/{figures[key]})" if key in figures else ""


def _layer(row: Mapping) -> str:
  return row["name"] if row["block"] is None else f"{row['block']} {row['type']}"


def _header(s: Mapping) -> str:
  res, spec = s["results"], s["spec"]
  fields = ", ".join(f"{k}={spec[k]}" for k in fields_read(s["kind"])
                     if k not in ("kind", "targets"))
  lines = [f"# Adapter analysis: `{s['workdir']}`", "",
           f"- kind: **{s['kind']}** ({fields})",
           f"- test accuracy (results.json, {res.get('model', '?')} model): "
           f"**{_f(res.get('test_accuracy'))}** after {res.get('steps', '?')} steps",
           f"- analysed on the first {s['num_examples']} test images; full adapted model there: "
           f"{_f(s['ablation'][0]['accuracy'])}",
           f"- W's top-k subspaces: k = {s['top_fraction']:g} x min(d_in, d_out) directions",
           "- kernels are read as (d_in, d_out) matrices (y = x @ W; attention kernels flattened); "
           "**left = input side** (column space, R^d_in), **right = output side** (row space, "
           "R^d_out)."]
  return "\n".join(lines)


def _norms(layers, figures) -> str:
  branches = list(layers[0]["branches"])
  header = ["layer", "‖W‖"] + [f"‖dW {b}‖" for b in branches]
  header += [f"out {b}" for b in branches]
  pair = branches == ["parallel", "sequential"]
  if pair:
    header += ["dW par/seq", "out par/seq"]
  rows = []
  for r in layers:
    dws = [r["branches"][b]["norm"] for b in branches]
    outs = [r["output_norm"].get(b) for b in branches]
    row = [_layer(r), r["w_norm"], *dws, *outs]
    if pair:
      row += [dws[0] / dws[1] if dws[1] else None, outs[0] / outs[1] if outs[1] else None]
    rows.append(row)
  return "\n\n".join([
      "## 1. Norms", "‖dW‖ is the Frobenius norm of each branch's weight change (Hydra: "
      "dW_par = s A_p B_p, dW_seq = s W A_s B_s); \"out\" is the mean over test tokens of the "
      "L2 norm of the branch's output (factor biases included).",
      table(header, rows), _image(figures, "norms", "norms vs depth")])


def _spectra(layers, figures) -> str:
  rows = []
  for r in layers:
    for b, v in r["branches"].items():
      s = v["singular_values"] + [None] * 4
      rows.append([_layer(r), b, *s[:4], v["effective_rank"]])
  return "\n\n".join([
      "## 2. Spectra", "Singular values of each branch's dW and its effective rank "
      "exp(H(p)), p = s / sum(s) (Roy & Vetterli 2007): 1 for a rank-one change, r for r equal "
      "singular values.",
      table(["layer", "branch", "s1", "s2", "s3", "s4", "eff. rank"], rows),
      _image(figures, "spectra", "spectra and effective rank")])


def _alignment(layers, figures) -> str:
  rows = [[_layer(r), b, r["k"], v["energy_left"], r["baseline_left"], r["w_energy"],
           v["energy_right"], r["baseline_right"], v["energy_range_w"], v["angle_min"],
           v["angle_mean"]] for r in layers for b, v in r["branches"].items()]
  text = (
      "Fraction of ‖dW‖^2 inside W's top-k singular subspaces: left = ‖U_k U_k^T dW‖^2 / "
      "‖dW‖^2 (input side), right = ‖dW V_k V_k^T‖^2 / ‖dW‖^2 (output side). A random dW "
      "scores k/d; a change W M with isotropic random M scores W's own share (\"W top-k\" = "
      "sum_{i<=k} s_i^2 / sum s_i^2) on the left. \"in range(W)\" is the left energy in all of "
      "range(W): dW_seq = s W A_s B_s always scores 1 there (its column space lies in range(W)); "
      "it is only informative where rank(W) < d_in (MLP Dense_1). Angles: principal angles "
      "(degrees) between dW's column space and W's top-k left subspace (0: shared direction, "
      "90: orthogonal).")
  header = ["layer", "branch", "k", "left", "k/d_in", "W top-k", "right", "k/d_out",
            "in range(W)", "min angle", "mean angle"]
  return "\n\n".join(["## 3. Alignment with the frozen W", text, table(header, rows),
                      _image(figures, "energy", "subspace energy")])


def _similarity(layers, figures) -> str:
  if "cosine" not in layers[0]:
    return ("## 4. Branch similarity\n\nSkipped: needs both Hydra branches (parallel and "
            "sequential) in one layer; this adapter has "
            f"{', '.join(layers[0]['branches'])}.")
  rows = [[_layer(r), r["cosine"], r["cosine_of_means"], r["cka"]] for r in layers]
  return "\n\n".join([
      "## 4. Branch similarity", "Mean per-token cosine between the parallel and the sequential "
      "branch outputs; the cosine of their mean outputs (the constant part, e.g. factor "
      "biases, which can dominate the per-token cosine); and linear CKA (Kornblith et al. "
      "2019) of the two (tokens x d_out) outputs, centred, so it compares only what varies "
      "from token to token (1: the same representation up to rotation and scale; near 0: "
      "unrelated).",
      table(["layer", "cosine", "cosine of means", "linear CKA"], rows),
      _image(figures, "similarity", "branch similarity vs depth")])


def _ablation(rows, figures) -> str:
  full = rows[0]["accuracy"]
  body = [[r["label"], r["layers"], r["accuracy"], r["accuracy"] - full] for r in rows]
  return "\n\n".join([
      "## 5. Branch ablation", "Test accuracy with a branch switched off (its up-projection "
      "and output bias zeroed, which removes exactly its contribution) in a group of layers.",
      table(["ablation", "layers", "accuracy", "change"], body),
      _image(figures, "ablation", "ablation")])


def _router(layers, figures, router, top_k) -> str:
  if router is None:
    return "## 6. HydraLoRA router\n\nSkipped: this adapter has no router (not hydralora)."
  n = len(layers[0]["router_usage"])
  rows = []
  for r in layers:
    sim = np.asarray(r["head_similarity"])
    off = sim[~np.eye(n, dtype=bool)].mean() if n > 1 else None
    rows.append([_layer(r), *r["router_usage"], r["router_entropy"], off])
  per_class = [[str(c), *row] for c, row in enumerate(router["per_class"])]
  heads = [f"head {i}" for i in range(n)]
  fixed = router["fixed"]
  return "\n\n".join([
      "## 6. HydraLoRA router", "Each layer's heads are numbered here by their mean routing "
      "weight, most used first (head 0): a layer's own numbering is arbitrary (permuting its "
      "B_i with its router's columns is the same model), so only ranks compare across layers; "
      "analysis.json's `head_order` gives each layer's saved head numbers in this order, and "
      "section 5's `head_i off, all` switches off each layer's i-th most used head. "
      "Mean routing weight per head (over test tokens; the weights applied"
      + (", after top_k=1: the winning head's own probability, so a row sums to less than 1"
         if top_k == 1 else f", after top_k={top_k}" if top_k else "")
      + "), mean per-token entropy of the router's probabilities "
      "(ln N = uniform), and the mean cosine between the heads' flattened dW_i = A B_i.",
      table(["layer", *heads, "entropy", "head cos"], rows),
      f"Merged with each layer's mean routing weights over {fixed['images']} training images "
      "(fixed weights instead of the router: a plain ViT at the base model's cost), the model "
      f"scores {fixed['accuracy']:.4f} on these test images; with its router, "
      f"{fixed['router_accuracy']:.4f}.",
      _image(figures, "router_usage", "router usage"),
      "Mean routing weight of each layer's i-th most used head for each true class "
      "(averaged over layers):",
      table(["class", *heads], per_class),
      _image(figures, "router_class", "router usage per class")])


def report(summary: Mapping, figures: Mapping[str, str], router: Mapping | None) -> str:
  """The whole report.md text.

  Args:
    summary: analysis.json's content (header fields, "layers", "ablation").
    figures: {figure key: PNG file name under plots/}.
    router: HydraLoRA {"usage": (L, N), "per_class": (C, N)}, or None.
  """
  layers = summary["layers"]
  parts = [_header(summary), _norms(layers, figures), _spectra(layers, figures),
           _alignment(layers, figures), _similarity(layers, figures),
           _ablation(summary["ablation"], figures),
           _router(layers, figures, router, summary["spec"].get("top_k"))]
  return "\n\n".join(parts) + "\n"
