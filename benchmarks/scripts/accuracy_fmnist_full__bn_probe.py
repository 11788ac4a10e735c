"""Is an eval-mode accuracy drop the model or its BatchNorm running statistics? Evaluates a run's checkpoint as
trained, prints per backbone BatchNorm how far the running statistics sit from a few test batches' statistics,
then recomputes every running statistic over N training batches (a cumulative average of train-mode forwards
without gradient, "precise BN") and evaluates again.

    python benchmarks/scripts/accuracy_fmnist_full__bn_probe.py RUN_DIR [N=50]
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from locallearn.train.build import build_engine, build_loaders, resolve_device
from locallearn.train.checkpoint import load_checkpoint
from locallearn.train.config import config_from_dict
from locallearn.train.entry import checkpoint_path


def main(run: str, n: int = 50) -> None:
    torch.set_num_threads(1)
    state = load_checkpoint(checkpoint_path(run))
    cfg = config_from_dict(state["config"])
    train_loader, test_loader, spec = build_loaders(cfg, resolve_device("cpu"))
    engine = build_engine(cfg, spec, resolve_device("cpu"), next(iter(test_loader))[0][: cfg.data.batch_size])
    engine.load_state_dict(state)
    print(f"{run} step {state['step']}: test_acc {engine.evaluate(test_loader.batches())['test_acc']:.4f} as trained")
    bns = [(name, m) for name, m in engine.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    gaps: dict[str, list[tuple[float, float]]] = {}

    def probe(name: str):
        def hook(module: nn.BatchNorm2d, inputs: tuple, _: torch.Tensor) -> None:
            x = inputs[0].detach().float()
            std = (module.running_var + module.eps).sqrt()
            shift = ((x.mean((0, 2, 3)) - module.running_mean).abs() / std).mean().item()
            gaps.setdefault(name, []).append((shift, (x.var((0, 2, 3)) / std**2).mean().item()))

        return hook

    hooks = [m.register_forward_hook(probe(name)) for name, m in bns]
    engine.backbone.eval()
    with torch.no_grad():
        for i, (x, _, _) in enumerate(test_loader.batches()):
            engine.backbone(x)
            if i == 3:
                break
    for h in hooks:
        h.remove()
    print("per BatchNorm: |test mean - running mean| / running std, test var / running var (channel means)")
    for name, values in gaps.items():
        shift, ratio = (sum(v[j] for v in values) / len(values) for j in (0, 1))
        print(f"  {name:24s} {shift:6.3f} {ratio:6.3f}")
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    engine.backbone.train()
    with torch.no_grad():
        for i, (x, _, _) in enumerate(train_loader.batches(0)):
            engine.backbone(x)
            if i == n - 1:
                break
    acc = engine.evaluate(test_loader.batches())["test_acc"]
    print(f"test_acc {acc:.4f} with BatchNorm statistics recomputed over {n} training batches")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50)
