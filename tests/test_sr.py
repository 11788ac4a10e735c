"""Super-resolution (docs/methods.md, "Super-resolution and GLCAN"; docs/glcan.md): EDSR as units, PSNR/SSIM
against scikit-image, the SR folder readers and loaders with their errors, GLCAN and the DGL-style baseline
(gradient isolation, every option), a tiny run that learns, and the SR path through ``fit``/``eval``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, SuperResolutionTask, create_model
from locallearn.cli.main import main
from locallearn.data import DataError, dataset_spec
from locallearn.data.sr import SREvalLoader, SRPair, SRTrainLoader, bicubic_lr, make_pair, read_folder
from locallearn.methods.glcan import LocalAdapter
from locallearn.models.edsr import ResBlock
from locallearn.models.units import UnitInfo
from locallearn.tasks.image_quality import psnr_y, ssim_y
from locallearn.train import load_config
from locallearn.train.build import build_engine
from locallearn.train.config import ConfigError
from locallearn.train.entry import fit

from .conftest import one_line_data_error
from .test_engine import assert_gradient_isolation, make_engine

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sr"


def sr_engine(method: MethodCfg, k: int, scale: int = 2, blocks: int = 4, width: int = 8, **kw) -> LocalEngine:
    torch.manual_seed(0)
    backbone = create_model(f"edsr{blocks}", scale=scale, width=width)
    optim = OptimCfg(name="adamw", lr=1e-3, weight_decay=0)
    return LocalEngine(backbone, method, SuperResolutionTask(scale), optim, split=k, **kw)


def sr_batch(n: int = 4, size: int = 8, scale: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(n, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return Batch(lr, torch.rand(n, 3, size * scale, size * scale, generator=g))


# ---- model -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_units_shapes_and_any_split(scale: int) -> None:
    model = create_model("edsr4", scale=scale, width=8)
    assert [i.name for i in model.infos] == ["head", "body.0", "body.1", "body.2", "body.3", "tail"]
    assert model.infos[-1].is_head and {i.reduction for i in model.infos} == {1}
    x = torch.rand(2, 3, 7, 9)
    with torch.no_grad():
        assert model(x).shape == (2, 3, 7 * scale, 9 * scale)
    for k in (1, 2, 3, 6):
        engine = sr_engine(MethodCfg(name="e2e" if k == 1 else "glcan"), k, scale=scale)
        assert engine.k == k
        with torch.no_grad():
            h = x
            for module in engine.modules:
                h = module(h)
            assert torch.equal(h, engine.backbone(x))


def test_edsr_bad_scale_and_model_task_mismatch_are_clear() -> None:
    with pytest.raises(ValueError, match="scale must be one of"):
        create_model("edsr4", scale=5)
    cfg = load_config(None, ["data.name=skimage_samples", "model.name=resnet8"])
    with pytest.raises(ConfigError, match="cannot be built for the super_resolution dataset"):
        build_engine(cfg, dataset_spec("skimage_samples"), torch.device("cpu"), torch.zeros(2, 3, 8, 8))
    cfg = load_config(None, ["model.name=edsr4"])
    with pytest.raises(ConfigError, match="cannot be built for the classification dataset"):
        build_engine(cfg, dataset_spec("fashion_mnist"), torch.device("cpu"), torch.zeros(2, 1, 28, 28))


# ---- metrics -----------------------------------------------------------------------------------------------------


@needs_skimage
@pytest.mark.parametrize("shave", [0, 2, 4])
def test_psnr_and_ssim_equal_scikit_image(shave: int) -> None:
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(shave)
    hr = rng.integers(0, 256, (3, 33, 41, 3)).astype(np.uint8)
    hr[1] = np.linspace(0, 255, 41)[None, :, None].astype(np.uint8)  # a smooth image too
    sr = np.clip(hr / 255 + rng.normal(0, 0.05, hr.shape), 0, 1)  # off the 8-bit grid: both sides quantise
    sr8 = np.round(sr * 255).astype(np.uint8)
    t_sr = torch.from_numpy(sr).permute(0, 3, 1, 2)
    t_hr = torch.from_numpy(hr).permute(0, 3, 1, 2).double() / 255
    psnr, ssim = psnr_y(t_sr, t_hr, shave), ssim_y(t_sr, t_hr, shave)
    for i in range(3):
        crop = (slice(shave, -shave or None),) * 2
        y_sr, y_hr = rgb2ycbcr(sr8[i])[..., 0][crop], rgb2ycbcr(hr[i])[..., 0][crop]
        assert psnr[i].item() == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-9)
        expected = structural_similarity(
            y_hr, y_sr, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ssim[i].item() == pytest.approx(expected, abs=1e-9)
    assert psnr_y(t_hr, t_hr).isinf().all() and torch.allclose(ssim_y(t_hr, t_hr), torch.ones(3, dtype=torch.float64))


def test_sr_task_loss_metrics_and_shape_error() -> None:
    task = SuperResolutionTask(2)
    batch = sr_batch(n=2, size=16)
    assert task.loss(batch.target, batch).item() == 0
    with pytest.raises(ValueError, match="is the model built for scale 2"):
        task.loss(torch.rand(2, 3, 48, 48), batch)
    metrics = task.metrics()
    metrics.update(batch.target, batch)
    noisy = (batch.target + 0.1 * torch.randn_like(batch.target)).clamp(0, 1)
    metrics.update(noisy, batch)
    out = metrics.compute()
    assert set(out) == {"psnr", "ssim"} and out["psnr"] == float("inf")
    assert task.train_stat(noisy, batch).item() == pytest.approx(psnr_y(noisy, batch.target, 2).sum().item())


# ---- data --------------------------------------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """DIV2K (paired, train + valid), EDSR benchmark (paired, odd sizes), SelfExSR and a plain HR folder."""
    pytest.importorskip("PIL")
    for split, names in (("train", ["0001", "0002"]), ("valid", ["0801"])):
        for i, name in enumerate(names):
            write_png(tmp_path / f"div2k/DIV2K_{split}_HR/{name}.png", random_image(20, 24, i))
            write_png(tmp_path / f"div2k/DIV2K_{split}_LR_bicubic/X2/{name}x2.png", random_image(10, 12, 10 + i))
    write_png(tmp_path / "set5/HR/baby.png", random_image(21, 25, 3))
    write_png(tmp_path / "set5/LR_bicubic/X2/babyx2.png", random_image(10, 12, 4))
    write_png(tmp_path / "srf/image_SRF_2/img_001_SRF_2_HR.png", random_image(16, 16, 5))
    write_png(tmp_path / "srf/image_SRF_2/img_001_SRF_2_LR.png", random_image(8, 8, 6))
    write_png(tmp_path / "plain/a.png", random_image(17, 18, 7))
    gray = np.random.default_rng(8).integers(0, 256, (12, 12)).astype(np.uint8)
    write_png(tmp_path / "plain/b.png", gray)
    return tmp_path


def test_readers_pair_every_layout(folders: Path) -> None:
    train = read_folder(folders / "div2k", "train", 2)
    assert [p.name for p in train] == ["0001.png", "0002.png"]
    assert train[0].hr.shape == (3, 20, 24)
    assert torch.equal(train[0].lr, torch.from_numpy(random_image(10, 12, 10)).permute(2, 0, 1))
    assert [p.name for p in read_folder(folders / "div2k", "test", 2)] == ["0801.png"]
    baby = read_folder(folders / "set5", "test", 2, explicit=True)[0]
    assert baby.hr.shape == (3, 20, 24) and baby.lr.shape == (3, 10, 12)  # HR cropped to a multiple of 2
    assert read_folder(folders / "srf", "test", 2, explicit=True)[0].lr.shape == (3, 8, 8)
    plain = read_folder(folders / "plain", "train", 3)
    assert [p.hr.shape for p in plain] == [(3, 15, 18), (3, 12, 12)]  # greyscale read as RGB
    assert torch.equal(plain[0].lr, bicubic_lr(plain[0].hr, 3)) and plain[0].lr.shape == (3, 5, 6)
    assert len(read_folder(folders / "div2k", "train", 2, limit=1)) == 1


def test_reader_errors_are_one_line(folders: Path) -> None:
    with pytest.raises(DataError) as e:
        read_folder(folders / "missing", "train", 2)
    one_line_data_error(e, "folder not found")
    with pytest.raises(DataError) as e:
        read_folder(folders / "div2k", "train", 3)
    one_line_data_error(e, "no X3 folder", "found X2")
    with pytest.raises(DataError) as e:
        read_folder(folders / "plain", "test", 2)
    one_line_data_error(e, "data.test_root")
    write_png(folders / "set5/LR_bicubic/X2/babyx2.png", random_image(11, 12, 4))
    with pytest.raises(DataError) as e:
        read_folder(folders / "set5", "test", 2, explicit=True)
    one_line_data_error(e, "babyx2.png", "is 12×11", "needs 12×10", "another scale")
    (folders / "set5/LR_bicubic/X2/babyx2.png").unlink()
    with pytest.raises(DataError) as e:
        read_folder(folders / "set5", "test", 2, explicit=True)
    one_line_data_error(e, "no LR image for baby.png")
    (folders / "plain/c.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        read_folder(folders / "plain", "train", 2)
    one_line_data_error(e, "c.png", "cannot read as an image")
    (folders / "empty").mkdir()
    with pytest.raises(DataError) as e:
        read_folder(folders / "empty", "train", 2)
    one_line_data_error(e, "no images")
    pair = make_pair("a", torch.zeros(3, 8, 8, dtype=torch.uint8), 2)
    with pytest.raises(DataError) as e:
        SRTrainLoader([pair], 2, scale=2, patch_size=12)
    one_line_data_error(e, "smaller than data.patch_size=12")


def nearest_pairs(scale: int) -> list[SRPair]:
    """HR = LR repeated scale×scale: an HR patch is aligned with its LR patch iff hr[::s, ::s] == lr."""
    pairs = []
    for i, (h, w) in enumerate([(9, 11), (12, 10)]):
        lr = torch.from_numpy(random_image(h, w, i)).permute(2, 0, 1).contiguous()
        pairs.append(SRPair(str(i), lr.repeat_interleave(scale, 1).repeat_interleave(scale, 2), lr))
    return pairs


def test_training_patches_are_aligned_augmented_and_deterministic() -> None:
    s = 3
    loader = SRTrainLoader(nearest_pairs(s), 4, scale=s, patch_size=15, repeat=3, seed=1)
    assert len(loader) == 2 and loader.n == 6
    batches = list(loader.batches(0))
    for x, y, raw in batches:
        assert x.shape[1:] == (3, 5, 5) and y.shape[1:] == (3, 15, 15)
        assert x.is_contiguous(memory_format=torch.channels_last)
        hr = (y * 255).round().to(torch.uint8)
        assert torch.equal(hr[..., ::s, ::s], raw) and torch.equal((x * 255).round().to(torch.uint8), raw)
    again = SRTrainLoader(nearest_pairs(s), 4, scale=s, patch_size=15, repeat=3, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again.batches(0)))
    assert torch.equal(next(again.batches(0, start=1))[1], batches[1][1])
    assert not torch.equal(next(again.batches(1))[1], batches[0][1])
    fixed = SRTrainLoader(nearest_pairs(s), 6, scale=s, patch_size=15, augment=False, seed=1)
    plain = next(fixed.batches(0))[0]
    flipped = SRTrainLoader(nearest_pairs(s), 6, scale=s, patch_size=15, augment=True, seed=1)
    assert not torch.equal(plain, next(flipped.batches(0))[0])  # some of the 6 patches are flipped or transposed
    evaluation = SREvalLoader(nearest_pairs(s), scale=s)
    assert [tuple(b[1].shape) for b in evaluation.batches()] == [(1, 3, 27, 33), (1, 3, 36, 30)]


@needs_skimage
def test_skimage_samples_are_real_photographs_without_files() -> None:
    spec = dataset_spec("skimage_samples")
    test = spec.read(None, "test", scale=2, limit=2)
    assert [p.name for p in test] == ["astronaut", "chelsea"] and test[0].hr.shape == (3, 512, 512)
    assert test[1].lr.shape == (3, 150, 225) and test[1].hr.float().std() > 20


# ---- methods -----------------------------------------------------------------------------------------------------

SR_METHODS = [
    MethodCfg(name="dgl"),
    MethodCfg(name="glcan"),
    MethodCfg(name="glcan", glcan_global="ema", glcan_local="conv", glcan_local_depth=2),
    MethodCfg(name="glcan", glcan_local="none"),
    MethodCfg(name="glcan", addons=["man"]),
]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(
    "cfg", SR_METHODS, ids=lambda c: f"{c.name}-{c.glcan_global}-{c.glcan_local}-{'+'.join(c.addons) or 'plain'}"
)
def test_sr_local_losses_reach_only_their_module(cfg: MethodCfg, k: int) -> None:
    assert_gradient_isolation(sr_engine(cfg, k), sr_batch())


def test_glcan_is_task_agnostic_on_a_classifier() -> None:
    """On a CIFAR ResNet the adapter pools to the head's stride and widens to its width; the head is the FC."""
    engine = make_engine(MethodCfg(name="glcan"), 2)
    from .test_engine import make_batch

    assert_gradient_isolation(engine, make_batch())
    result = engine.evaluate([(b.input, b.target, b.raw) for b in [make_batch()]])
    assert set(result) == {"test_acc", "test_loss", "aux_acc"} and result["aux_acc"][0] is not None


