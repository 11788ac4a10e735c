"""A model as you would write it, never seen by locallearn's tests: MobileNetV2-style inverted residual blocks with
squeeze-and-excitation, a long skip from the stem to the head, and a dict output. Train it with local learning

* from the command line (the builder is imported as ``package.module:function``)::

    PYTHONPATH=. locallearn train -c configs/fmnist/demo.yaml model.name=examples.your_model:mobilenet \\
        method.name=dgl 'split.cuts=[blocks.1,blocks.3]' split.k=null method.addons=[man]

* or from Python, wrapping the model as it is (this file's ``main``: DGL K=3 + MAN on real Fashion-MNIST)::

    python examples/your_model.py --epochs 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            SqueezeExcite(hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        plan = [(c, c, 1), (c, 2 * c, 2), (2 * c, 2 * c, 1), (2 * c, 4 * c, 2), (4 * c, 4 * c, 1), (4 * c, 4 * c, 1)]
        self.blocks = nn.Sequential(*(InvertedResidual(i, o, s) for i, o, s in plan))
        self.stem_proj = nn.Linear(c, 4 * c)  # a long skip: the stem's pooled features join the head
        self.classifier = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = self.stem(x)
        features = self.blocks(stem).mean((2, 3)) + self.stem_proj(stem.mean((2, 3)))
        return {"features": features, "logits": self.classifier(features)}


def mobilenet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> MobileNet:
    return MobileNet(num_classes, in_channels, width)


def main() -> None:
    import locallearn as ll
    from locallearn.data import load_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = load_split("fashion_mnist", None, split)
        raw = torch.from_numpy(images)
        return (raw.float() / 255 - 0.286) / 0.353, torch.from_numpy(labels), raw

    x, y, raw = tensors("train")
    x, y, raw = x[: args.limit], y[: args.limit], raw[: args.limit]
    test = tensors("test")

    model = mobilenet()
    backbone = ll.UnitBackbone.from_module(model, x[:2], cuts=["blocks.1", "blocks.3"])
    engine = ll.LocalEngine(
        backbone,
        ll.MethodCfg(name="dgl", addons=["man"]),
        ll.ClassificationTask(10),
        ll.OptimCfg(lr=0.05, weight_decay=5e-4, schedule="constant"),
    )
    print(f"K={engine.k} modules ending after {[backbone.cut_names[e - 1][0] for e in engine.ends[:-1]]}")
    start, batch = time.perf_counter(), 128
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        figures = 0  # per-module loss sums, train hits, steps: summed on the device, read once per epoch
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            figures = figures + engine.train_step(ll.Batch(x[idx], y[idx], raw[idx])).figures
        losses = [round(v / figures[-1].item(), 3) for v in figures[:-2].tolist()]
        batches = [(test[0][i : i + 500], test[1][i : i + 500], test[2][i : i + 500]) for i in range(0, 10000, 500)]
        result = engine.evaluate(batches)
        print(
            f"epoch {epoch + 1}: train loss per module {losses}, test_acc {result['test_acc']:.4f}, "
            f"aux_acc {[round(a, 4) for a in result['aux_acc']]}, {time.perf_counter() - start:.0f} s"
        )
    fresh = mobilenet()
    fresh.load_state_dict(backbone.state_dict(), strict=True)  # the trained weights are the model's own
    print("state_dict loads back into MobileNet (strict=True)")


if __name__ == "__main__":
    main()
