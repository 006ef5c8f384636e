#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (no network, nothing installed):
#
#     OUT=/some/folder bash bench/gpu_check.sh
#
# 1. nvidia-smi: which GPU.
# 2. tests/test_cuda.py (the parity tests on the GPU) and tests/test_model.py.
# 3. bench/bench_gpu.py: rollout, 7B, training step and SVD figures (bf16), each section under a
#    time budget; its JSON lines go to $OUT/gpu_results.jsonl as they are measured.
# 4. A short bf16 training run of the embedded default on the GPU (train.py, 20 steps, 200 eval
#    problems); its summary.json, metrics.jsonl and curves.png are copied to $OUT.
#
# Every step runs under `timeout`; the worst case is ~6.6 minutes in all (the sum of the timeouts).
# Not yet run on a GPU: no GPU was lent to the session that wrote it.
# Everything printed also goes to $OUT/gpu_check.log. Exit status: 0 when every step passed.

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0

log() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output to the screen and the log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    log "== $name (at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    [ "$rc" -eq 124 ] && log "   (timed out after ${limit} s)"
    log "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

log "gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step nvidia-smi 15 nvidia-smi -L
step tests 80 python3 -m pytest -q -rs --durations=8 -p no:cacheprovider tests/test_cuda.py tests/test_model.py
step bench 230 python3 bench/bench_gpu.py --budget 200 --results "$OUT/gpu_results.jsonl"
rm -rf /tmp/gpu-run
step train 70 python3 train.py --device cuda --dtype bfloat16 --out /tmp/gpu-run --steps 20 --eval-limit 200
for f in summary.json metrics.jsonl curves.png; do
    [ -f "/tmp/gpu-run/$f" ] && cp "/tmp/gpu-run/$f" "$OUT/train_$f"
done
log "gpu_check: done in ${SECONDS} s, status $status ($OUT: $(ls "$OUT" | tr '\n' ' '))"
exit $status