def test_local_adapter_options() -> None:
    info, head = UnitInfo("b", 8, 1, 1), UnitInfo("h", 16, 2, 4)
    assert len(LocalAdapter(info, UnitInfo("h", 8, 1, 1), "none", 3)) == 0
    adapter = LocalAdapter(info, head, "resblock", 2)
    assert [type(m).__name__ for m in adapter] == ["ResBlock", "ResBlock", "AvgPool2d", "Conv2d"]
    assert adapter(torch.rand(2, 8, 8, 8)).shape == (2, 16, 2, 2)
    conv = LocalAdapter(UnitInfo("b", 16, 2, 4), UnitInfo("h", 16, 1, 1), "conv", 1)
    assert [type(m).__name__ for m in conv] == ["Conv2d", "ReLU", "Upsample"]
    with pytest.raises(ValueError, match="glcan_local"):
        LocalAdapter(info, head, "mlp", 1)
    with pytest.raises(ValueError, match="cannot adapt stride"):
        LocalAdapter(UnitInfo("b", 8, 1, 3), head, "none", 0)


def test_glcan_ema_global_head_is_shared_and_follows_the_live_head() -> None:
    engine = sr_engine(MethodCfg(name="glcan", glcan_global="ema", ema_decay=0.9), 3)
    ema, tail = engine.method.global_head, engine.backbone.units[-1]
    assert all(not p.requires_grad for p in ema.parameters())
    stepped = {id(p) for opt in engine._optimizers for g in opt.param_groups for p in g["params"]}
    assert not stepped & {id(p) for p in ema.parameters()}
    before = [p.clone() for p in ema.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, tail.parameters()))  # starts as a copy
    engine.train_step(sr_batch())
    for old, new, live in zip(before, ema.parameters(), tail.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * live.detach())
    keys = [key for key in engine.method.state_dict() if "global_head" in key or key.startswith("aux")]
    assert sum(key.startswith("global_head.") for key in keys) == len(list(ema.state_dict()))
    assert not any(".1._target" in key for key in keys)  # the shared head is saved once, on the method
    with pytest.raises(ValueError, match="ema_decay"):
        sr_engine(MethodCfg(name="glcan", glcan_global="ema", ema_decay=1.0), 2)


