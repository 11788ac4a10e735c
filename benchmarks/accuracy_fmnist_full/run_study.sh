#!/usr/bin/env bash
# The real-budget study, restartable: rerunning this script skips finished runs and continues interrupted ones
# from their checkpoints (run.ckpt_every=100 in the preset). Two lanes train at once, one run at a time each, one
# process and one thread per run: on this 2-core machine two one-thread processes train 1.3x faster than one
# two-thread process (README). The lanes' bench commands share results.json (each save merges the other's).
#   bash benchmarks/accuracy_fmnist_full/run_study.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
LL=.venv/bin/locallearn
CFG=configs/fmnist/resnet32_k8_study.yaml
OUT=benchmarks/accuracy_fmnist_full
ALL=e2e,dgl,infopro,dgl+man,dgl+hpff,dgl+mlaan,infopro+man,infopro+hpff,infopro+mlaan
mkdir -p $OUT/runs

# The add-on of BASE that closes most of its gap at seed 0; fails while one of BASE's add-on rows has no seed 0.
best_addon() {
  .venv/bin/python - "$1" "$ALL" <<'PY'
import json, sys
base, rows = sys.argv[1], sys.argv[2].split(",")
acc = {r["label"]: r["test_acc"] for r in json.load(open("benchmarks/accuracy_fmnist_full/results.json"))["runs"]
       if r["seed"] == 0}
addons = [row for row in rows if row.startswith(base + "+")]
if any(a not in acc for a in addons):
    sys.exit(1)
print(max(addons, key=acc.get))
PY
}

# Lane A: every row at seed 0, then seed 1 of InfoPro's best add-on (its seed-0 rows are lane A's last ones).
(
  $LL bench accuracy -c $CFG --k 8 --methods $ALL --out $OUT
  best=$(best_addon infopro)
  echo "best InfoPro add-on at seed 0: $best"
  $LL bench accuracy -c $CFG --k 8 --seeds 2 --methods "$best" --out $OUT
) >> $OUT/runs/stage1_seed0.log 2>&1 &
lane_a=$!
# Lane B: seed 1 of E2E, DGL and InfoPro; the EMA warm-up row (DGL+MAN, where the EMA matters most at this
# budget: plain MAN bridge, EMA 0.995); then seed 1 of DGL's best add-on, once lane A has all of DGL's add-ons.
(
  $LL bench accuracy -c $CFG --k 8 --seeds 2 --methods e2e,dgl,infopro --out $OUT
  $LL bench accuracy -c $CFG --k 8 --methods dgl+man --out $OUT/ema_warmup method.ema_warmup=true
  until best=$(best_addon dgl); do sleep 60; done
  echo "best DGL add-on at seed 0: $best"
  $LL bench accuracy -c $CFG --k 8 --seeds 2 --methods "$best" --out $OUT
) >> $OUT/runs/stage1_seed1_ema.log 2>&1 &
lane_b=$!
wait $lane_a
wait $lane_b
