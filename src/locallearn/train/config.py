"""Typed run configuration: nested dataclasses ⇄ YAML, with dotted ``key=value`` overrides (docs/configuration.md).

Values are coerced to the field's type (``split.k=8`` → int, ``optim.lr=1e-3`` → float, bools, lists), Literal
fields are checked, and unknown keys are rejected with a ``difflib`` suggestion. No ``exec``/``eval``: values are
parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..methods.options import MethodCfg
from ..names import did_you_mean

# Scientific notation that YAML 1.1 (PyYAML) leaves as a string: 1e-3, 2E5, 5e+2.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A bad config file or override (one line: which key, what is wrong, what to do)."""


@dataclass
class DataCfg:
    """``name``: registered dataset; ``root``: folder with its files (None = the standard locations).
    ``pad``/``pad_mode``/``flip``: None = the dataset's recipe (docs/data.md). ``limit_train``/``limit_test``:
    use only the first N samples (quick runs and tests).

    Super-resolution datasets (:mod:`locallearn.data.sr`): ``scale`` (2, 3, 4), ``patch_size`` (HR side of a
    random training patch, a multiple of ``scale``; EDSR: 96 for ×2), ``repeat`` (patches per training image per
    epoch), ``test_root`` (evaluation image folder; None = the dataset's own test split). ``flip`` then means
    random flips and 90° rotations; the limits count images. Folders are indexed, not held in memory:
    ``num_workers`` DataLoader processes decode each image and cut its patch (DIV2K fits any machine).

    Class-folder datasets (``imagenet``, ``imagefolder``; :mod:`locallearn.data.imagefolder`): ``num_workers``
    DataLoader processes decode the JPEGs; ``image_size`` is the crop side (None = the dataset's, 224; evaluation
    resizes the short side to image_size/0.875, 256 for 224, as InfoPro's ImageNet scripts).

    Text (``text``; :mod:`locallearn.data.text`): ``root`` is a ``.txt`` file or a folder of them, read as byte
    tokens; ``seq_len`` tokens per sample; the last ``test_fraction`` of the bytes is the test split; the limits
    count windows."""

    name: str = "fashion_mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    pad: int | None = None
    pad_mode: Literal["zero", "reflect"] | None = None
    flip: bool | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    num_workers: int = 4
    image_size: int | None = None
    scale: int = 2
    patch_size: int = 96
    repeat: int = 16
    test_root: str | None = None
    seq_len: int = 128
    test_fraction: float = 0.1


@dataclass
class ModelCfg:
    """``name``: registered backbone, or your own model as ``package.module:function`` (imported with importlib;
    the function returns an ``nn.Module``, wrapped with ``UnitBackbone.from_module`` and cut at ``split.cuts``);
    ``kwargs``: keyword arguments of the builder (``model.kwargs.depth=50``); ``output``: the key or index of the
    prediction when your model returns a dict / tuple / dataclass (default: ``.logits``, else the first tensor);
    ``width``: its base width (a ViT's embedding dim); ``patch_size``: a ViT's
    patch side (None = the model's own, 16 at 224 px); when set, the ViT is built for the dataset's image size, e.g.
    ``model.patch_size=4`` on CIFAR's 32×32 gives the 8×8 token grid of CIFAR ViTs. ``leaf_modules``: submodules of
    your own model that capture must not trace into (data-dependent control flow; a failed capture names them)."""

    name: str = "resnet20"
    width: int = 16
    channels_last: bool = True
    patch_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: int | str | None = None
    leaf_modules: list[str] = field(default_factory=list)


