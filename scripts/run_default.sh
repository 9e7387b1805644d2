#!/usr/bin/env bash
# Sets up and runs the offline default fine-tune: Hydra on the bundled pre-trained ViT-S/14,
# Fashion-MNIST in the VTAB-1k protocol; prints the merged model's test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train.py --config configs/default.py --workdir "${WORKDIR:-workdir/default}" "$@"
