#!/usr/bin/env bash
# One device call: how the Hydra step scales with batch and model size, and the largest batch
# for ViT-L/16 and ViT-H/14 under each remat policy. Writes JSON lines under $OUT.
#   bash benchmarks/gpu_scale.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_scale}; mkdir -p "$OUT" .jcache
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
t0=$SECONDS
for part in batch size; do
  timeout 190 python3 benchmarks/scale.py --part $part > "$OUT/scale_$part.jsonl" \
    2> "$OUT/$part.err"; echo "$part: $((SECONDS - t0)) s"
done
# maxbatch only compiles (XLA's memory analysis): GEMM autotuning picks kernels, not the buffers
# counted here, and costs compile time on a cold cache (the last attempt timed out compiling),
# so it is off for this part
XLA_FLAGS="--xla_gpu_autotune_level=0" timeout 190 python3 benchmarks/scale.py --part maxbatch \
  > "$OUT/scale_maxbatch.jsonl" 2> "$OUT/maxbatch.err"; echo "maxbatch: $((SECONDS - t0)) s"
tail -n 2 "$OUT"/*.err; cut -c1-300 "$OUT"/scale_*.jsonl
