#!/usr/bin/env bash
# One device call: hydra_jax.bench and the PyTorch baselines on the same shapes
# (ViT-B/16, 224 px, batch 128, bf16). Writes JSON lines under $OUT.
#   bash benchmarks/gpu_suite.sh          # everything: the parts' timeouts sum to 560 s
#   bash benchmarks/gpu_suite.sh jax      # the hydra_jax parts alone, with more time each
#   bash benchmarks/gpu_suite.sh torch    # the PyTorch parts alone, compiled inference too
# Each part has its own timeout, so a slow compile costs that part's rows, not the rest, and
# every row is printed as it finishes. Cheap rows first: PyTorch's eager configurations before
# its torch.compile ones, whose inference timing (two more compiles each) only the torch part
# alone does. The last part times Hydra with the whole PyTorch model in bf16 (no autocast: an
# upper bound on PyTorch's speed, see torch_baselines.py).
set -uo pipefail
part=${1:-all}
case "$part" in  # timeouts (s): jax hydra, jax others, jax tanh, torch autocast, torch bf16
  all) T=(115 155 60 155 75); compiled="hydra:compile:noinfer,lora:compile:noinfer" ;;
  jax) T=(150 240 120 0 0) ;;
  torch) T=(0 0 0 330 220); compiled="hydra:compile,lora:compile" ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [all|jax|torch]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT" .jcache
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
  JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch, timm, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
B="-m hydra_jax.bench --model B/16 --batch 128 --attention cudnn"
TB="benchmarks/torch_baselines.py --dropout 0"
t0=$SECONDS
if [ "${T[0]}" -gt 0 ]; then
  # merged-vs-plain inference on the Hydra row only (LoRA's merged model is the same plain ViT)
  timeout "${T[0]}" python3 $B --adapters hydra > "$OUT/jax_cudnn.jsonl" 2> "$OUT/jax.err"
  timeout "${T[1]}" python3 $B --adapters lora,hydralora,full,linear --no_infer \
    >> "$OUT/jax_cudnn.jsonl" 2>> "$OUT/jax.err"; echo "jax: $((SECONDS - t0)) s"
  timeout "${T[2]}" python3 $B --adapters hydra,lora --gelu_approximate --no_infer \
    > "$OUT/jax_cudnn_gelu_tanh.jsonl" 2> "$OUT/jax_tanh.err"; echo "jax tanh: $((SECONDS - t0)) s"
fi
if [ "${T[3]}" -gt 0 ]; then
  timeout "${T[3]}" python3 $TB --configs "hydra:eager,full:eager,linear:eager,$compiled" \
    > "$OUT/torch.jsonl" 2> "$OUT/torch.err"; echo "torch: $((SECONDS - t0)) s"
  timeout "${T[4]}" python3 $TB --precision bf16 --no-check \
    --configs hydra:eager,hydra:compile:noinfer > "$OUT/torch_bf16.jsonl" 2> "$OUT/torch_bf16.err"
  echo "torch bf16: $((SECONDS - t0)) s"
fi
tail -n 2 "$OUT"/*.err; cut -c1-400 "$OUT"/*.jsonl
