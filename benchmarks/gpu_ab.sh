#!/usr/bin/env bash
# One device call: this tree against an older version of hydra_jax (extracted into $OLD by
#   git archive REV | tar -x -C .old), same shapes, same machine, then a kernel-time profile.
#   OLD=.old bash benchmarks/gpu_ab.sh
# The parts' timeouts sum to 550 s, inside one 10-minute call. Seven files come back (at most 8
# do): the four parts' rows, their stderr in err.log, the profiled step's HLO and XLA's autotuning.
# The old tree runs under the device image too: v2 (dac5915) imports tensorflow_datasets and grain
# from its bench, which the image lacks (KINDS.md); v1 (c3b742f) does not.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_ab}; OLD=${OLD:-.old}; mkdir -p "$OUT" .jcache
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_COMPILATION_CACHE_DIR=$PWD/.jcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
B="-m hydra_jax.bench --model B/16 --batch 128 --attention cudnn --no_infer"
t0=$SECONDS
PYTHONPATH=$PWD timeout 240 python3 $B --adapters hydra,lora,hydralora,hydra_dropout \
  > "$OUT/new.jsonl" 2>> "$OUT/err.log"; echo "new: $((SECONDS - t0)) s"
# the old bench has no --no_infer: call its bench_one directly, a process per adapter (the
# device's peak memory counter is per process)
for a in hydra hydralora; do
  (cd "$OLD" && PYTHONPATH=$PWD timeout 55 python3 -c "
import argparse, json
from hydra_jax import bench
args = argparse.Namespace(model='B/16', batch=128, image_size=224, num_classes=100,
    dtype='bfloat16', attention='cudnn', remat=False, steps=10, repeats=5, infer=False)
print(json.dumps(bench.bench_one(args, '$a')), flush=True)
") >> "$OUT/old.jsonl" 2>> "$OUT/err.log"
done; echo "old: $((SECONDS - t0)) s"
# the optimised HLO of the profiled step comes back too: it names what each fusion computes
PYTHONPATH=$PWD XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" timeout 110 \
  python3 benchmarks/profile_step.py > "$OUT/profile.jsonl" 2>> "$OUT/err.log"
echo "profile: $((SECONDS - t0)) s"
(cd /tmp/hlo && tar czf "$OUT/hlo.tgz" $(ls | grep -E 'train_step.*after_optimizations.txt$'))
PYTHONPATH=$PWD timeout 90 python3 $B --adapters hydra --remat dots > "$OUT/remat.jsonl" \
  2>> "$OUT/err.log"; echo "remat: $((SECONDS - t0)) s"
tar czf "$OUT/autotune.tgz" -C .jcache xla_gpu_per_fusion_autotune_cache_dir 2>/dev/null
ls -la "$OUT"; tail -n 12 "$OUT/err.log"
python3 benchmarks/summary.py "$OUT" old new remat profile
