#!/usr/bin/env bash
# One device call: hydra_jax.bench and the PyTorch baselines on the same shapes
# (ViT-B/16, 224 px, batch 128, bf16). Writes JSON lines under $OUT.
#   bash benchmarks/gpu_suite.sh
# Sized for one 10-minute call on a cold machine (the parts' timeouts sum to 555 s): each part
# has its own timeout, so a slow compile costs that part's rows, not the rest.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT" .jcache
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
  JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch, timm, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
B="-m hydra_jax.bench --model B/16 --batch 128 --attention cudnn"
t0=$SECONDS
# merged-vs-plain inference on the Hydra row only (LoRA's merged model is the same plain ViT)
timeout 120 python3 $B --adapters hydra > "$OUT/jax_cudnn.jsonl" 2> "$OUT/jax.err"
timeout 160 python3 $B --adapters lora,hydralora,full,linear --no_infer >> "$OUT/jax_cudnn.jsonl" \
  2>> "$OUT/jax.err"; echo "jax: $((SECONDS - t0)) s"
timeout 60 python3 $B --adapters hydra,lora --gelu_approximate --no_infer \
  > "$OUT/jax_cudnn_gelu_tanh.jsonl" 2> "$OUT/jax_tanh.err"; echo "jax tanh: $((SECONDS - t0)) s"
timeout 215 python3 benchmarks/torch_baselines.py --dropout 0 \
  --configs hydra:eager,hydra:compile,lora:compile,full:eager,linear:eager > "$OUT/torch.jsonl" \
  2> "$OUT/torch.err"; echo "torch: $((SECONDS - t0)) s"
tail -n 2 "$OUT"/*.err; cut -c1-400 "$OUT"/*.jsonl