@dataclass
class OptimCfg:
    """The optimizer and the papers' schedules (docs/configuration.md, "The papers' optimizer recipes").

    ``name``: ``sgd`` (``momentum``, ``nesterov``; the ResNet recipes) or ``adamw`` (``betas``,
    ``eps``; MAN++'s ViT recipe: lr 1e-3, betas (0.9, 0.999), weight decay 0.05). ``weight_decay``
    applies to every parameter, aux nets included, as in the references. ``schedule``: ``cosine``
    (``warmup_epochs`` of InfoPro's blend warm-up from ``warmup_lr``), ``step`` (×``gamma`` at ``milestones``)
    or ``constant``. ``per_step``: update the lr every step (smooth, for short runs) instead of once per epoch (the
    reference). ``first_epoch``: the index a per-epoch cosine gives the first epoch: 1 in InfoPro's CIFAR scripts
    (the first epoch already decays), 0 in the ImageNet scripts (the first epoch runs at lr0)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [80, 120])
    gamma: float = 0.1
    per_step: bool = True
    first_epoch: Literal[0, 1] = 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class RunCfg:
    """``device``: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:1``. ``threads``: torch CPU threads
    (None = torch's default). ``max_steps``: stop early (smoke runs). ``amp``: ``none``, ``bf16`` or ``fp16``.
    ``compile``: ``torch.compile`` each module and aux objective in place, with ``compile_backend`` (``inductor``;
    ``aot_eager`` traces without code generation, ``cudagraphs`` on CUDA). ``ckpt_every``: also checkpoint every
    N steps.
    ``ckpt_minutes``: also checkpoint about every this many minutes (0 = off), so a crash loses at most that much:
    by the clock in one process, in a multi-process run every step count that takes that long at the first steps'
    speed (the same step on every rank); SIGINT and SIGTERM checkpoint at the current (or an agreed) step anyway.
    ``precision``: ``fp32``, or mixed precision with ``bf16`` or ``fp16`` autocast (fp16 with one GradScaler for all
    K losses) for every module, aux net and add-on. On CUDA, ``cudnn.benchmark`` is on (shapes are fixed)."""

    epochs: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    out: str = "runs"
    name: str | None = None
    max_steps: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    ckpt_every: int = 0
    ckpt_minutes: float = 10.0
    eval_every: int = 1
    progress: bool = True


@dataclass
class PPLLCfg:
    """Multi-process runs (``parallel: ppll`` and ``dp``; :mod:`locallearn.parallel`). ``procs``: ranks to spawn
    when not under torchrun (0 = require torchrun). ``window``: sends in flight per rank and direction
    (back-pressure). ``timeout``: seconds a rank waits for a peer before it exits naming the silent stage.
    ``ema_every``: a later stage ships the weights that MAN/LAM EMA copies follow every N steps (1 = the
    single-process semantics). ``replicas``: data-parallel copies of the pipeline (world = K · replicas).
    ``labels``: where stages after the first get targets (and raw images): ``loader``, each rank's own identically
    seeded loader (only activations travel); ``send``, stage 0 alone reads data and they travel with the
    activations (for data on one node only, or a loader that is not reproducible across ranks). ``pin_cores``: on
    CPU, bind each local rank to cores of its own when the machine has enough for every rank's threads
    (:func:`locallearn.parallel.launch.pin_cores`; ``locallearn bench pipeline`` then pins every row alike). Off by
    default: DataLoader workers inherit their rank's cores."""

    procs: int = 0
    window: int = 2
    timeout: float = 120.0
    ema_every: int = 1
    replicas: int = 1
    labels: Literal["loader", "send"] = "loader"
    pin_cores: bool = False


@dataclass
class LogCfg:
    """``tensorboard``: also write every record's scalars (per-module losses, lr, accuracy, images/s, memory) as
    TensorBoard events to ``<run>/tb/`` (needs ``pip install 'locallearn[tb]'``); ``metrics.jsonl`` is always
    written. ``every``: a step record (``"kind": "step"``: per-module loss, lr, images/s since the last one) every
    N steps to the console, metrics.jsonl and TensorBoard (``step/`` tags); null = about every ``seconds``
    seconds, at the step count the first steps' speed gives (agreed by every rank); 0 = epoch records only."""

    tensorboard: bool = False
    every: int | None = None
    seconds: float = 30.0


@dataclass
class SplitCfg:
    """How the network is cut into local modules (docs/configuration.md, ``split``; decided by
    :mod:`locallearn.train.split`).

    Attributes:
        k: number of gradient-isolated local modules (the true count); None = len(``cuts``) + 1 with cuts, else the
            method's default (e2e 1, else 4).
        preset: ``auto`` (balanced by ``balance``), a paper preset (``infopro``, ``infopro_star``, ``man``, ...) or
            ``ends`` (the explicit ``ends`` list).
        balance: the cost an automatic split balances: ``units``, ``params``, ``flops``, ``activations`` or ``time``
            (measured forward + backward seconds per unit *and* of the aux net at each split point, for pipeline
            throughput; resolved to explicit ``ends`` once, when a run starts).
        ends: explicit exclusive end unit index of each module (with ``preset: ends``).
        cuts: your own model (``model.name: package.module:function``): the submodules after which the local
            modules end, fully qualified (``[layer1, layer2.3]``).
    """

    k: int | None = None
    preset: str = "auto"
    balance: Literal["units", "params", "flops", "activations", "time"] = "units"
    ends: list[int] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)


@dataclass
class TrainCfg:
    """``parallel``: ``none`` (one process, the sequential engine), ``ppll`` (one process per module) or ``dp``
    (data-parallel local learning: every process runs all modules on a shard of each batch)."""

    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    parallel: Literal["none", "ppll", "dp"] = "none"
    ppll: PPLLCfg = field(default_factory=PPLLCfg)
    log: LogCfg = field(default_factory=LogCfg)


