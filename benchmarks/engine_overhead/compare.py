"""The engine's step against plain PyTorch loops written by hand (README.md here).

E2E: ``LocalEngine(method e2e).train_step`` against ``zero_grad, forward, cross-entropy, backward, step`` on the
same model. DGL: ``LocalEngine(method dgl)`` against a hand-written DGL loop (for each module: forward on the
detached input, aux head, cross-entropy, backward, step) over deep copies of the same modules and aux heads. Same
weights, optimizer settings, batch (resident on the device), layout (channels_last) and thread count; the two sides
of a pair run interleaved in rounds, and the ratio is the median of the per-round ratios.

    .venv/bin/python benchmarks/engine_overhead/compare.py --threads 1,2 --out benchmarks/engine_overhead
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import locallearn as ll
from locallearn.train.config import SplitCfg

OPTIM = ll.OptimCfg(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=OPTIM.lr, momentum=OPTIM.momentum, nesterov=True, weight_decay=OPTIM.weight_decay)


def engine(method: str, k: int, model: str) -> ll.LocalEngine:
    torch.manual_seed(0)
    backbone = ll.create_model(model, num_classes=10, in_channels=1)
    split = SplitCfg(k=k, preset="infopro" if k > 1 else "auto")
    return ll.LocalEngine(backbone, ll.MethodCfg(name=method), ll.ClassificationTask(10), OPTIM, split=split)


def plain_e2e(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opt = sgd(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def plain_dgl(modules: list[torch.nn.Module], heads: list[torch.nn.Module]) -> Callable[..., None]:
    """DGL as its paper's loop: module k trains on its own aux loss and steps at once; the input is detached."""
    opts = [sgd([*m.parameters(), *h.parameters()]) for m, h in zip(modules, [*heads, torch.nn.Identity()])]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        h = x
        for k, (module, opt) in enumerate(zip(modules, opts)):
            out = module(h.detach())
            logits = heads[k](out) if k < len(heads) else out
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            opt.step()
            h = out

    return step


Pair = tuple[Callable[[], None], Callable[[], None], list[torch.Tensor], list[torch.Tensor]]


def pairs(model: str, batch: ll.Batch) -> dict[str, Pair]:
    """Name → (plain step, engine step, plain parameters, engine parameters), on the same fresh weights."""
    x, y = batch.input, batch.target
    e2e = engine("e2e", 1, model)
    plain_model = copy.deepcopy(e2e.backbone)
    dgl = engine("dgl", 8, model)
    modules = [copy.deepcopy(m) for m in dgl.modules]
    heads = [copy.deepcopy(aux.independent.head) for aux in dgl.method.aux[:-1]]
    plain_e2e_step, plain_dgl_step = plain_e2e(plain_model), plain_dgl(modules, heads)
    plain_dgl_params = [p for m in modules for p in m.parameters()] + [p for h in heads for p in h.parameters()]
    dgl_params = [p for m in dgl.modules for p in m.parameters()]
    dgl_params += [p for aux in dgl.method.aux[:-1] for p in aux.independent.head.parameters()]
    return {
        "e2e": (
            lambda: plain_e2e_step(x, y),
            lambda: e2e.train_step(batch),
            [*plain_model.parameters()],
            [*e2e.backbone.parameters()],
        ),
        "dgl K=8": (lambda: plain_dgl_step(x, y), lambda: dgl.train_step(batch), plain_dgl_params, dgl_params),
    }


def timed(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", default="1", help="comma-separated, e.g. 1,2")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (args.batch, 1, 28, 28), generator=g, dtype=torch.uint8)
    x = ((raw.float() / 255 - 0.286) / 0.353).contiguous(memory_format=torch.channels_last)
    batch = ll.Batch(x, torch.randint(0, 10, (args.batch,), generator=g), raw)
    record = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "load_avg_start": os.getloadavg(),
        "model": args.model,
        "batch": args.batch,
        "rows": [],
    }
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (plain, ours, plain_params, our_params) in pairs(args.model, batch).items():
            for _ in range(args.warmup):
                plain(), ours()
            same = max((a - b).abs().max().item() for a, b in zip(plain_params, our_params))
            rounds = [(timed(plain, args.steps), timed(ours, args.steps)) for _ in range(args.rounds)]
            ratios = [b / a for a, b in rounds]
            row = {
                "pair": name,
                "threads": threads,
                "plain_ms": 1000 * statistics.median(a for a, _ in rounds),
                "engine_ms": 1000 * statistics.median(b for _, b in rounds),
                "engine_over_plain": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "param_max_abs_diff_after_warmup": same,  # the same computation on both sides: 0 expected
            }
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
    record["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
