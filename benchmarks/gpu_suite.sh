#!/usr/bin/env bash
# One device call: hydra_jax.bench and the PyTorch baselines on the same shapes
# (ViT-B/16, 224 px, batch 128, bf16). Writes JSON lines under $OUT.
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"
python3 -m hydra_jax.bench --model B/16 --batch 128 --attention cudnn \
  --adapters hydra,lora,hydralora,full,linear,hydra_dropout | tee "$OUT/jax_cudnn.jsonl"
python3 -m hydra_jax.bench --model B/16 --batch 128 --attention xla --adapters hydra,lora \
  | tee "$OUT/jax_xla.jsonl"
python3 benchmarks/torch_baselines.py --dropout 0 \
  --configs hydra:eager,hydra:compile,lora:compile,full:eager,linear:eager | tee "$OUT/torch.jsonl"
