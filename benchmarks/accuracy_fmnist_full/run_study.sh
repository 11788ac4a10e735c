#!/usr/bin/env bash
# The real-budget study, restartable: rerunning this script skips finished runs and continues interrupted ones
# from their checkpoints (run.ckpt_every=100 in the preset). Two runs train at once, one process and one thread
# each: on this 2-core machine two one-thread processes train 1.3x faster than one two-thread process (README).
#   bash benchmarks/accuracy_fmnist_full/run_study.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
LL=.venv/bin/locallearn
CFG=configs/fmnist/resnet32_k8_study.yaml
OUT=benchmarks/accuracy_fmnist_full
ALL=e2e,dgl,infopro,dgl+man,dgl+hpff,dgl+mlaan,infopro+man,infopro+hpff,infopro+mlaan
mkdir -p $OUT/runs
# 1. Two bench commands at once, one run at a time each (they share results.json: each save merges the other's):
#    every row at seed 0; and seed 1 of E2E, DGL and InfoPro, then the EMA warm-up row (DGL+MAN, where the EMA
#    matters most at this budget: plain MAN bridge, EMA 0.995). Neither needs the seed-0 table.
$LL bench accuracy -c $CFG --k 8 --methods $ALL --out $OUT >> $OUT/runs/stage1_seed0.log 2>&1 &
first=$!
( $LL bench accuracy -c $CFG --k 8 --seeds 2 --methods e2e,dgl,infopro --out $OUT \
  && $LL bench accuracy -c $CFG --k 8 --methods dgl+man --out $OUT/ema_warmup method.ema_warmup=true ) \
  >> $OUT/runs/stage1_seed1_ema.log 2>&1 &
second=$!
wait $first
wait $second
# 2. Seed 1 of the add-on that closes most of each base's gap at seed 0 (read from the table), two at once.
BEST=$(.venv/bin/python - <<'PY'
import json
runs = {r["label"]: r["test_acc"] for r in json.load(open("benchmarks/accuracy_fmnist_full/results.json"))["runs"] if r["seed"] == 0}
print(",".join(max((l for l in runs if l.startswith(base + "+")), key=runs.get) for base in ("dgl", "infopro")))
PY
)
echo "best add-ons at seed 0: $BEST"
$LL bench accuracy -c $CFG --k 8 --jobs 2 --seeds 2 --methods e2e,dgl,infopro,$BEST --out $OUT