def test_glcan_per_module_heads_are_independent_copies() -> None:
    engine = sr_engine(MethodCfg(name="glcan", glcan_local_depth=2), 3)
    heads = [engine.method.aux[k].independent.head[1] for k in range(2)]
    tail = engine.backbone.units[-1]
    for head in heads:
        assert all(torch.equal(a, b) and a is not b for a, b in zip(head.parameters(), tail.parameters()))
    assert sum(isinstance(m, ResBlock) for m in engine.method.aux[0].modules()) == 2
    assert engine.method.aux[0].independent.head[0] is not engine.method.aux[1].independent.head[0]


def test_sr_evaluate_keys_and_non_sr_methods() -> None:
    engine = sr_engine(MethodCfg(name="dgl"), 3)
    batch = sr_batch(n=2, size=16)
    result = engine.evaluate([(batch.input, batch.target, None)])
    assert set(result) == {"test_psnr", "test_ssim", "test_loss", "aux_psnr"} and len(result["aux_psnr"]) == 2
    assert all(isinstance(v, float) for v in result["aux_psnr"])
    with pytest.raises(ValueError, match="use dgl or glcan"):
        sr_engine(MethodCfg(name="infopro"), 2)
    classifier = make_engine(MethodCfg(name="dgl"), 2)
    assert isinstance(classifier.task, ClassificationTask)


