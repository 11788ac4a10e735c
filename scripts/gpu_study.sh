#!/usr/bin/env bash
# The real-budget accuracy study on one GPU, prepared for a lent device: benchmarks/accuracy_fmnist_full's config
# (ResNet-32 width 16, full Fashion-MNIST, InfoPro's split, batch 128, 5 epochs of cosine SGD), every row at K=8,
# then at K=16, seeds 0 and 1, JOBS runs at once on the one GPU (the costliest first), each phase stopped at a
# deadline so the call ends in time; whatever finished is in OUT.
#   bash scripts/gpu_study.sh OUT_DIR          # on a CUDA machine
#   bash scripts/gpu_study.sh OUT_DIR --dry    # anywhere: the same steps at toy sizes on the CPU, then a self-check
# The device machine has no network: copy the dataset into the tree here and carry it, e.g.
#   mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#   device run: PYTHON=python3 PYTHONPATH=src bash scripts/gpu_study.sh $OUT   (carry .data, timeout_s 540)
# Environment: DEADLINE (seconds of training for both phases, default 420), JOBS (runs at once, default 8),
# DATA_ROOT (default .data/fashion-mnist when it exists, else the dataset's standard locations).
# OUT gets env.txt, study.log, k8/results.{json,md}, k16/results.{json,md} and runs.tar.gz (every run's config,
# env, metrics and log; no checkpoints): 7 files, within what the device tool sends back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_study.sh OUT_DIR [--dry]}
DRY=${2:-}
PY=${PYTHON:-.venv/bin/python}
METHODS=e2e,dgl,infopro,dgl+man,dgl+hpff,dgl+mlaan,infopro+man,infopro+hpff,infopro+mlaan
if [ "$DRY" = "--dry" ]; then
  DEV=cpu; SEEDS=1; JOBS=${JOBS:-2}; DEADLINE=${DEADLINE:-300}; METHODS=e2e,dgl,dgl+mlaan
  TOY="data.limit_train=256 data.limit_test=128 model.width=4 run.epochs=1"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_study: no CUDA device here; run with --dry for the CPU self-check" >&2; exit 2; }
  DEV=cuda; SEEDS=2; JOBS=${JOBS:-8}; DEADLINE=${DEADLINE:-420}; TOY=""
fi
ROOT=${DATA_ROOT:-}
if [ -z "$ROOT" ] && [ -d .data/fashion-mnist ]; then ROOT=.data/fashion-mnist; fi
WORK=$(mktemp -d)
mkdir -p "$OUT"
start=$(date +%s)
{
  date -u; nvidia-smi 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  echo "device $DEV, jobs $JOBS, seeds $SEEDS, deadline ${DEADLINE}s, data.root ${ROOT:-default}, $(nproc) CPU cores"
} > "$OUT/env.txt" 2>&1

# Checkpoints only at epoch ends (nothing resumes on a machine that is given back); timeout stops the whole
# process group (the bench and its spawned runs), and every run that finished is already in results.json.
phase() {  # phase NAME K METHODS
  local left=$(( DEADLINE - ($(date +%s) - start) ))
  if [ "$left" -lt 20 ]; then echo "gpu_study: no time left for $1" | tee -a "$OUT/study.log"; return; fi
  echo "gpu_study: $1 (K=$2), ${left}s left" | tee -a "$OUT/study.log"
  timeout -k 10 "$left" "$PY" -m locallearn bench accuracy -c configs/fmnist/resnet32_k8_study.yaml --k "$2" \
    --seeds "$SEEDS" --jobs "$JOBS" --methods "$3" --out "$WORK/$1" \
    run.device=$DEV run.ckpt_every=0 $TOY ${ROOT:+data.root=$ROOT} >> "$OUT/study.log" 2>&1
  echo "gpu_study: $1 exit $? after $(( $(date +%s) - start ))s" | tee -a "$OUT/study.log"
  mkdir -p "$OUT/$1"
  cp "$WORK/$1/results.json" "$WORK/$1/results.md" "$OUT/$1/" 2>/dev/null
}
phase k8 8 "$METHODS"
phase k16 16 "${METHODS#e2e,}"  # E2E is one module at any K: its runs are phase k8's
tar czf "$OUT/runs.tar.gz" -C "$WORK" --exclude '*.pt' --exclude '.results.lock' . 2>>"$OUT/study.log"

"$PY" - "$OUT" "$DRY" <<'PY'
import json, pathlib, sys
out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "--dry"
for phase, expected in (("k8", 3 if dry else 17), ("k16", 2 if dry else 16)):
    path = out / phase / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    done = ", ".join(f"{r['label']} s{r['seed']} {100 * r['test_acc']:.2f}% {r['train_s']:.0f}s" for r in runs)
    print(f"gpu_study: {phase}: {len(runs)} of {expected} runs finished: {done}")
    if dry:
        assert len(runs) == expected and all(r["train_size"] == 256 for r in runs), f"{phase}: {len(runs)} runs"
print("gpu_study: self-check passed" if dry else "gpu_study: results in k8/, k16/ and runs.tar.gz")
PY
rc=$?
echo "gpu_study: done in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
exit $rc
