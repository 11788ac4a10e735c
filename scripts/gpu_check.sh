#!/usr/bin/env bash
# The prepared GPU check: one run, under 8 minutes on one GPU, everything written under one folder.
#   bash scripts/gpu_check.sh OUT_DIR          # on a CUDA machine (after scripts/setup.sh or an equivalent venv)
#   bash scripts/gpu_check.sh OUT_DIR --dry    # anywhere: the same steps at toy sizes on the CPU, then a self-check
# Steps: 1. environment (nvidia-smi, torch, CUDA) 2. the CUDA-marked tests 3. GPU memory table, ResNet-110 batch
# 1024: E2E vs InfoPro K=2/3/4 and DGL K=8 (step peak = max_memory_allocated above the step's start, beside the
# saved activations) 4. step time E2E vs DGL vs InfoPro K=4 in fp32 and bf16, and in fp32 each also compiled
# (+compile rows: first step = compile time; TORCH_LOGS=recompiles counts recompilations) 5. class-folder decode
# throughput.
# Without CUDA and without --dry it stops with a one-line message. Exit status: 0 when every output exists.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--dry]}
DRY=${2:-}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if [ "$DRY" = "--dry" ]; then
  DEV=cpu; BATCH=8; MODEL="model.name=resnet20 model.width=4"; SPEED="--steps 1 --repeats 1 --warmup 1"
  LOADER="--images 48 --workers 1 --batches 2 --batch-size 16"; TESTS="-m cuda"; BACKEND=aot_eager  # no C++ build
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device here; run with --dry for the CPU self-check" >&2; exit 2; }
  DEV=cuda; BATCH=1024; MODEL=""; SPEED="--steps 5 --repeats 3 --warmup 3"
  LOADER="--workers 4,8,16 --batches 20 --batch-size 256"; TESTS="-m cuda"; BACKEND=inductor
fi
CFG=configs/cifar10/resnet110_e2e.yaml
COMMON="run.device=$DEV data.batch_size=$BATCH $MODEL run.progress=false"
start=$(date +%s)
{
  date -u; nvidia-smi 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
} > "$OUT/env.txt" 2>&1
echo "gpu_check: 1/5 environment -> $OUT/env.txt"
"$PY" -m pytest -q $TESTS -p no:cacheprovider tests > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests exit $?" >> "$OUT/cuda_tests.log"
echo "gpu_check: 2/5 CUDA-marked tests -> $OUT/cuda_tests.log ($(tail -n 2 "$OUT/cuda_tests.log" | head -n 1))"
"$PY" -m locallearn bench memory -c $CFG --methods e2e,infopro --k 2,3,4 --out "$OUT/memory" $COMMON > "$OUT/memory.log" 2>&1
"$PY" -m locallearn bench memory -c $CFG --methods dgl --k 8 --out "$OUT/memory" $COMMON >> "$OUT/memory.log" 2>&1
echo "gpu_check: 3/5 memory table -> $OUT/memory/results.md"
for precision in fp32 bf16; do
  methods=e2e,dgl,infopro
  [ $precision = fp32 ] && methods=$methods,e2e+compile,dgl+compile,infopro+compile
  TORCH_LOGS=recompiles "$PY" -m locallearn bench speed -c $CFG --methods $methods --k 4 $SPEED \
    --out "$OUT/speed_$precision" $COMMON run.precision=$precision run.compile_backend=$BACKEND \
    > "$OUT/speed_$precision.log" 2>&1
done
echo "recompilations logged: $(grep -c 'Recompiling' "$OUT/speed_fp32.log")" >> "$OUT/speed_fp32.log"
echo "gpu_check: 4/5 step times fp32 (and compiled) and bf16 -> $OUT/speed_fp32/results.md, $OUT/speed_bf16/results.md"
"$PY" -m locallearn.bench.loader_speed $LOADER --device $DEV --out "$OUT/loader.json" > "$OUT/loader.log" 2>&1
echo "gpu_check: 5/5 decode throughput -> $OUT/loader.json"
missing=0
for f in env.txt cuda_tests.log memory/results.json speed_fp32/results.json speed_bf16/results.json loader.json; do
  [ -s "$OUT/$f" ] || { echo "gpu_check: missing $OUT/$f (see the .log beside it)" >&2; missing=1; }
done
"$PY" - "$OUT" <<'PY' || missing=1
import json, sys
out = sys.argv[1]
mem = {r["label"] + f" K={r['k']}": r["memory"] for r in json.load(open(f"{out}/memory/results.json"))["rows"]}
assert {"e2e K=1", "infopro K=2", "infopro K=3", "infopro K=4", "dgl K=8"} <= set(mem), sorted(mem)
assert all(m["step_peak_bytes"] for m in mem.values()), "a memory row has no step peak"
for p, n in (("fp32", 6), ("bf16", 3)):
    rows = json.load(open(f"{out}/speed_{p}/results.json"))["rows"]
    assert len([r for r in rows if "speed" in r]) == n, f"speed_{p}: {n} timed rows expected"
print("gpu_check: self-check passed")
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
exit $missing
