"""Can the class-folder loader keep a GPU fed? Decode throughput of ImageNet-style folders, in images/s per worker.

    python -m locallearn.bench.loader_speed --workers 1,2,4 --out results/loader.json          # synthetic JPEGs
    python -m locallearn.bench.loader_speed --root /data/imagenet --workers 8,16

The training pipeline of :mod:`locallearn.data.imagefolder` (Pillow decode with ``draft``, RandomResizedCrop 224,
uint8 collate, pinned memory and ``non_blocking`` copies on CUDA, flip and normalisation on the device) is timed
over ``--batches`` batches after one warm-up batch, for each worker count. Without ``--root`` it writes
``--images`` synthetic JPEGs of ImageNet's typical size (500×375, quality 90) to a temporary folder. A GPU step of
ResNet-50 at batch 256 takes a fraction of a second, so a loader needs thousands of images/s: divide by the
per-worker figure for the cores it takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..train.build import build_loaders, resolve_device
from ..train.config import load_config


def write_jpegs(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (500, 375)) -> Path:
    """``root/{train,val}/<class>/*.JPEG``: smooth random images (JPEG-compressible like photographs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i}.JPEG", quality=90)
    return root


def loader_throughput(root: str | Path, workers: int, batches: int, batch_size: int, device: str) -> dict[str, Any]:
    """Images/s of the training loader with ``workers`` decode processes (one warm-up batch first)."""
    overrides = [f"data.root={root}", f"data.num_workers={workers}", f"data.batch_size={batch_size}"]
    cfg = load_config(None, ["data.name=imagefolder", f"run.device={device}", *overrides])
    dev = resolve_device(cfg.run.device)
    train, _, _ = build_loaders(cfg, dev)
    seen, start = 0, None
    for i, (x, _, _) in enumerate(train.batches(0)):
        if i == 0:
            start = time.perf_counter()  # after the first batch: workers started, pipeline full
            continue
        seen += len(x)
        if i == batches:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - (start or time.perf_counter())
    rate = seen / max(seconds, 1e-9)
    return {
        "workers": workers,
        "images": seen,
        "seconds": seconds,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="class folders root/train/<class>/ (default: synthetic JPEGs)")
    p.add_argument("--images", type=int, default=768, help="synthetic training images (default 768)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--batches", type=int, default=10, help="timed batches (default 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else write_jpegs(Path(tmp), args.images)
        rows = []
        for w in (int(v) for v in args.workers.split(",")):
            row = loader_throughput(root, w, args.batches, args.batch_size, args.device)
            print(f"workers {w}: {row['images_per_s']:.0f} images/s ({row['images_per_s_per_worker']:.0f} per worker)")
            rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "root": args.root, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
