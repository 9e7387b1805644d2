"""What a trained adapter learned: ``report.md``, ``analysis.json`` and plots for one run.

  python -m hydra_jax.analyze --workdir /tmp/hydra_default
  python -m hydra_jax.analyze --workdir /tmp/hydra_default --num_examples 200 --out /tmp/report

Per adapted layer: branch norms (weights and outputs), dW spectra and effective rank, alignment
with the frozen W's singular subspaces, parallel vs sequential output similarity (cosine, CKA),
accuracy with branches switched off, and HydraLoRA's router usage. See ``hydra_jax.analysis``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from hydra_jax.analysis import report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m hydra_jax.analyze",
                              description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="workdir of a finished training run")
  p.add_argument("--num_examples", type=int, default=500,
                 help="test images for output statistics and ablations (default 500)")
  p.add_argument("--out", default=None, help="where report.md, analysis.json and plots/ go "
                 "(default: the workdir)")
  p.add_argument("--top_fraction", type=float, default=0.1,
                 help="W's top-k subspaces keep this fraction of min(d_in, d_out) directions")
  args = p.parse_args(argv)
  if args.num_examples < 1:
    p.error(f"--num_examples must be >= 1; got {args.num_examples}")
  if not 0 < args.top_fraction <= 1:  # checked before the run loads
    p.error(f"--top_fraction must be in (0, 1]; got {args.top_fraction}")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the analysis; ``argv`` without the program name (None: sys.argv[1:])."""
  args = parse_args(argv)
  logging.basicConfig()  # a no-op where a handler exists already (absl's)
  logging.getLogger("hydra_jax").setLevel(logging.INFO)
  path = report.analyze(args.workdir, out=args.out, num_examples=args.num_examples,
                        top_fraction=args.top_fraction)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
