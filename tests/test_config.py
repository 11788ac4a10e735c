"""locallearn.train.config: typed dataclass config ⇄ YAML, dotted overrides, coercion and error messages."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from locallearn.data import list_datasets
from locallearn.methods import list_methods
from locallearn.models import list_models
from locallearn.train.config import (
    ConfigError,
    DataCfg,
    MethodCfg,
    ModelCfg,
    OptimCfg,
    RunCfg,
    TrainCfg,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    to_dict,
)

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("**/*.yaml"))
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)

MANY_OVERRIDES = [
    "data.name=mnist",
    "data.root=/tmp/some data",
    "data.batch_size=64",
    "data.eval_batch_size=500",
    "data.pad=4",
    "data.pad_mode=reflect",
    "data.flip=false",
    "data.limit_train=1000",
    "data.limit_test=200",
    "data.num_workers=2",
    "data.image_size=160",
    "data.scale=3",
    "data.patch_size=48",
    "data.repeat=4",
    "data.test_root=/tmp/set5",
    "data.seq_len=64",
    "data.test_fraction=0.2",
    "model.name=resnet32",
    "model.width=32",
    "model.channels_last=false",
    "model.kwargs.depth=50",
    "model.kwargs.zero_init=true",
    "model.output=logits",
    "method.name=dgl",
    "split.k=8",
    "split.preset=ends",
    "split.balance=flops",
    "split.ends=[2, 5, 9]",
    "method.aux=2c1f",
    "method.widen=2",
    "method.feature_dim=64",
    "method.loss_mode=softmax",
    "method.lambdas=[1, 2, 3, 4]",
    "method.temperature=0.5",
    "method.dgl_head=cnn",
    "method.step=end",
    "optim.lr=0.05",
    "optim.momentum=0.8",
    "optim.nesterov=false",
    "optim.weight_decay=0.0001",
    "optim.schedule=step",
    "optim.warmup_epochs=2",
    "optim.warmup_lr=0.001",
    "optim.milestones=[3, 6]",
    "optim.gamma=0.2",
    "optim.per_step=false",
    "optim.name=adamw",
    "optim.first_epoch=0",
    "optim.betas=[0.8, 0.9]",
    "optim.eps=1e-6",
    "run.epochs=7",
    "run.seed=3",
    "run.device=cuda:1",
    "run.threads=2",
    "run.out=/tmp/runs",
    "run.name=exp1",
    "run.max_steps=10",
    "run.precision=bf16",
    "run.compile=true",
    "run.compile_backend=aot_eager",
    "run.ckpt_every=50",
    "run.eval_every=2",
    "run.progress=false",
]


def round_trip(cfg: TrainCfg) -> TrainCfg:
    return config_from_dict(yaml.safe_load(dump_config(cfg)))


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# defaults and round trips


def test_defaults():
    cfg = load_config(None, [])
    assert cfg == TrainCfg()
    assert isinstance(cfg.data, DataCfg) and isinstance(cfg.model, ModelCfg) and isinstance(cfg.method, MethodCfg)
    assert isinstance(cfg.optim, OptimCfg) and isinstance(cfg.run, RunCfg)
    assert cfg.method.lambdas == [5.0, 1.0, 0.5, 1.0]
    assert cfg.optim.milestones == [80, 120]
    # Mutable defaults are not shared between instances.
    cfg.optim.milestones.append(1)
    assert TrainCfg().optim.milestones == [80, 120]


def test_error_class():
    assert issubclass(ConfigError, ValueError)


def test_round_trip_defaults():
    cfg = TrainCfg()
    text = dump_config(cfg)
    assert isinstance(text, str)
    assert set(yaml.safe_load(text)) == {"data", "model", "method", "split", "optim", "run", "parallel", "ppll", "log"}
    assert round_trip(cfg) == cfg
    assert to_dict(round_trip(cfg)) == to_dict(cfg)


def test_many_overrides_applied_and_round_trip(tmp_path):
    cfg = load_config(None, MANY_OVERRIDES)
    d = to_dict(cfg)
    assert d["data"] == dict(
        name="mnist",
        root="/tmp/some data",
        batch_size=64,
        eval_batch_size=500,
        pad=4,
        pad_mode="reflect",
        flip=False,
        limit_train=1000,
        limit_test=200,
        num_workers=2,
        image_size=160,
        scale=3,
        patch_size=48,
        repeat=4,
        test_root="/tmp/set5",
        seq_len=64,
        test_fraction=0.2,
    )
    assert d["model"] == dict(
        name="resnet32",
        width=32,
        channels_last=False,
        patch_size=None,
        kwargs={"depth": 50, "zero_init": True},
        output="logits",
        leaf_modules=[],
    )
    assert d["split"] == dict(k=8, preset="ends", balance="flops", ends=[2, 5, 9], cuts=[])
    method_keys = (
        "name",
        "aux",
        "widen",
        "feature_dim",
        "loss_mode",
        "lambdas",
        "temperature",
        "dgl_head",
        "step",
    )
    assert {key: d["method"][key] for key in method_keys} == dict(
        name="dgl",
        aux="2c1f",
        widen=2,
        feature_dim=64,
        loss_mode="softmax",
        lambdas=[1.0, 2.0, 3.0, 4.0],
        temperature=0.5,
        dgl_head="cnn",
        step="end",
    )
    assert d["optim"] == dict(
        lr=0.05,
        momentum=0.8,
        nesterov=False,
        weight_decay=0.0001,
        schedule="step",
        warmup_epochs=2,
        warmup_lr=0.001,
        milestones=[3, 6],
        gamma=0.2,
        per_step=False,
        name="adamw",
        first_epoch=0,
        betas=[0.8, 0.9],
        eps=1e-6,
    )
    assert d["run"] == dict(
        epochs=7,
        seed=3,
        device="cuda:1",
        threads=2,
        out="/tmp/runs",
        name="exp1",
        max_steps=10,
        precision="bf16",
        compile=True,
        compile_backend="aot_eager",
        ckpt_every=50,
        ckpt_minutes=10.0,
        eval_every=2,
        progress=False,
    )
    assert round_trip(cfg) == cfg
    # Through a file too: the dump is itself a valid preset.
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path, []) == cfg


@SETTINGS
@given(
    lr=st.floats(min_value=0, max_value=1e6, allow_nan=False, exclude_min=True),
    k=st.none() | st.integers(1, 64),
    name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
    flag=st.booleans(),
    lambdas=st.lists(st.floats(0, 1e3), max_size=5),  # within the keys' domains (tested separately)
)
def test_round_trip_property(lr, k, name, flag, lambdas):
    cfg = TrainCfg()
    cfg.optim.lr, cfg.split.k, cfg.run.name, cfg.optim.nesterov, cfg.method.lambdas = lr, k, name, flag, lambdas
    back = round_trip(cfg)
    assert back == cfg
    assert type(back.optim.lr) is float


# ---------------------------------------------------------------------------------------------------------------------
# presets


def test_presets_exist():
    assert PRESETS, f"no presets under {CONFIGS}"


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_preset_loads(path):
    cfg = load_config(path, [])
    raw = yaml.safe_load(path.read_text()) or {}
    d = to_dict(cfg)
    for section, values in raw.items():
        for key, value in (values or {}).items():
            assert d[section][key] == value, f"{path}: {section}.{key}"
    assert cfg.data.name in list_datasets()
    assert cfg.method.name in list_methods()
    assert cfg.model.name in list_models() or cfg.model.name.startswith("transformers:")
    assert round_trip(cfg) == cfg
    # Overrides win over the file, and leave its other values alone.
    over = load_config(path, ["run.epochs=1", "run.max_steps=2"])
    assert over.run.epochs == 1 and over.run.max_steps == 2
    assert dataclasses.replace(over.run, epochs=cfg.run.epochs, max_steps=cfg.run.max_steps) == cfg.run
    assert over.method == cfg.method and over.optim == cfg.optim


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.3\n  gamma: 0.5\nmethod:\n  name: dgl\n  k: 3\nrun:\n")
    cfg = load_config(path, ["optim.lr=0.2", "method.lambdas=[1, 1, 1, 1]"])
    assert cfg.optim.lr == 0.2 and cfg.optim.gamma == 0.5
    assert cfg.method.name == "dgl" and cfg.split.k == 3 and cfg.method.lambdas == [1.0] * 4
    assert cfg.run == RunCfg()
    assert load_config(tmp_path / "c.yaml", None).optim.lr == 0.3
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, []) == TrainCfg()


# ---------------------------------------------------------------------------------------------------------------------
# coercion


@pytest.mark.parametrize(
    ("override", "attr", "expected", "tp"),
    [
        ("split.k=8", "split.k", 8, int),
        ("split.k=8.0", "split.k", 8, int),
        ("split.k=null", "split.k", None, type(None)),
        ("optim.lr=1e-3", "optim.lr", 0.001, float),
        ("optim.lr=1E-3", "optim.lr", 0.001, float),
        ("optim.lr=2.5e3", "optim.lr", 2500.0, float),
        ("optim.lr=0.001", "optim.lr", 0.001, float),
        ("optim.lr=1", "optim.lr", 1.0, float),
        ("optim.nesterov=false", "optim.nesterov", False, bool),
        ("optim.nesterov=True", "optim.nesterov", True, bool),
        ("method.lambdas=[1,2,3,4]", "method.lambdas", [1.0, 2.0, 3.0, 4.0], list),
        ("method.lambdas=[]", "method.lambdas", [], list),
        ("optim.milestones=[10, 20]", "optim.milestones", [10, 20], list),
        ("run.threads=null", "run.threads", None, type(None)),
        ("run.threads=", "run.threads", None, type(None)),
        ("run.threads=3", "run.threads", 3, int),
        ("run.name=123", "run.name", "123", str),
        ("run.name=a=b", "run.name", "a=b", str),
        ("data.root=~/data", "data.root", "~/data", str),
        ("data.pad_mode=reflect", "data.pad_mode", "reflect", str),
        ("data.pad_mode=null", "data.pad_mode", None, type(None)),
        ("method.step=module", "method.step", "module", str),
        (" optim.gamma = 0.5", "optim.gamma", 0.5, float),
    ],
)
def test_coercion(override, attr, expected, tp):
    section, key = attr.split(".")
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected
    assert type(value) is tp
    if tp is list:
        assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_parse_override_examples():
    assert parse_override("a.b=1e-3") == (["a", "b"], 0.001)
    assert parse_override("split.k=8") == (["split", "k"], 8)
    assert parse_override("optim.nesterov=false") == (["optim", "nesterov"], False)
    assert parse_override("method.lambdas=[1, 2.5]") == (["method", "lambdas"], [1, 2.5])
    assert parse_override("run.threads=null") == (["run", "threads"], None)
    assert parse_override("run.name=exp") == (["run", "name"], "exp")
    assert parse_override("x=[unclosed") == (["x"], "[unclosed")  # not YAML: kept as the raw string


# ---------------------------------------------------------------------------------------------------------------------
# hypothesis over the override parser

segment = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@SETTINGS
@given(n=st.integers(-(10**12), 10**12))
def test_parse_ints(n):
    path, value = parse_override(f"run.seed={n}")
    assert path == ["run", "seed"]
    assert value == n and type(value) is int
    if n >= 0:
        assert load_config(None, [f"run.seed={n}"]).run.seed == n
    else:  # parsed, then refused by the key's domain
        with pytest.raises(ConfigError, match=f"run.seed={n} is out of range: it must be >= 0"):
            load_config(None, [f"run.seed={n}"])


@SETTINGS
@given(x=st.floats(allow_nan=False, allow_infinity=False))
@example(x=1e-05)
@example(x=-1e-07)
@example(x=1e16)
@example(x=5e-324)
@example(x=-0.0)
def test_parse_floats(x):
    # repr() gives e.g. '1e-05' and '1e+16': YAML-1.2-style floats that PyYAML's 1.1 resolver reads as strings.
    path, value = parse_override(f"optim.lr={x!r}")
    assert path == ["optim", "lr"]
    assert type(value) is float and value == x
    assert math.copysign(1, value) == math.copysign(1, x)
    if x > 0:
        lr = load_config(None, [f"optim.lr={x!r}"]).optim.lr
        assert type(lr) is float and lr == x
    else:
        with pytest.raises(ConfigError, match="optim.lr=.* is out of range: it must be > 0"):
            load_config(None, [f"optim.lr={x!r}"])


@SETTINGS
@given(x=st.floats(min_value=1e-9, max_value=1e9), fmt=st.sampled_from(["{:e}", "{:.3e}", "{:E}", "{:f}", "{:g}"]))
@example(x=1e-05, fmt="{:g}")
@example(x=2e7, fmt="{:g}")
def test_parse_float_formats(x, fmt):
    text = fmt.format(x)
    if float(text) == 0:  # "{:f}" of 1e-9 prints 0.000000, which the lr's domain refuses
        return
    lr = load_config(None, [f"optim.lr={text}"]).optim.lr
    assert type(lr) is float and lr == float(text)


@SETTINGS
@given(b=st.booleans(), spelling=st.sampled_from([str.lower, str.capitalize, str.upper]))
def test_parse_bools(b, spelling):
    text = spelling(str(b))
    assert parse_override(f"optim.nesterov={text}") == (["optim", "nesterov"], b)
    assert load_config(None, [f"model.channels_last={text}"]).model.channels_last is b


@SETTINGS
@given(path=st.lists(segment, min_size=1, max_size=4), n=st.integers(0, 999))
def test_parse_dotted_keys(path, n):
    assert parse_override(".".join(path) + f"={n}") == (path, n)


@SETTINGS
@given(ints=st.lists(st.integers(-1000, 1000), max_size=6))
def test_parse_int_lists(ints):
    if any(v < 0 for v in ints):
        with pytest.raises(ConfigError, match="every element must be >= 0"):
            load_config(None, [f"optim.milestones={ints}", f"method.lambdas={ints}"])
        return
    cfg = load_config(None, [f"optim.milestones={ints}", f"method.lambdas={ints}"])
    assert cfg.optim.milestones == ints and all(type(v) is int for v in cfg.optim.milestones)
    assert cfg.method.lambdas == [float(v) for v in ints] and all(type(v) is float for v in cfg.method.lambdas)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_key_suggests():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optim.lrr=0.1"])
    assert_one_line(exc, "optim.lrr", "optim.lr")
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["method.lamdas=[1, 2, 3, 4]"])
    assert_one_line(exc, "method.lambdas")
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["run.zzzzzz=1"])  # nothing close: the known keys are listed
    assert_one_line(exc, "run.zzzzzz", "epochs", "max_steps")


@pytest.mark.parametrize("override", ["optimizer.lr=0.1", "training.epochs=3", "epochs=3"])
def test_unknown_section(override):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert_one_line(exc, override.split(".")[0].split("=")[0])


def test_unknown_section_suggests():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optimizer.lr=0.1"])
    assert_one_line(exc, "'optim'")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.loss_mode=foo", "method.loss_mode"),
        ("split.balance=seconds", "split.balance"),
        ("method.step=middle", "method.step"),
        ("optim.schedule=linear", "optim.schedule"),
        ("run.precision=fp8", "run.precision"),
        ("data.pad_mode=mirror", "data.pad_mode"),
    ],
)
def test_literal_violation(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = assert_one_line(exc, key, override.split("=")[1])
    assert "not one of" in msg


def test_literal_message_lists_choices():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["method.loss_mode=foo"])
    assert_one_line(exc, "contrast", "softmax")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("split.k=abc", "split.k"),
        ("split.k=1.5", "split.k"),
        ("split.k=true", "split.k"),
        ("optim.nesterov=3", "optim.nesterov"),
        ("optim.nesterov=null", "optim.nesterov"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("optim.lr=[0.1]", "optim.lr"),
        ("optim.milestones=5", "optim.milestones"),
        ("method.lambdas=[1, x]", "method.lambdas[1]"),
        ("model.width=1.5", "model.width"),
        ("data.batch_size=true", "data.batch_size"),
        ("model.name=[1, 2]", "model.name"),
        ("model.kwargs=3", "model.kwargs: expected a mapping"),
        ("split.cuts=layer1", "split.cuts: expected a list"),
        ("run.name=true", "run.name"),
        ("run.threads=two", "run.threads"),
    ],
)
def test_wrong_type(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert_one_line(exc, key)


@pytest.mark.parametrize("override", ["optim.lr", "split.k:8", "", "optim..lr=1", ".lr=1", "optim.=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert_one_line(exc)
    with pytest.raises(ConfigError):
        parse_override(override)


def test_override_without_equals_message():
    with pytest.raises(ConfigError) as exc:
        parse_override("optim.lr")
    assert_one_line(exc, "optim.lr", "key=value")


def test_override_into_a_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["optim.lr.x=1"])
    assert_one_line(exc, "lr")


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path, [])
    assert_one_line(exc, str(path), "not found")
    with pytest.raises(ConfigError):
        load_config(tmp_path, [])  # a directory is not a config file


@pytest.mark.parametrize("text", ["data: [unclosed\n", "optim:\n  lr: 0.1\n bad: indent\n", "a: b: c\n", "\t- x"])
def test_invalid_yaml_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, [])
    assert_one_line(exc, str(path))


@pytest.mark.parametrize("text", ["- data\n- model\n", "42\n", "just a string\n"])
def test_yaml_file_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, [])
    assert_one_line(exc, str(path), "mapping")


@pytest.mark.parametrize(
    "text", ["optim: 3\n", "optim: [0.1]\n", "optim: 0.1\n", "optim: 0\n", "optim: []\n", "optim: false\n"]
)
def test_section_not_a_mapping(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, [])
    assert_one_line(exc, "optim")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: dgl\n  temprature: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, [])
    assert_one_line(exc, "method.temprature", "method.temperature")


def test_config_from_dict_errors() -> None:
    assert config_from_dict({}) == TrainCfg()
    assert config_from_dict({"optim": None}) == TrainCfg()
    with pytest.raises(ConfigError):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError):
        config_from_dict({"extra": {}})
    with pytest.raises(ConfigError):
        config_from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_configs_saved_with_run_amp_still_load() -> None:
    """Checkpoints from before ``run.precision`` saved ``run.amp: none|bf16|fp16``; they resume as fp32/bf16/fp16."""
    from locallearn.train.config import config_from_dict

    assert config_from_dict({"run": {"amp": "none"}}).run.precision == "fp32"
    assert config_from_dict({"run": {"amp": "bf16", "epochs": 2}}).run.precision == "bf16"


def test_split_keys_of_the_method_section_map_to_the_split_section(tmp_path, capsys):
    """Configs written before ``split`` had a section (``method.k``, ``method.split``, ...) load unchanged, with a
    one-line note per key typed by the user; a saved config (a checkpoint's) is migrated without a note."""
    from locallearn.train import config as config_module

    config_module._NOTED.clear()
    (tmp_path / "old.yaml").write_text("method: {name: dgl, k: 3, split: auto, balance: params}\n")
    cfg = load_config(tmp_path / "old.yaml", ["method.ends=[]", "method.cuts=[]"])
    assert (cfg.split.k, cfg.split.preset, cfg.split.balance) == (3, "auto", "params")
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[0]
        == "locallearn: note: method.k is now split.k (the old key still works; docs/configuration.md, section `split`)"
    )
    assert len(err) == 5 and "method.split is now split.preset" in err[1]
    assert load_config(tmp_path / "old.yaml", ["method.k=5"]).split.k == 5  # an override beats the preset's key
    assert load_config(tmp_path / "old.yaml", ["split.k=6"]).split.k == 6
    saved = to_dict(cfg)
    saved["method"]["k"] = saved["split"].pop("k")
    assert config_from_dict(saved) == cfg and capsys.readouterr().err == ""
