"""locallearn against the authors' own training step, side by side in one process (README.md here).

(a) InfoPro, ResNet-32, K=8 (blackfeather-wang/InfoPro-Pytorch, ``InfoProResNet``: its forward with a target runs
the local backwards itself); (b) DGL (eugenium/DGL, ``auxiliary_nets_study/models.py`` ``Net``, mlp-sr aux nets,
one optimizer per block, stepped right after the block's backward as in its ``cifar_dgl.py``), trained by
locallearn as a user model. For each: weights copied from the reference into locallearn's engine, one identical
batch (random uint8 images, 3x32x32), the per-module losses and parameters after the step compared; then the
median step time of the two, interleaved, per thread count. The reference code is imported from the checkouts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import copy
import importlib
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import locallearn as ll
from locallearn.train.build import engine_from_model, make_engine

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs/fmnist/resnet32_k8_study.yaml"
MEAN = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255  # InfoPro's CIFAR constants (_image_restore)
STD = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255
LAYERS = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)
TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class Case:
    """One comparison: a training step of each implementation on the same batch, and the copied tensor pairs."""

    ref_step: Callable[[], object]
    ours_step: Callable[[], Any]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    info: dict[str, Any] = field(default_factory=dict)


@contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block: how the reference code is patched, from the outside."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def layer_order(roots: Sequence[nn.Module], run: Callable[[], object]) -> list[nn.Module]:
    """The Conv/BN/Linear layers of ``roots`` in the order ``run`` calls them (eval mode, no grad): the structure
    that maps one implementation's aux net onto the other's, whatever the attribute names; unused layers drop out."""
    order: list[nn.Module] = []
    layers = [m for root in roots for m in root.modules() if isinstance(m, LAYERS)]
    hooks = [m.register_forward_hook(lambda m, i, o: None if m in order else order.append(m)) for m in layers]
    modes = {m: m.training for root in roots for m in root.modules()}
    for root in roots:
        root.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    return order


def copy_layers(src: list[nn.Module], dst: list[nn.Module], where: str, notes: list[str]) -> list[tuple[Any, Any]]:
    """Copy each reference layer's parameters and buffers into its locallearn twin; returns the copied pairs.
    A bias on one side only (InfoPro's decoder conv) is zeroed there and noted: before BN it changes nothing."""
    if [type(m) for m in src] != [type(m) for m in dst]:
        names = [[type(m).__name__ for m in side] for side in (src, dst)]
        raise SystemExit(f"{where}: the layers differ, reference {names[0]} vs locallearn {names[1]}")
    pairs = []
    for i, (a, b) in enumerate(zip(src, dst)):
        for name in TENSORS:
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            if ta is not None and tb is not None:
                tb.data.copy_(ta.data)
                pairs.append((ta, tb))
            elif ta is not None or tb is not None:
                side, t = ("reference", ta) if tb is None else ("locallearn", tb)
                t.data.zero_()
                notes.append(f"{where} layer {i} ({type(a).__name__}): only the {side} has a {name}; zeroed there")
    return pairs


def max_diff(pairs: Sequence[tuple[Any, Any]], params: bool) -> float:
    """Largest |reference - locallearn| over the parameter (``params``) or buffer pairs (BN statistics)."""
    chosen = [(a, b) for a, b in pairs if isinstance(a, nn.Parameter) == params and a.is_floating_point()]
    return max(float((a.detach() - b.detach()).abs().max()) for a, b in chosen)


def make_batch(n: int, channels_last: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Random uint8 images (not CIFAR-10: timing and fidelity need none) and labels; reference and locallearn input."""
    g = torch.Generator().manual_seed(seed)
    # 1..254: the reference restores the image as x*std + mean, whose rounding at 0 and 255 leaves BCE's [0, 1]
    raw = torch.randint(1, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (raw.float() / 255 - MEAN) / STD
    ours = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return x, y, raw, ours


def setup_infopro(path: Path, args: argparse.Namespace, notes: list[str]) -> Case:
    sys.path.insert(0, str(path / "Experiments on CIFAR-SVHN-STL10"))
    resnet = importlib.import_module("networks.resnet")
    torch.manual_seed(0)
    with patched(torch.Tensor, "cuda", lambda t, *_, **__: t):  # __init__ moves constants with .cuda()
        ref = resnet.resnet32(
            local_module_num=8, batch_size=args.batch, aux_net_config="1c2f", local_loss_mode="contrast"
        )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=args.infopro_wd)
    cfg = ll.load_config(PRESET, ["run.device=cpu", f"optim.weight_decay={args.infopro_wd}", *args.override])
    lambdas = [float(v) for v in cfg.method.lambdas]  # the preset's [ixx_1, ixy_1, ixx_2, ixy_2], for both
    x, y, raw, xo = make_batch(args.batch, cfg.model.channels_last)
    backbone = ll.create_model("resnet32", in_channels=3, width=16, num_classes=10)
    engine = make_engine(cfg, backbone, ll.ClassificationTask(10), torch.device("cpu"), xo)
    blocks = ref.layers[0]
    units = [0 if s == 0 else 1 + (s - 1) * blocks + j for s, j in ref.infopro_config]
    expected = [u + 1 for u in units] + [len(backbone.units)]
    if engine.ends != expected:
        notes.append(f"infopro: split differs, reference ends {expected} vs locallearn {engine.ends}")

    def ours_forward() -> None:
        h = xo[:4]
        for module in engine.modules:
            h = module(h)

    src = layer_order([ref], lambda: ref.forward_original(x[:4]))
    pairs = copy_layers(src, layer_order(engine.modules, ours_forward), "infopro backbone", notes)
    h = xo[:4]
    for k, (s, j) in enumerate(ref.infopro_config):
        h = engine.modules[k].eval()(h).detach()
        dec, cls = getattr(ref, f"decoder_{s}_{j}"), getattr(ref, f"aux_classifier_{s}_{j}")
        objective = engine.method.aux[k].independent
        src = layer_order([dec, cls], lambda: (dec(h, raw[:4] / 255), cls(h, y[:4])))  # noqa: B023
        dst = layer_order([objective], lambda: objective.outputs(h, ll.Batch(xo[:4], y[:4], raw[:4])))  # noqa: B023
        pairs += copy_layers(src, dst, f"infopro aux {k}", notes)

    def ref_step() -> None:  # train.py's step
        ref_opt.zero_grad()
        ref.train()(x, y, *lambdas)  # ixx_1, ixy_1, ixx_2, ixy_2, as train.py passes them
        ref_opt.step()

    info = {"k": engine.k, "ends": engine.ends, "lambdas": lambdas, "channels_last": cfg.model.channels_last}
    return Case(ref_step, lambda: engine.train_step(ll.Batch(xo, y, raw)), pairs, info)


def setup_dgl(path: Path, args: argparse.Namespace, notes: list[str]) -> Case:
    spec = importlib.util.spec_from_file_location("dgl_reference_models", path / "auxiliary_nets_study/models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    ref = models.Net(aux_type="mlp-sr")  # cifar_dgl.py's defaults: depth 6, 128 wide, block_size 1
    n = len(ref.blocks)
    parts = [[*ref.blocks[i].parameters(), *ref.auxillary_nets[i].parameters()] for i in range(n)]
    ref_opts = [torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4) for ps in parts]  # as cifar_dgl.py
    # channels_last off: the reference head (the user model's last unit) flattens with .view, refused on it
    over = ["method.name=dgl", "method.dgl_head=mlp-sr", "optim.nesterov=false", "model.channels_last=false"]
    cfg = ll.load_config(None, ["run.device=cpu", *over, *args.override])
    cfg = replace(cfg, split=replace(cfg.split, cuts=[str(i) for i in range(n - 1)]))
    x, y, raw, xo = make_batch(args.batch, cfg.model.channels_last)
    ref_seq = nn.Sequential(*ref.blocks, ref.auxillary_nets[-1])  # the reference's own modules, not copies
    model = copy.deepcopy(ref_seq)  # the user's model: blocks and the last block's classifier as the head
    engine = engine_from_model(cfg, model, ll.ClassificationTask(10), torch.device("cpu"), xo)
    pairs = [*zip(ref_seq.parameters(), model.parameters()), *zip(ref_seq.buffers(), model.buffers())]
    h = xo[:4]
    for k in range(n - 1):
        h = engine.modules[k].eval()(h).detach()
        aux, objective = ref.auxillary_nets[k], engine.method.aux[k].independent
        src = layer_order([aux], lambda: aux(h))  # noqa: B023
        dst = layer_order([objective], lambda: objective.outputs(h, ll.Batch(xo[:4], y[:4])))  # noqa: B023
        pairs += copy_layers(src, dst, f"dgl aux {k}", notes)
    criterion = nn.CrossEntropyLoss()

    def ref_step() -> None:  # cifar_dgl.py's inner loop over the modules
        ref.train()
        rep = x
        for i in range(n):
            ref_opts[i].zero_grad()
            outputs, rep = ref(rep, n=i)
            criterion(outputs, y).backward()
            ref_opts[i].step()
            rep = rep.detach()

    info = {"k": engine.k, "ends": engine.ends, "channels_last": cfg.model.channels_last}
    return Case(ref_step, lambda: engine.train_step(ll.Batch(xo, y)), pairs, info)


def fidelity(case: Case) -> dict[str, Any]:
    """One step of each from identical weights on the same batch: per-module losses and the state afterwards."""
    before = [a.detach().clone() for a, _ in case.pairs if isinstance(a, nn.Parameter)]
    seen: list[torch.Tensor] = []  # each loss the reference backpropagates (its forward keeps them to itself)
    original = torch.Tensor.backward

    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        seen.append(loss.detach().clone())
        original(loss, *args, **kwargs)

    with patched(torch.Tensor, "backward", backward):
        case.ref_step()
    after = [a.detach() for a, _ in case.pairs if isinstance(a, nn.Parameter)]
    ref_losses = [float(t) for t in seen]
    our_losses = case.ours_step().losses()
    diffs = [abs(a - b) for a, b in zip(ref_losses, our_losses)]
    return {
        "ref_losses": ref_losses,
        "our_losses": our_losses,
        "loss_max_abs_diff": max(diffs) if len(ref_losses) == len(our_losses) else None,
        "param_max_abs_diff_after_step": max_diff(case.pairs, params=True),
        "param_update_max_abs": max(float((a - b).abs().max()) for a, b in zip(after, before)),
        "bn_stats_max_abs_diff_after_step": max_diff(case.pairs, params=False),
        "tensors_compared": len(case.pairs),
    }


def timing(case: Case, threads: int, warmup: int, steps: int) -> dict[str, Any]:
    """Median step time of reference and locallearn, interleaved (ref, ours, ref, ours, ...)."""
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"ref": [], "ours": []}
    for i in range(warmup + steps):
        for who in ("ref", "ours"):
            start = time.perf_counter()
            case.ref_step() if who == "ref" else case.ours_step()
            if i >= warmup:
                times[who].append(1000 * (time.perf_counter() - start))
    ref_ms, our_ms = statistics.median(times["ref"]), statistics.median(times["ours"])
    return {"threads": threads, "ref_ms": ref_ms, "ours_ms": our_ms, "ratio": our_ms / ref_ms, "times_ms": times}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()


def environment() -> dict[str, Any]:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    cpu = found.group(1).strip() if found else platform.processor()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "locallearn_commit": git("-C", str(ROOT), "rev-parse", "HEAD"),
        "locallearn_dirty": bool(git("-C", str(ROOT), "status", "--porcelain", "--", "src")),
    }


def checkout_commit(path: Path, git_dir: str | None) -> str:
    """The reference commit: from ``git_dir`` (the repository the checkout was archived from), else from the
    checkout itself when it is a clone."""
    if git_dir:
        return git(f"--git-dir={git_dir}", "rev-parse", "HEAD")
    top = git("-C", str(path), "rev-parse", "--show-toplevel")
    return git("-C", str(path), "rev-parse", "HEAD") if top and Path(top) == path.resolve() else "unknown"


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| case | threads | reference ms | locallearn ms | locallearn/reference | max loss diff | max param diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, case in report["cases"].items():
        fid = case["fidelity"]
        for t in case["timing"]:
            rows.append(
                f"| {name} | {t['threads']} | {t['ref_ms']:.1f} | {t['ours_ms']:.1f} | {t['ratio']:.3f} | "
                f"{fid['loss_max_abs_diff'] or 0:.2e} | {fid['param_max_abs_diff_after_step']:.2e} |"
            )
    env = report["env"]
    a = report["args"]
    head = (
        f"torch {env['torch']}, {env['cpu']}, locallearn {env['locallearn_commit'][:10]}, batch {a['batch']}, "
        f"median of {a['steps']} steps after {a['warmup']}, load {env['loadavg_start'][0]:.2f} -> "
        f"{env['loadavg_end'][0]:.2f}"
    )
    notes = [f"* {note}" for case in report["cases"].values() for note in case["notes"]]
    return "\n".join([head, "", *rows, "", *notes]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--infopro", type=Path, help="checkout of blackfeather-wang/InfoPro-Pytorch")
    p.add_argument("--dgl", type=Path, help="checkout of eugenium/DGL")
    p.add_argument("--infopro-git-dir", help="the repository the InfoPro checkout came from (for its commit)")
    p.add_argument("--dgl-git-dir", help="the repository the DGL checkout came from (for its commit)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--infopro-wd", type=float, default=5e-4, help="weight decay of both InfoPro optimizers")
    p.add_argument("--override", action="append", default=[], help="locallearn config key=value (repeatable)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args()
    if not (args.infopro or args.dgl):
        p.error("give --infopro PATH and/or --dgl PATH")
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "env": environment(),
        "allocator": ll.tune_cpu_allocator(),
        "cases": {},
    }
    setups = {
        "infopro_resnet32_k8": (args.infopro, args.infopro_git_dir, setup_infopro),
        "dgl_net_mlp_sr": (args.dgl, args.dgl_git_dir, setup_dgl),
    }
    for name, (path, git_dir, setup) in setups.items():
        if path is None:
            continue
        notes: list[str] = []
        torch.set_num_threads(1)
        case = setup(path, args, notes)
        result = {"reference_commit": checkout_commit(path, git_dir), **case.info}
        result["fidelity"] = fidelity(case)
        if result["fidelity"]["loss_max_abs_diff"] is None:
            notes.append(f"{name}: the two give different numbers of losses")
        elif result["fidelity"]["loss_max_abs_diff"] > 1e-5:
            notes.append(f"{name}: a per-module loss differs by more than 1e-5")
        result["timing"] = [timing(case, t, args.warmup, args.steps) for t in threads]
        result["notes"] = notes
        report["cases"][name] = result
        print(json.dumps({name: {k: v for k, v in result.items() if k != "timing"}}, indent=1), flush=True)
    report["env"]["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
