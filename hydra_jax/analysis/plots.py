"""The report's figures (matplotlib, Agg backend: no display needed). Each returns its file name."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hydra_jax.analysis.activations import PAIR  # noqa: E402


def _save(fig, out_dir: pathlib.Path, name: str) -> str:
  out_dir.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(out_dir / name, dpi=110)
  plt.close(fig)
  return name


def _series(layers: Sequence[Mapping], value) -> dict[str, tuple[list, list]]:
  """{"type branch": (blocks, values)} for every (layer type, branch) with a value."""
  out: dict[str, tuple[list, list]] = {}
  for row in layers:
    for branch in row["branches"]:
      v = value(row, branch)
      if v is not None and row["block"] is not None:
        xs, ys = out.setdefault(f"{row['type']} {branch}", ([], []))
        xs.append(row["block"])
        ys.append(v)
  return out


def _lines(ax, series: Mapping, *, title: str, ylabel: str, logy: bool = False):
  for label, (xs, ys) in sorted(series.items()):
    order = np.argsort(xs)
    ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", label=label)
  ax.set(title=title, xlabel="block", ylabel=ylabel)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if logy:
    ax.set_yscale("log")
  if series:
    ax.legend(fontsize=7)


def _ratios(layers: Sequence[Mapping]) -> dict[str, tuple[list, list]]:
  """{"type what": (blocks, parallel / sequential)} for ||dW|| and the output norms."""
  out: dict[str, tuple[list, list]] = {}
  for row in layers:
    br, on = row["branches"], row.get("output_norm", {})
    if row["block"] is None or not all(b in br for b in PAIR):
      continue
    for what, num, den in (("||dW||", br["parallel"]["norm"], br["sequential"]["norm"]),
                           ("output", on.get("parallel"), on.get("sequential"))):
      if num is not None and den:
        xs, ys = out.setdefault(f"{row['type']} {what}", ([], []))
        xs.append(row["block"])
        ys.append(num / den)
  return out


def norms(layers: Sequence[Mapping], out_dir: pathlib.Path) -> str:
  """||dW|| and mean ||branch output|| per branch vs depth; Hydra: parallel / sequential ratios."""
  ratio = _ratios(layers)
  ncols = 3 if ratio else 2
  fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
  _lines(axes[0], _series(layers, lambda r, b: r["branches"][b]["norm"]),
         title="||dW||_F", ylabel="Frobenius norm", logy=True)
  _lines(axes[1], _series(layers, lambda r, b: r.get("output_norm", {}).get(b)),
         title="mean ||branch output|| per token", ylabel="L2 norm", logy=True)
  if ratio:
    _lines(axes[2], ratio, title="parallel / sequential", ylabel="ratio", logy=True)
    axes[2].axhline(1.0, color="gray", lw=0.8, ls="--")
  return _save(fig, out_dir, "norms_vs_depth.png")


def spectra(layers, out_dir: pathlib.Path) -> str:
  """Normalised singular values of every branch's dW, and its effective rank vs depth."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for row in layers:
    for branch, b in row["branches"].items():
      s = np.asarray(b["singular_values"][:16])
      if s.size and s[0] > 0:
        axes[0].plot(np.arange(1, s.size + 1), s / s[0], alpha=0.4,
                     color="C0" if branch in ("parallel", "lora") else "C1")
  axes[0].set(title="dW spectra (s_i / s_1; blue parallel/lora, orange others)", xlabel="i",
              yscale="log")
  _lines(axes[1], _series(layers, lambda r, b: r["branches"][b]["effective_rank"]),
         title="effective rank exp(H(s / sum s))", ylabel="effective rank")
  return _save(fig, out_dir, "effective_rank.png")


def energy(layers, out_dir: pathlib.Path) -> str:
  """Energy of each dW in W's top-k input (left) and output (right) subspaces vs depth."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, side, base in ((axes[0], "left", "baseline_left"), (axes[1], "right", "baseline_right")):
    _lines(ax, _series(layers, lambda r, b, s=side: r["branches"][b][f"energy_{s}"]),
           title=f"energy in W's top-k {'input' if side == 'left' else 'output'} subspace "
                 f"({side})", ylabel="fraction of ||dW||^2")
    by_type: dict[str, list] = {}
    for r in layers:
      if r["block"] is not None:
        by_type.setdefault(r["type"], []).append((r["block"], r[base]))
    for i, (kind, pts) in enumerate(sorted(by_type.items())):
      ax.plot(*zip(*sorted(set(pts)), strict=True), ":", color="k", lw=1 + i,
              label=f"random dW (k/d), {kind}")
    if by_type:
      ax.legend(fontsize=7)
    ax.set_ylim(0, 1.05)
  return _save(fig, out_dir, "subspace_energy.png")


def similarity(rows: Sequence[Mapping], out_dir: pathlib.Path) -> str:
  """Mean per-token cosine and linear CKA of the two Hydra branches' outputs vs depth."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for metric, style in (("cosine", "-o"), ("cka", "--s")):
    by_type: dict[str, list] = {}
    for r in rows:
      by_type.setdefault(r["type"], []).append((r["block"], r[metric]))
    for kind, pts in sorted(by_type.items()):
      pts.sort()
      ax.plot(*zip(*pts, strict=True), style, label=f"{metric} {kind}")
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set(title="parallel vs sequential branch outputs", xlabel="block", ylabel="similarity")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=7)
  return _save(fig, out_dir, "similarity_vs_depth.png")


def ablation(rows: Sequence[Mapping], out_dir: pathlib.Path) -> str:
  """Accuracy with branches switched off, one bar per ablation."""
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
  colors = ["gray" if r["branch"] == "none" else f"C{i % 10}" for i, r in enumerate(rows)]
  ax.bar(range(len(rows)), [r["accuracy"] for r in rows], color=colors)
  ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=60, ha="right", fontsize=7)
  ax.axhline(rows[0]["accuracy"], color="k", lw=0.8, ls="--")
  ax.set(title="branch ablation", ylabel="test accuracy", ylim=(0, 1))
  return _save(fig, out_dir, "ablation.png")


def heatmap(matrix, out_dir: pathlib.Path, name: str, *, title: str, ylabels: Sequence[str],
            xlabel: str = "head") -> str:
  """A (rows, N) heatmap of routing weights with the values written in the cells."""
  m = np.asarray(matrix, np.float64)
  fig, ax = plt.subplots(figsize=(2 + 0.8 * m.shape[1], 1.5 + 0.35 * m.shape[0]))
  im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=max(np.nanmax(m), 1e-9))
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
  ax.set_yticks(range(len(ylabels)), ylabels, fontsize=6)
  ax.set_xticks(range(m.shape[1]), [str(j) for j in range(m.shape[1])])
  ax.set(title=title, xlabel=xlabel)
  fig.colorbar(im, ax=ax)
  return _save(fig, out_dir, name)
