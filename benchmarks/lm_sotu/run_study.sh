#!/usr/bin/env bash
# Byte-level language modelling on the State of the Union corpus (get_sotu.sh): a hub GPT-2 (6 layers, width
# 128, 128-byte context; configs/text/gpt2_bytes.yaml) trained by E2E, DGL and DGL with MAN and MLAAN at K=3,
# 400 steps of 32 windows (12,800 windows = 1.6 MB, the oldest 15 % of the training text), AdamW with cosine
# decay, one thread per run, two runs at a time. Test: the first 2,048 windows (262 kB) of the held-out last
# 10 % of the corpus (the most recent addresses). Restartable: rerunning skips finished runs.
#   bash benchmarks/lm_sotu/get_sotu.sh && bash benchmarks/lm_sotu/run_study.sh     # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/locallearn compare -c configs/text/gpt2_bytes.yaml --methods e2e,dgl,dgl+man,dgl+mlaan --jobs 2 \
  --out benchmarks/lm_sotu data.root=data/sotu data.limit_train=12800 data.limit_test=2048 run.threads=1