# ---- learning and the run path -----------------------------------------------------------------------------------


@needs_skimage
@pytest.mark.parametrize("method", ["glcan", "dgl"])
def test_tiny_sr_run_learns_on_real_photographs(method: str) -> None:
    """40 steps on patches of the skimage training photographs lift PSNR on a crop of an unseen photograph (the
    astronaut) far above the untrained network's; the aux prediction improves as well."""
    spec = dataset_spec("skimage_samples")
    train = SRTrainLoader(spec.read(None, "train", scale=2), 8, scale=2, patch_size=48, repeat=8, seed=0)
    crop = make_pair("crop", spec.read(None, "test", scale=2, limit=1)[0].hr[:, 160:256, 192:288], 2)
    evaluation = SREvalLoader([crop], scale=2)
    engine = sr_engine(MethodCfg(name=method), 2, width=16)
    before = engine.evaluate(evaluation.batches())
    batches = [b for epoch in range(3) for b in train.batches(epoch)][:40]
    for x, y, raw in batches:
        engine.train_step(Batch(x, y, raw))
    after = engine.evaluate(evaluation.batches())
    assert after["test_psnr"] > before["test_psnr"] + 6, (before, after)
    assert after["aux_psnr"][0] > before["aux_psnr"][0] + 6
    assert after["test_psnr"] > 18


