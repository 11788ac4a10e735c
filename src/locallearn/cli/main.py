"""``locallearn`` command line: train, eval, compare, summary, list, bench, plot.

    locallearn train -c configs/fmnist/demo.yaml method.name=dgl split.k=4
    locallearn train --resume runs/<run>
    locallearn eval runs/<run>
    locallearn compare -c configs/fmnist/demo.yaml --methods e2e,dgl,infopro
    locallearn summary -c configs/cifar10/resnet110_infopro_k4.yaml
    locallearn list
    locallearn bench memory -c configs/cifar10/resnet32_infopro_k4.yaml --methods e2e,dgl,infopro --k 2,4,8,16
    locallearn bench pipeline -c configs/fmnist/demo.yaml --k 2 --simulate 4 method.name=dgl
    locallearn plot runs/bench_demo --out figures
    locallearn data get cifar10 --root data

Every error a user can cause prints one line (``locallearn: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..data.idx import DataError
from ..names import package_version
from ..parallel.link import StageError
from ..train.allocator import tune_cpu_allocator
from ..train.config import ConfigError
from ..train.interrupt import Interrupted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locallearn", description="Supervised local learning for PyTorch.")
    p.add_argument("--version", action="version", version=f"locallearn {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a YAML preset with key=value overrides")
    t.add_argument("-c", "--config", help="YAML preset (see configs/)")
    t.add_argument(
        "--resume",
        help="run directory (or checkpoint) to continue from; 'auto' with -c: the newest run of the same run name "
        "in run.out if it has a checkpoint, else a new run",
    )
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. split.k=8 optim.lr=0.05")

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on its test set")
    e.add_argument("run", help="run directory or ckpt_last.pt")
    e.add_argument("overrides", nargs="*", help="data.* / run.* overrides, e.g. data.root=/data run.device=cpu")

    e.add_argument("--best", action="store_true", help="the best checkpoint (ckpt_best.pt) instead of the last")

    x = sub.add_parser("export", help="write a run's trained network as one plain state_dict (the model's own keys)")
    x.add_argument("run", help="run directory (single-process, data-parallel or PPLL)")
    x.add_argument("--out", required=True, help="file to write, e.g. model.pt")
    x.add_argument("--best", action="store_true", help="export the best checkpoint (ckpt_best.pt) instead of the last")
    x.add_argument("overrides", nargs="*", help="data.* / run.* overrides, e.g. data.root=/data")

    c = sub.add_parser("compare", help="train several methods side by side and print one table (the demo)")
    c.add_argument("-c", "--config", required=True, help="YAML preset shared by all methods")
    c.add_argument("--methods", default="e2e,dgl,infopro", help="comma-separated, add-ons with +, e.g. e2e,dgl,dgl+man")
    c.add_argument(
        "--out",
        help="folder for the runs and the table (default a new RUN_OUT/<date>_compare); rerun "
        "with the same --out to skip finished methods and continue an interrupted one",
    )
    c.add_argument("--jobs", type=int, default=1, help="methods trained at once, one process each (default 1)")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")

    s = sub.add_parser("summary", help="per-module parameters, FLOPs, saved-activation bytes and aux overhead")
    s.add_argument("-c", "--config", help="YAML preset")
    s.add_argument("overrides", nargs="*")

    sub.add_parser("list", help="registered models, methods, datasets and split presets")

    pn = sub.add_parser("plan", help="which K and batch fit a memory budget (predicted, nothing allocated)")
    pn.add_argument("-c", "--config", required=True, help="YAML preset")
    pn.add_argument("--memory", required=True, help="memory per device, e.g. 24GiB, 80GB")
    pn.add_argument("--devices", type=int, default=1, help="devices; N > 1 plans PPLL with one stage each (K=N)")
    pn.add_argument("overrides", nargs="*")

    b = sub.add_parser("bench", help="memory, speed, FLOPs and accuracy of several methods and K (results.json/.md)")
    kinds = b.add_subparsers(dest="kind", required=True)  # a sub-level, so key=value may follow the options
    for kind in ("memory", "speed", "accuracy", "all", "pareto"):
        k = kinds.add_parser(kind, help=f"bench {kind}")
        k.add_argument("-c", "--config", required=True, help="YAML preset shared by every (method, K)")
        k.add_argument(
            "--methods",
            default="e2e,dgl,infopro",
            help="comma-separated name[+addon...][:split], e.g. e2e,dgl,dgl+man,infopro:infopro_star",
        )
        k.add_argument("--k", default="2,4,8,16", help="comma-separated K for the local methods (e2e is always K=1)")
        k.add_argument("--seeds", type=int, default=1, help="accuracy: seeds run.seed, run.seed+1, ... (default 1)")
        k.add_argument("--steps", type=int, help="memory: measured steps (default 1); speed: timed steps per round (5)")
        k.add_argument("--repeats", type=int, default=5, help="speed: interleaved rounds (default 5)")
        k.add_argument("--warmup", type=int, default=2, help="speed: untimed steps per method first (default 2)")
        k.add_argument("--jobs", type=int, default=1, help="accuracy: runs trained at once (default 1)")
        k.add_argument("--out", help="results folder (default RUN_OUT/bench_<config>); rerun with it to resume")
        k.add_argument("--accuracy", help="pareto: an accuracy study's results.json for the accuracy column")
        k.add_argument(
            "--report-only",
            action="store_true",
            help="pareto: measure nothing, rewrite the table and plot from --out's results.json (a study grew); "
            "accuracy: train nothing, read the finished runs' records again and rewrite the table",
        )
        k.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    pp = kinds.add_parser("pipeline", help="PPLL vs sequential LL, GPipe, 1F1B, DDP and E2E on the same split")
    pp.add_argument("-c", "--config", required=True, help="YAML preset; its local method gives the split")
    pp.add_argument("--k", type=int, default=2, help="stages = processes of the multi-process runs (default 2)")
    pp.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    pp.add_argument("--warmup", type=int, default=3, help="steps before timing; the first is the fill (default 3)")
    pp.add_argument("--repeats", type=int, default=5, help="rounds; figures are medians over rounds (default 5)")
    pp.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    pp.add_argument("--micro", help="GPipe/1F1B micro-batch counts, comma-separated (default K,2K,4K)")
    pp.add_argument(
        "--rows", help="row kinds to time, comma-separated (default all), e.g. solo,ppll,stages,independent"
    )
    pp.add_argument("--simulate", help="comma-separated K to predict from measured stage and transfer times")
    pp.add_argument("--simulate-only", action="store_true", help="only the simulation (no timed runs)")
    pp.add_argument("--timeout", type=float, default=900, help="seconds one group of runs may take (default 900)")
    pp.add_argument("--out", help="results folder (default RUN_OUT/bench_pipeline_<config>)")
    pp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.name=dgl model.name=resnet32")

    pl = sub.add_parser("plot", help="PNG figures from run directories and bench results (needs [plot])")
    pl.add_argument("inputs", nargs="+", help="run directories, bench folders or results.json files")
    pl.add_argument("--out", required=True, help="folder for the PNGs")

    d = sub.add_parser("data", help="dataset files: `data get NAME --root DIR` downloads and verifies them")
    actions = d.add_subparsers(dest="action", required=True)
    g = actions.add_parser("get", help="download, verify (size + sha256) and extract a dataset's official archives")
    g.add_argument("name", help="fashion_mnist, mnist, cifar10, cifar100, svhn, svhn_extra or stl10")
    g.add_argument("--root", default="data", help="parent folder; files go to ROOT/<dataset> (default data)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_cpu_allocator()  # CPU step times without glibc's per-step munmap/page-fault churn (train/allocator.py)
    try:
        if args.command == "train":
            from ..train.config import load_config
            from ..train.entry import fit

            if not args.config and not args.resume:
                raise ConfigError("train needs -c CONFIG.yaml (a preset from configs/) or --resume RUN_DIR")
            cfg = load_config(args.config, args.overrides) if args.config else None
            from ..parallel import fit_parallel, wants_parallel  # ppll / dp runs, and resuming them

            if args.resume == "auto":
                from ..train.entry import latest_run

                if cfg is None:
                    raise ConfigError("--resume auto needs -c CONFIG.yaml: it looks for the config's run name")
                args.resume = latest_run(cfg)
                if args.resume is None:
                    print("--resume auto: no earlier run of this name with a checkpoint; starting a new one")

            if wants_parallel(cfg, args.resume):
                fit_parallel(cfg, resume=args.resume, overrides=[] if cfg else args.overrides)
            elif cfg is not None:
                fit(cfg, resume=args.resume)
            else:
                fit(resume=args.resume, overrides=args.overrides)
        elif args.command == "eval":
            from .commands import evaluate_run

            evaluate_run(args.run, args.overrides, "best" if args.best else "last")
        elif args.command == "export":
            from .commands import export_run

            export_run(args.run, args.out, "best" if args.best else "last", args.overrides)
        elif args.command == "compare":
            from .commands import compare

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            compare(args.config, methods, args.overrides, out=args.out, workers=args.jobs)
        elif args.command == "summary":
            from .commands import summary

            summary(args.config, args.overrides)
        elif args.command == "plan":
            from ..train.config import load_config
            from ..train.plan import plan_command

            plan_command(load_config(args.config, args.overrides), args.memory, args.devices)
        elif args.command == "list":
            from .commands import list_registries

            list_registries()
        elif args.command == "bench" and args.kind == "pipeline":
            from .commands import bench_pipeline

            bench_pipeline(args)
        elif args.command == "bench":
            from ..bench.bench import run_bench
            from ..bench.report import command_line

            try:
                ks = [int(k) for k in args.k.split(",") if k.strip()]
            except ValueError:
                raise ConfigError(f"--k must be comma-separated integers like 2,4,8, got {args.k!r}") from None
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            run_bench(
                args.kind,
                args.config,
                methods,
                ks,
                args.seeds,
                args.out,
                args.overrides,
                steps=args.steps,
                repeats=args.repeats,
                warmup=args.warmup,
                workers=args.jobs,
                accuracy=args.accuracy,
                report_only=args.report_only,
                command=command_line(),
            )
        elif args.command == "plot":
            from ..bench.plot import plot

            for path in plot(args.inputs, args.out):
                print(f"wrote {path}")
        elif args.command == "data":
            from ..data.get import get

            get(args.name, args.root)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"locallearn: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:  # a multi-process run whose rank died or hung: one line, not a traceback per rank
        print(f"locallearn: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # a run that saved its state at the current step and names the command to continue
        print(f"locallearn: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as e:
        if str(e):  # a multi-process run names its folder and last checkpoint
            print(f"locallearn: {e}", file=sys.stderr)
            return 130
        hint = {
            "train": " before training started or in a multi-process run: rerun with --resume RUN_DIR from its last "
            "checkpoint (see the run folder printed at the start)",
            "bench": "; rerun the same command with the same --out to continue",
        }.get(args.command, "")
        print(f"locallearn: interrupted{hint}", file=sys.stderr)
        return 130
    return 0
