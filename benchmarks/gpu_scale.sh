#!/usr/bin/env bash
# One part per device call (each needs its own 10-minute call on a cold machine): how the Hydra
# step scales with batch and model size, and the largest batch for ViT-L/16 and ViT-H/14 under
# each remat policy. Writes JSON lines under $OUT; rows are printed as they finish, so a part
# cut off by its timeout keeps the rows before it.
#   bash benchmarks/gpu_scale.sh batch      # B/16 at batch 32, 64, 256, 512
#   bash benchmarks/gpu_scale.sh size       # S/16 and L/16 at batch 128
#   bash benchmarks/gpu_scale.sh maxbatch   # L/16 and H/14, compiled at batch 32 and 128
#   bash benchmarks/gpu_scale.sh maxbatch --models H/14   # extra arguments go to scale.py
# The parts share JAX's compilation cache in .jcache (kept on a warm machine between calls, or
# carried), and need nothing from each other.
set -uo pipefail
part=${1:-}
case "$part" in
  batch|size|maxbatch) shift ;;
  *) echo "usage: bash benchmarks/gpu_scale.sh batch|size|maxbatch [scale.py arguments]" >&2
     exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_scale}; mkdir -p "$OUT" .jcache
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee "$OUT/device.txt"
if [ "$part" = maxbatch ]; then
  # maxbatch only compiles (XLA's memory analysis): GEMM autotuning picks kernels, not the
  # buffers counted here, and costs compile time on a cold cache, so it is off for this part
  export XLA_FLAGS="--xla_gpu_autotune_level=0"
fi
t0=$SECONDS
timeout -k 10 550 python3 benchmarks/scale.py --part "$part" "$@" > "$OUT/scale_$part.jsonl" \
  2> "$OUT/$part.err"
echo "$part: exit $?, $((SECONDS - t0)) s"
tail -n 3 "$OUT/$part.err"; cut -c1-400 "$OUT/scale_$part.jsonl"
