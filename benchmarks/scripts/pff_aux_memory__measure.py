"""Aux-net saved activations with and without patch feature fusion (issue 4).

Run: python benchmarks/scripts/pff_aux_memory__measure.py > benchmarks/pff_aux_memory/results.md
"""

import torch

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.measure import SavedTensorMeter
from locallearn.methods.pff import patches
from locallearn.train.config import SplitCfg

torch.set_num_threads(1)
raw = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
x = (raw.float() / 255).contiguous(memory_format=torch.channels_last)
batch = Batch(x, torch.arange(128) % 10, raw)
print(
    "| base | module | aux MiB without PFF | PFF batched | PFF sequential: kept | PFF sequential: one patch, "
    "recomputed in backward |"
)
print("|---|---|---|---|---|---|")
for base in ("dgl", "infopro"):
    rows = {}
    for mode, extra in (
        ("none", {}),
        ("pff", {"addons": ["pff"]}),
        ("seq", {"addons": ["pff"], "pff_sequential": True}),
    ):
        torch.manual_seed(0)
        eng = LocalEngine(
            create_model("resnet32", num_classes=10, in_channels=1),
            MethodCfg(name=base, **extra),
            ClassificationTask(10),
            OptimCfg(),
        split=SplitCfg(k=16, preset="infopro"))
        h = batch.input
        outs = []
        with torch.no_grad():
            for m in eng.modules:
                h = m(h)
                outs.append(h)
        for k in (0, 7, 14):
            meter = SavedTensorMeter()
            with meter:
                loss = eng.method.local_loss(k, outs[k].detach().requires_grad_(), batch)
                loss.backward()
            rows.setdefault(k, {})[mode] = meter.peak / 2**20
            if mode == "seq":  # what one patch's recompute holds during backward (the meter cannot see it)
                fusion = eng.method.aux[k].independent
                patch = patches(outs[k].detach().requires_grad_(), fusion.n)[0]
                sub = Batch(batch.input, batch.target, patches(batch.raw, fusion.n)[0])
                meter = SavedTensorMeter()
                with meter:
                    out = fusion.objective.outputs(patch, sub)
                rows[k]["patch"] = meter.peak / 2**20
    for k, r in rows.items():
        name = eng.backbone.infos[eng.ends[k] - 1].name
        print(f"| {base} | {k} ({name}) | {r['none']:.2f} | {r['pff']:.2f} | {r['seq']:.2f} | {r['patch']:.2f} |")
