"""Repeat ``split.balance=time`` on one model, DGL, K=2: the per-unit probe's pick and predicted ms per module,
then every candidate split timed as whole modules (``locallearn.train.partition``), and the pick of that timing.

Run from the repository root:
``OMP_NUM_THREADS=1 python benchmarks/scripts/pipeline_fmnist_k2_stages__probe_candidates.py vit_tiny 4``
(model, trials). ViT-Ti: width 192, patch 4, batch 32; other models: batch 64.
"""

import sys
import time
from dataclasses import replace

import torch

from locallearn.tasks.task import Batch
from locallearn.train import partition
from locallearn.train.build import build_engine, build_loaders
from locallearn.train.config import load_config


def main() -> None:
    torch.set_num_threads(1)
    model = sys.argv[1] if len(sys.argv) > 1 else "vit_tiny"
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    extra = ["model.width=192", "model.patch_size=4", "data.batch_size=32"] if model == "vit_tiny" else []
    extra = extra or ["data.batch_size=64"]
    overrides = [f"model.name={model}", "method.name=dgl", "split.k=2", "run.device=cpu", *extra]
    cfg = load_config("configs/fmnist/demo.yaml", overrides)
    device = torch.device("cpu")
    train, _, spec = build_loaders(cfg, device)
    batch = Batch(*next(iter(train)))

    def build(method):
        return build_engine(replace(cfg, method=method), spec, device, batch.input)

    units = len(build(replace(cfg.method, k=1, split="auto", balance="units", ends=[])).backbone)
    for trial in range(trials):
        start = time.time()
        probe = build(replace(cfg.method, k=units, split="ends", ends=list(range(1, units + 1))))
        unit_s, aux_s = partition.measure_unit_times(probe, batch, 3)
        ends = partition.time_balanced_ends(unit_s, aux_s, 2)
        candidates = partition.candidate_splits(unit_s, aux_s, ends)
        engines = [build(replace(cfg.method, k=2, split="ends", ends=e)) for e in candidates]
        timed = partition.time_candidate_splits(engines, batch, 3)
        for e, t in zip(candidates, timed):
            predicted = [round(1000 * s) for s in partition.predicted_module_times(unit_s, aux_s, e)]
            print(f"trial {trial} {e}: predicted {predicted} timed {[round(1000 * s) for s in t]}", flush=True)
        pick = candidates[min(range(len(candidates)), key=lambda i: max(timed[i]))]
        took = time.time() - start
        print(f"trial {trial}: unit probe picks {ends}, whole-module timing picks {pick} ({took:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
