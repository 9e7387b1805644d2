#!/usr/bin/env bash
# One device call: a kernel-time profile of the Hydra step, then the scale study.
#   bash benchmarks/gpu_scale.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_scale}; mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
timeout 140 python3 benchmarks/profile_step.py > "$OUT/profile.json" 2> "$OUT/profile.err"
timeout 170 python3 benchmarks/scale.py --part batch > "$OUT/scale_batch.jsonl" 2> "$OUT/batch.err"
timeout 90 python3 benchmarks/scale.py --part size > "$OUT/scale_size.jsonl" 2> "$OUT/size.err"
timeout 150 python3 benchmarks/scale.py --part maxbatch > "$OUT/maxbatch.jsonl" 2> "$OUT/maxbatch.err"
head -c 3000 "$OUT/profile.json"; cut -c1-300 "$OUT"/scale_*.jsonl "$OUT/maxbatch.jsonl"
tail -3 "$OUT"/*.err