@needs_skimage
def test_fit_eval_on_skimage_samples(tmp_path: Path, capsys) -> None:
    overrides = [
        "run.max_steps=2",
        "data.limit_test=1",
        "data.batch_size=4",
        "model.width=8",
        f"run.out={tmp_path}",
        "run.progress=false",
        "run.device=cpu",
    ]
    result = fit(load_config(CONFIGS / "edsr_x2_glcan_k2.yaml", overrides), quiet=True)
    assert {"test_psnr", "test_ssim", "aux_psnr", "train_psnr"} <= set(result) and result["peak_act_bytes"] > 0
    assert main(["eval", result["run_dir"]]) == 0
    assert "test_psnr" in capsys.readouterr().out
    # wrong scale: a ×2 model evaluated on ×3 data is one line naming the trained scale, not a load_state_dict dump
    assert main(["eval", result["run_dir"], "data.scale=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained at ×2" in err and "data.scale=2" in err and len(err.splitlines()) == 1


@needs_skimage
def test_bench_compares_sr_methods_by_psnr(tmp_path: Path) -> None:
    """``locallearn bench`` on the SR preset: one row per (method, K), memory and PSNR (not accuracy) columns."""
    args = ["--methods", "e2e,dgl,glcan", "--k", "2", "--out", str(tmp_path)]
    overrides = ["run.max_steps=1", "data.limit_test=1", "data.batch_size=2", "model.width=4", "run.progress=false"]
    config = str(CONFIGS / "edsr_x2_glcan_k2.yaml")
    assert main(["bench", "memory", "-c", config, *args, *overrides]) == 0
    assert main(["bench", "accuracy", "-c", config, *args, *overrides]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["label"], r["k"]) for r in results["rows"]} == {("e2e", 1), ("dgl", 2), ("glcan", 2)}
    assert all(r["metric"] == "psnr" and "test_ssim" in r and len(r["aux_psnr"]) == r["k"] - 1 for r in results["runs"])
    table = (tmp_path / "results.md").read_text()
    assert "test PSNR dB (mean ± std, n: each seed)" in table and "(n=1)" in table and "% (n=" not in table
