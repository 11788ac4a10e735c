"""How much does eval-mode test accuracy swing from step to step, per method? Retrains a study row (seed 0 or 1, same
config, data order and initialisation as the study, one thread) and evaluates the final head as trained (running
BatchNorm statistics) at every EVERY-th step in [FROM, TO]; one JSON line per evaluation. The evaluation at the
end of epoch 2 (step 938) must equal the study's record of that epoch: the check that the retrained run is the
study's run.

    python benchmarks/scripts/accuracy_fmnist_full__bn_swing.py OUT.jsonl METHOD [METHOD ...] [--from 900]
        [--to 938] [--every 2] [--seed 0]        # METHOD: a study row, e.g. dgl, dgl+man, infopro
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from locallearn.bench.variants import Variant, parse_method, variant_config
from locallearn.tasks.task import Batch
from locallearn.train.build import build_engine, build_loaders, resolve_device
from locallearn.train.config import load_config
from locallearn.train.schedule import lr_at

STUDY = "configs/fmnist/resnet32_k8_study.yaml"


def swing(token: str, first: int, last: int, every: int, out: str, seed: int = 0) -> None:
    name, addons, split = parse_method(token)
    study = load_config(STUDY, [f"run.seed={seed}"])
    cfg = variant_config(study, Variant(name, split, 1 if name == "e2e" else 8, addons))
    device = resolve_device("cpu")
    train_loader, test_loader, spec = build_loaders(cfg, device)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    steps_per_epoch, step, start = len(train_loader), 0, time.time()
    for epoch in range(cfg.run.epochs):
        for i, (x, y, raw) in enumerate(train_loader.batches(epoch)):
            engine.set_lr(lr_at(cfg.optim, epoch, i, steps_per_epoch, cfg.run.epochs))
            engine.train_step(Batch(x, y, raw))
            step += 1
            if first <= step <= last and (step - first) % every == 0 or step == last:
                acc = engine.evaluate(test_loader.batches())["test_acc"]
                row = {"method": token, "seed": cfg.run.seed, "step": step, "epoch": epoch + 1, "test_acc": acc}
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{token} step {step}: {100 * acc:.2f} % ({time.time() - start:.0f} s)", flush=True)
            if step >= last:
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--from", dest="first", type=int, default=900)
    parser.add_argument("--to", dest="last", type=int, default=938)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for method in args.methods:
        swing(method, args.first, args.last, args.every, args.out, args.seed)