# Split keys that lived under ``method`` before the split had a section of its own: method.<old> → split.<new>.
MOVED_TO_SPLIT = {"k": "k", "split": "preset", "balance": "balance", "ends": "ends", "cuts": "cuts"}
_NOTED: set[str] = set()


def moved_key(path: list[str], note: bool = True) -> list[str]:
    """A dotted key as it is named now (``method.k`` → ``split.k``), with a one-line note the first time."""
    if len(path) == 2 and path[0] == "method" and path[1] in MOVED_TO_SPLIT:
        new = ["split", MOVED_TO_SPLIT[path[1]]]
        if note and path[1] not in _NOTED:
            _NOTED.add(path[1])
            print(
                f"locallearn: note: method.{path[1]} is now {'.'.join(new)} (the old key still works; "
                "docs/configuration.md, section `split`)",
                file=sys.stderr,
            )
        return new
    return path


def _migrated(data: dict[str, Any], note: bool = False) -> dict[str, Any]:
    """Configs of earlier versions (presets, checkpoints, run directories): ``run.amp: none|bf16|fp16`` is now
    ``run.precision: fp32|bf16|fp16``; ``method.k/split/balance/ends/cuts`` are now ``split.k/preset/balance/ends/
    cuts`` (a ``split`` section's own keys win)."""
    if not isinstance(data, dict):
        return data
    run = data.get("run")
    if isinstance(run, dict) and "amp" in run and "precision" not in run:
        amp = run["amp"]
        run = {k: v for k, v in run.items() if k != "amp"} | {"precision": "fp32" if amp == "none" else amp}
        data = {**data, "run": run}
    method = data.get("method")
    if isinstance(method, dict) and any(key in method for key in MOVED_TO_SPLIT):
        moved = {moved_key(["method", key], note)[1]: method[key] for key in MOVED_TO_SPLIT if key in method}
        split = data.get("split") if isinstance(data.get("split"), dict) else {}
        kept = {key: value for key, value in method.items() if key not in MOVED_TO_SPLIT}
        data = {**data, "method": kept, "split": {**moved, **split}}
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if not errors:
            raise ConfigError(f"{key}: cannot be {value!r}")
        raise ConfigError(errors[0] + "".join(f"; or {e.removeprefix(key + ': ')}" for e in errors[1:]))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{key}: expected a mapping like {{depth: 50}}, got {value!r}")
    if origin is list:
        if isinstance(value, (tuple, list)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    more = did_you_mean(leaf, known, prefix) or f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{more}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(prefix + key, list(types_))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=1e-3"`` → (["a", "b"], 0.001). The value is YAML (numbers, true/false, [lists], null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. split.k=8")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (unknown keys are caught later by :func:`_build`)."""
    for item in overrides:
        path, value = parse_override(item)
        path = moved_key(path)
        if path[0] == "split" and isinstance(data.get("method"), dict):  # a saved config of an earlier version
            data.update(_migrated(data))
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainCfg:
    """Read a YAML preset (or start from defaults), apply ``key=value`` overrides, and type-check everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; presets live in configs/, e.g. configs/fmnist/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections (data, model, method, optim, run)")
    return config_from_dict(apply_overrides(_migrated(data, note=True), overrides or []))


def config_from_dict(data: dict[str, Any]) -> TrainCfg:
    cfg = _build(TrainCfg, _migrated(data))
    check_domains(cfg)
    return cfg


