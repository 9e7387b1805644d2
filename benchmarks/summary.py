"""One line per result row of a GPU call's $OUT folder (what its reply's output tail shows).

  python3 benchmarks/summary.py OUT [NAME ...]

Reads every OUT/*.jsonl (bench, torch_baselines and profile_step rows), labelled by file name;
error rows and lines that are not JSON are reported, never a crash. Each NAME is a file the call
meant to write (e.g. ``new`` for new.jsonl): a missing or empty one is reported with the .err
file to read. Standalone: no hydra_jax import.
"""

from __future__ import annotations

import json
import pathlib
import sys


def _label(path: pathlib.Path, r: dict) -> str:
  """The file's stem, framework, adapter, then the shape and whatever differs from the suite's
  setting (bf16, cuDNN attention, no remat, exact GELU, one microbatch, no augmentation)."""
  flag = r.get("xla_flags", "").split()[-1:]
  extra = [f"{r['model']}x{r['batch']}" if "model" in r and "batch" in r else "",
           *(f for f in flag if "device_count" not in f),
           f"remat={r['remat']}" if r.get("remat", "none") not in ("none", False) else "",
           "tanh" if r.get("gelu_approximate") else "", "compile" if r.get("compile") else "",
           r.get("compute", ""), f"mb={r['microbatches']}" if r.get("microbatches", 1) > 1 else "",
           "augment" if r.get("augment") else "",
           r["attention"] if r.get("attention", "cudnn") not in ("cudnn", "auto") else "",
           r["dtype"] if r.get("dtype", "bfloat16") != "bfloat16" else ""]
  return " ".join(x for x in (f"{path.stem:10}", r.get("framework", ""),
                              str(r.get("adapter", r.get("check", ""))), *extra) if x)


def row_line(path: pathlib.Path, r: dict) -> list[str]:
  """The summary lines of one row."""
  name = _label(path, r)
  if "error" in r:
    return [" ".join(x for x in (name, r.get("timing", ""), "ERROR", str(r["error"])[:160]) if x)]
  if r.get("timing") == "infer":
    return [f"{name} infer merged/plain {r['infer_merged_over_plain']:.3f} "
            f"{r['infer_merged_img_per_s']:.0f} {r['infer_plain_img_per_s']:.0f} img/s"]
  if "img_per_s" in r:
    return [f"{name} {r['img_per_s']:.0f} img/s {r.get('step_ms') or 0:.1f} ms "
            f"peak {r.get('peak_mem_gib') or 0:.2f} GiB"]
  if "device_ms_per_step" in r:
    kinds = {k: round(v, 2) for k, v in r["by_kind_ms"].items()}
    return [f"{name} {r['device_ms_per_step']:.2f} ms/step {kinds}",
            *(f"  {ms:7.3f} {kernel[:100]}" for kernel, ms in r["top_kernels_ms"][:14])]
  return []


def summary(out: pathlib.Path, expected: list[str]) -> list[str]:
  lines = [f"{name}.jsonl: no output (see {name}.err or err.log)" for name in expected
           if not (out / f"{name}.jsonl").is_file()
           or not (out / f"{name}.jsonl").read_text().strip()]
  for path in sorted(out.glob("*.jsonl")):
    for text in path.read_text().splitlines():
      try:
        row = json.loads(text)
      except json.JSONDecodeError:
        lines.append(f"{path.name}: not JSON: {text[:100]}")
        continue
      if isinstance(row, dict):
        lines += row_line(path, row)
  return lines


if __name__ == "__main__":
  print("\n".join(summary(pathlib.Path(sys.argv[1]), sys.argv[2:])))
