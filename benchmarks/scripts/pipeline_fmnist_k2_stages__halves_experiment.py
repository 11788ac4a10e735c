"""The experiment that led to the ``stages`` row of ``bench pipeline``: per round, in one 2-process group, solo
(sequential LL on rank 0), ppll, halves (each rank runs its own stage on locally precomputed inputs, no messages)
and independent (each rank the whole sequential LL); step times in ms.

Run from the repository root:
``OMP_NUM_THREADS=1 python benchmarks/scripts/pipeline_fmnist_k2_stages__halves_experiment.py resnet32 "[7,17]" 8``
(model, ends, rounds). The ``stages`` row now does what ``halves`` did.
"""

import statistics
import sys

import torch
import torch.distributed as dist

from locallearn.parallel import pipeline_baselines as pb
from locallearn.parallel.ppll import stage_step
from locallearn.tasks.task import Batch
from locallearn.train.build import build_loaders
from locallearn.train.config import load_config


class _NoLink:
    def send(self, *args):
        pass


def _halves(engine, batches, opts, device):
    k = dist.get_rank()
    inputs = []
    for b in batches:
        h = b.input
        with torch.no_grad():
            for m in engine.modules[:k]:
                h = m(h)
        inputs.append(h)
    link = _NoLink()

    def step(i):
        stage_step(engine, k, inputs[i % len(inputs)], batches[i % len(batches)], link, i, None)

    return pb.timed_steps(step, opts.warmup + opts.steps, device, None)


pb.RUNNERS["halves"] = _halves  # also in the spawned ranks, which import this file as __mp_main__


def main() -> None:
    model, ends, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    overrides = [f"model.name={model}", "method.name=dgl", "split.preset=ends", f"split.ends={ends}"]
    cfg = load_config("configs/fmnist/demo.yaml", [*overrides, "data.batch_size=64", "run.device=cpu", "split.k=2"])
    torch.set_num_threads(1)
    train, _, _ = build_loaders(cfg, torch.device("cpu"))
    batches = []
    for item in train:
        batches.append(Batch(*item))
        if len(batches) == 8:
            break
    kinds = ["solo", "ppll", "halves", "independent"]
    out = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        jobs = [(k, cfg, pb.RunOpts(warmup=3, steps=10, threads=1)) for k in order]
        line = []
        for k, ranks in zip(order, pb.spawn_run(jobs, 2, batches, timeout=600)):
            if k == "halves":  # each rank's own step time
                per = [1000 * (rank["step_end_s"][-1] - rank["step_end_s"][2]) / 10 for rank in ranks]
                out[k].append(per)
                line.append(f"halves {per[0]:.0f}/{per[1]:.0f}")
                continue
            ms = pb.steady_state(ranks[:1] if k == "solo" else ranks, 3, 64)["step_ms"]
            out[k].append(ms)
            line.append(f"{k} {ms:.0f}")
        print(f"round {r}: " + ", ".join(line), flush=True)
    med = statistics.median
    halves = [med(h[i] for h in out["halves"]) for i in (0, 1)]
    print(
        f"medians ms: solo {med(out['solo']):.0f} ppll {med(out['ppll']):.0f} "
        f"halves {halves[0]:.0f}/{halves[1]:.0f} independent {med(out['independent']):.0f}"
    )
    print(f"per-round ppll / max(halves): {med(p / max(h) for p, h in zip(out['ppll'], out['halves'])):.3f}")
    ceiling = med(i / 2 / max(h) for i, h in zip(out["independent"], out["halves"]))
    print(f"per-round (independent/2) / max(halves): {ceiling:.3f}")


if __name__ == "__main__":
    main()