# Numeric keys with a domain, as the user reads it (">= 1", "> 0", "[0, 1)"), and what the key means. None is
# always allowed where the field is optional (it means "the default" or "no limit").
DOMAINS: dict[str, tuple[str, str]] = {
    "data.batch_size": (">= 1", "images per training step"),
    "data.eval_batch_size": (">= 1", "images per evaluation batch"),
    "data.limit_train": (">= 1", "training images to use; leave unset (null) for all"),
    "data.limit_test": (">= 1", "test images to use; leave unset (null) for all"),
    "data.pad": (">= 0", "pixels of random-crop padding"),
    "data.num_workers": (">= 0", "DataLoader processes"),
    "data.image_size": (">= 1", "crop side in pixels"),
    "data.patch_size": (">= 1", "HR patch side in pixels"),
    "data.repeat": (">= 1", "patches per training image per epoch"),
    "data.seq_len": (">= 1", "tokens per text sample"),
    "data.test_fraction": ("(0, 1)", "share of the text held out for testing"),
    "model.width": (">= 1", "the backbone's base width"),
    "model.patch_size": (">= 1", "a ViT's patch side"),
    "split.k": (">= 1", "local modules"),
    "method.widen": (">= 1", "aux-net width multiplier"),
    "method.feature_dim": (">= 1", "aux projection size"),
    "method.temperature": ("> 0", "SupCon temperature"),
    "method.ema_decay": ("[0, 1)", "EMA momentum; 1.0 never moves the EMA"),
    "method.n_ema": (">= 0", "EMA twins per bridge"),
    "method.lam_depth": (">= 1", "units in a LAM leap chain"),
    "method.cascade_span": (">= 1", "modules a cascade loss reaches"),
    "method.w_ind": (">= 0", "weight of the independent loss"),
    "method.w_casc": (">= 0", "weight of the cascade loss"),
    "method.pff_patches": (">= 1", "n of the n×n patches"),
    "method.man_depth": (">= 1", "units a MAN bridge copies"),
    "method.glcan_local_depth": (">= 0", "layers in GLCAN's local adapter"),
    "method.checkpoint": (">= 0", "checkpointed segments per module: 0 = off, or 'sqrt'"),
    "optim.lr": ("> 0", "learning rate"),
    "optim.momentum": ("[0, 1)", "SGD momentum"),
    "optim.weight_decay": (">= 0", "weight decay"),
    "optim.warmup_epochs": (">= 0", "warm-up epochs"),
    "optim.warmup_lr": (">= 0", "warm-up start lr"),
    "optim.gamma": ("> 0", "step-decay factor"),
    "optim.eps": ("> 0", "AdamW epsilon"),
    "run.epochs": (">= 1", "passes over the training set"),
    "run.seed": (">= 0", "the run's seed"),
    "run.threads": (">= 1", "torch CPU threads; leave unset (null) for torch's default"),
    "run.max_steps": (">= 1", "steps before stopping early; leave unset (null) for no limit"),
    "run.ckpt_every": (">= 0", "steps between extra checkpoints; 0 = only at epoch ends"),
    "run.eval_every": (">= 1", "epochs between evaluations"),
    "run.ckpt_minutes": (">= 0", "minutes between time-based checkpoints; 0 = off"),
    "log.every": (">= 0", "steps between step records; 0 = off, null = about every log.seconds"),
    "log.seconds": ("> 0", "seconds between step records when log.every is null"),
    "ppll.procs": (">= 0", "ranks to spawn; 0 = started by torchrun"),
    "ppll.window": (">= 1", "sends in flight per rank and direction"),
    "ppll.timeout": ("> 0", "seconds a rank waits for a peer"),
    "ppll.ema_every": (">= 1", "steps between EMA weight shipments"),
    "ppll.replicas": (">= 1", "data-parallel copies of the pipeline"),
}
LIST_DOMAINS: dict[str, tuple[str, str]] = {  # every element of these lists
    "method.lambdas": (">= 0", "InfoPro loss weights"),
    "optim.milestones": (">= 0", "epochs of the step decays"),
    "optim.betas": ("[0, 1)", "AdamW betas"),
}


def in_domain(value: float, domain: str) -> bool:
    """``value`` in ``">= a"``, ``"> a"`` or an interval like ``"[a, b)"``."""
    if domain.startswith(">="):
        return value >= float(domain[2:])
    if domain.startswith(">"):
        return value > float(domain[1:])
    low, high = (float(v) for v in domain[1:-1].split(","))
    return (value >= low if domain[0] == "[" else value > low) and (
        value <= high if domain[-1] == "]" else value < high
    )


def check_domains(cfg: TrainCfg) -> None:
    """Every numeric key with a domain (:data:`DOMAINS`) in range, or one ConfigError naming the key, the value,
    the allowed range and what the key means, before any work starts."""
    flat = {
        f"{section}.{key}": value
        for section, sub in to_dict(cfg).items()
        if isinstance(sub, dict)
        for key, value in sub.items()
    }
    for key, (domain, meaning) in DOMAINS.items():
        if flat[key] is not None and not isinstance(flat[key], str) and not in_domain(flat[key], domain):
            where = domain if domain[0] in "<>" else f"in {domain}"
            raise ConfigError(f"{key}={flat[key]} is out of range: it must be {where} ({meaning})")
    for key, (domain, meaning) in LIST_DOMAINS.items():
        if not all(in_domain(v, domain) for v in flat[key]):
            where = domain if domain[0] in "<>" else f"in {domain}"
            raise ConfigError(f"{key}={flat[key]} is out of range: every element must be {where} ({meaning})")


def changed_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested config dicts (``split.k``, ``run.epochs``, ...)."""
    out = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out


def dump_config(cfg: TrainCfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
