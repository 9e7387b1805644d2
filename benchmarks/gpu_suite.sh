#!/usr/bin/env bash
# hydra_jax.bench and the PyTorch baselines on the same shapes (ViT-B/16, 224 px, batch 128,
# bf16), one device call per part. Writes JSON lines under $OUT.
#   bash benchmarks/gpu_suite.sh          # = all: what issue 5 needs first (parts sum to 510 s)
#   bash benchmarks/gpu_suite.sh more     # then, on the warm machine: XLA options, remat, tanh
#                                         # (240 s)
#   bash benchmarks/gpu_suite.sh torch    # PyTorch alone: compiled inference, pure bf16 (400 s)
# all: hydra_jax's Hydra (training, then merged-vs-plain inference), LoRA, HydraLoRA and full
# fine-tuning; PyTorch's official-style Hydra eager and compiled, PEFT LoRA compiled, full
# fine-tuning eager; the kernel-time profile of the Hydra step (where the time goes).
# more: Hydra under two XLA compiler options that attack the step's element-wise time (cuDNN
# LayerNorm kernels; Triton GEMMs that can fuse exact GELU into the GEMM), remat="dots" (peak
# memory), tanh-GELU Hydra and LoRA.
# Each part has its own timeout, so a slow compile costs that part's rows, not the rest, and
# every row is printed as it finishes. Every part shares JAX's compilation cache in .jcache
# (kept between calls on a warm machine).
# Smoke test without a GPU: SMOKE=1 bash benchmarks/gpu_suite.sh all|more (a tiny ViT on CPU,
# PyTorch parts skipped).
set -uo pipefail
part=${1:-all}
case "$part" in
  all|more|torch) ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [all|more|torch]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT" .jcache
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
  JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
FLAGS=${XLA_FLAGS:-}
B="-m hydra_jax.bench --model B/16 --batch 128 --attention cudnn"
PROFILE="--model B/16 --batch 128 --attention cudnn"
TB="benchmarks/torch_baselines.py --dropout 0"
if [ -n "${SMOKE:-}" ]; then
  B="-m hydra_jax.bench --model Ti/16 --batch 2 --image_size 32 --num_classes 3 --attention xla --steps 1 --repeats 1 --infer_rounds 1"
  PROFILE="--model Ti/16 --batch 2 --image_size 32 --num_classes 3 --attention xla --steps 1"
  TB=""
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee -a "$OUT/device.txt"
  python3 -c "import jax, flax, torch, timm, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
fi
# the image lacks some of requirements.txt (tests/test_bench.py keeps the bench free of them)
python3 -c "import hydra_jax.bench" || echo "hydra_jax.bench does not import: no JAX rows" >&2
t0=$SECONDS

# run NAME TIMEOUT ARGS...: python3 ARGS under a timeout, stdout appended to $OUT/NAME.jsonl
run() {
  local name=$1 limit=$2; shift 2
  timeout -k 5 "$limit" python3 "$@" >> "$OUT/$name.jsonl" 2>> "$OUT/$name.err"
  echo "$name: exit $?, $((SECONDS - t0)) s"
}

if [ "$part" = all ]; then
  # merged-vs-plain inference on the Hydra row only (LoRA's merged model is the same plain ViT)
  run jax 110 $B --adapters hydra
  run jax 150 $B --adapters lora,hydralora,full --no_infer
  [ -n "$TB" ] && run torch 170 $TB --configs \
    hydra:eager,hydra:compile:noinfer,lora:compile:noinfer,full:eager
  run profile 80 benchmarks/profile_step.py $PROFILE
elif [ "$part" = more ]; then
  # Triton GEMMs get more autotuning candidates on a cold cache: more time
  XLA_FLAGS="$FLAGS --xla_gpu_enable_cudnn_layer_norm=true" run jax_flags 45 $B --adapters hydra \
    --no_infer
  XLA_FLAGS="$FLAGS --xla_gpu_triton_gemm_any=true" run jax_flags 70 $B --adapters hydra --no_infer
  run jax_more 50 $B --adapters hydra --no_infer --remat dots
  run jax_more 75 $B --adapters hydra,lora --gelu_approximate --no_infer
else
  [ -n "$TB" ] || { echo "SMOKE: no PyTorch part" >&2; exit 2; }
  run torch 180 $TB --configs hydra:compile,lora:compile,linear:eager
  run torch_bf16 220 $TB --precision bf16 --no-check --configs hydra:eager,hydra:compile:noinfer
fi
tail -n 2 "$OUT"/*.err 2>/dev/null
python3 benchmarks/summary.py "$OUT"  # one line per row; the rows stay in $OUT/*.jsonl
