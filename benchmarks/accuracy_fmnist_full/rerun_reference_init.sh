#!/usr/bin/env bash
# The rows whose aux nets changed when the aux convs took the backbone's own init, as the authors' code does
# (docs/methods.md, "Aux-net initialisation"), trained again with the study's unchanged config into
# reference_init/ beside the old records. Restartable like run_study.sh: rerunning skips finished runs and
# continues interrupted ones from their checkpoints. Two lanes, one one-thread run at a time each.
#   bash benchmarks/accuracy_fmnist_full/rerun_reference_init.sh        # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
LL=.venv/bin/locallearn
CFG=configs/fmnist/resnet32_k8_study.yaml
OUT=benchmarks/accuracy_fmnist_full/reference_init
mkdir -p $OUT/runs
# Lane A: InfoPro seed 0, then InfoPro+MLAAN seed 0 (InfoPro's best add-on), then the DGL add-ons at seed 0.
(
  $LL bench accuracy -c $CFG --k 8 --methods infopro --out $OUT
  $LL bench accuracy -c $CFG --k 8 --methods infopro+mlaan --out $OUT
  $LL bench accuracy -c $CFG --k 8 --methods dgl+mlaan,dgl+man,dgl+hpff --out $OUT
) >> $OUT/runs/lane_a.log 2>&1 &
lane_a=$!
# Lane B: InfoPro seed 1, DGL seeds 0 and 1, then the other InfoPro add-ons at seed 0.
(
  $LL bench accuracy -c $CFG --k 8 --methods infopro --out $OUT run.seed=1
  $LL bench accuracy -c $CFG --k 8 --seeds 2 --methods dgl --out $OUT
  $LL bench accuracy -c $CFG --k 8 --methods infopro+man,infopro+hpff --out $OUT
) >> $OUT/runs/lane_b.log 2>&1 &
lane_b=$!
wait $lane_a
wait $lane_b
