"""Does binding each of 2 processes to a core of its own raise their total throughput on this machine?

Two processes each train sequential DGL (ResNet-32, K=2, batch 64) on fixed Fashion-MNIST batches, 10 timed steps
after 2 warm-up steps, pinned (rank r on core r) and unpinned in alternating order, 12 rounds. Run from the
repository root with the package installed: ``OMP_NUM_THREADS=1 python
benchmarks/scripts/pipeline_fmnist_k2_same_window__pin_experiment.py``. Output (redirected):
``benchmarks/pipeline_fmnist_k2_same_window/pin_experiment.log``.
"""

import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from locallearn.bench.bench import bench_batches
from locallearn.bench.variants import Variant, variant_config
from locallearn.data.datasets import dataset_spec
from locallearn.train.build import build_engine
from locallearn.train.config import load_config

OVERRIDES = ["model.name=resnet32", "method.name=dgl", "data.batch_size=64", "run.device=cpu"]


def worker(rank: int, pin: bool, barrier, queue) -> None:
    torch.set_num_threads(1)
    if pin:
        os.sched_setaffinity(0, {rank})
    cfg = variant_config(load_config("configs/fmnist/demo.yaml", OVERRIDES), Variant("dgl", None, 2))
    batches, _ = bench_batches(cfg, torch.device("cpu"), 4)
    engine = build_engine(cfg, dataset_spec(cfg.data.name), torch.device("cpu"), batches[0].input)
    for i in range(2):
        engine.train_step(batches[i % 4])
    barrier.wait()
    start = time.perf_counter()
    for i in range(10):
        engine.train_step(batches[i % 4])
    queue.put(10 * 64 / (time.perf_counter() - start))


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    results: dict[bool, list[float]] = {True: [], False: []}
    for r in range(12):
        for pin in (True, False) if r % 2 == 0 else (False, True):
            barrier, queue = ctx.Barrier(2), ctx.Queue()
            procs = [ctx.Process(target=worker, args=(k, pin, barrier, queue)) for k in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            results[pin].append(queue.get() + queue.get())
        print(r, "pinned", round(results[True][-1]), "unpinned", round(results[False][-1]), flush=True)
    ratios = [a / b for a, b in zip(results[True], results[False])]
    print("pinned/unpinned median", statistics.median(ratios), sorted(round(x, 3) for x in ratios))
