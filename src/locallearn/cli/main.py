"""``locallearn`` command line: train, eval, compare, summary, list.

    locallearn train -c configs/fmnist/demo.yaml method.name=dgl method.k=4
    locallearn train --resume runs/<run>
    locallearn eval runs/<run>
    locallearn compare -c configs/fmnist/demo.yaml --methods e2e,dgl,infopro
    locallearn summary -c configs/cifar10/resnet110_infopro_k4.yaml
    locallearn list

Every error a user can cause prints one line (``locallearn: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..data.idx import DataError
from ..train.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locallearn", description="Supervised local learning for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a YAML preset with key=value overrides")
    t.add_argument("-c", "--config", help="YAML preset (see configs/)")
    t.add_argument("--resume", help="run directory (or checkpoint) to continue from")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.k=8 optim.lr=0.05")

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on its test set")
    e.add_argument("run", help="run directory or ckpt_last.pt")
    e.add_argument("overrides", nargs="*", help="data.* / run.* overrides, e.g. data.root=/data run.device=cpu")

    c = sub.add_parser("compare", help="train several methods side by side and print one table (the demo)")
    c.add_argument("-c", "--config", required=True, help="YAML preset shared by all methods")
    c.add_argument("--methods", default="e2e,dgl,infopro", help="comma-separated methods (default e2e,dgl,infopro)")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")

    s = sub.add_parser("summary", help="per-module parameters, FLOPs, saved-activation bytes and aux overhead")
    s.add_argument("-c", "--config", help="YAML preset")
    s.add_argument("overrides", nargs="*")

    sub.add_parser("list", help="registered models, methods, datasets and split presets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from ..train.config import load_config
            from ..train.loop import fit

            if not args.config and not args.resume:
                raise ConfigError("train needs -c CONFIG.yaml (a preset from configs/) or --resume RUN_DIR")
            if args.config:
                fit(load_config(args.config, args.overrides), resume=args.resume)
            else:
                fit(resume=args.resume, overrides=args.overrides)
        elif args.command == "eval":
            from .commands import evaluate_run

            evaluate_run(args.run, args.overrides)
        elif args.command == "compare":
            from .commands import compare

            compare(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], args.overrides)
        elif args.command == "summary":
            from .commands import summary

            summary(args.config, args.overrides)
        elif args.command == "list":
            from .commands import list_registries

            list_registries()
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"locallearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locallearn: interrupted; resume with `locallearn train --resume RUN_DIR`", file=sys.stderr)
        return 130
    return 0
