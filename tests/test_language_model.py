"""Token models: the byte-level text reader and loader, the language-model task (next-token cross-entropy, bits per
token, perplexity), a hub GPT-2 trained with DGL and the add-ons that apply to token sequences, gradient
isolation probed from outside, and learning real English text (this repository's own docs, written as .txt)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from locallearn import UnitBackbone
from locallearn.data.idx import DataError
from locallearn.data.text import TextLoader, read_text
from locallearn.methods.options import MethodCfg
from locallearn.tasks.language_model import LanguageModelTask
from locallearn.tasks.task import Batch
from locallearn.train import fit, load_config
from locallearn.train.config import ConfigError, OptimCfg
from locallearn.train.engine import LocalEngine

from .conftest import assert_grads_of_isolated_losses

pytest.importorskip("transformers")  # (a test extra: .ci/run installs it)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real English prose, offline: this repository's README and docs, as .txt files (about 200 kB)."""
    root = tmp_path_factory.mktemp("corpus")
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        (root / f"{path.stem}.txt").write_bytes(path.read_bytes())
    return root


def test_the_reader_joins_files_in_order_and_refuses_what_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"world")
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "skip.md").write_bytes(b"not read")
    assert bytes(read_text(tmp_path)) == b"hello\n\nworld"
    assert bytes(read_text(tmp_path / "a.txt")) == b"hello"
    with pytest.raises(DataError, match="no such file or folder"):
        read_text(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt files"):
        read_text(tmp_path / "empty")


def test_windows_are_next_byte_pairs_seeded_per_epoch_and_resumable() -> None:
    tokens = torch.arange(1000) % 256
    loader = TextLoader(tokens.to(torch.uint8), seq_len=16, batch_size=8, train=True, seed=3)
    epoch0 = list(loader.batches(0))
    assert len(epoch0) == len(loader) and loader.n == (999 // 16) - 1
    for x, y, raw in epoch0:
        assert x.dtype == torch.int64 and x.shape == (len(x), 16) and raw is None
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], (x[:, -1] + 1) % 256)
    again = list(loader.batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))  # (seed, epoch) alone
    assert not torch.equal(next(iter(loader.batches(1)))[0], epoch0[0][0])  # another order and offset
    assert torch.equal(next(iter(loader.batches(0, start=2)))[0], epoch0[2][0])  # a resumed epoch
    test = TextLoader(tokens.to(torch.uint8), seq_len=16, batch_size=100, train=False)
    assert torch.equal(next(iter(test))[0][0], tokens[:16])


def test_task_loss_metrics_and_refusals() -> None:
    task = LanguageModelTask(256)
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 10, 256, generator=g), torch.randint(0, 256, (4, 10), generator=g)
    batch = Batch(target.roll(1, 1), target)
    nats = F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))
    assert torch.allclose(task.loss(logits, batch), nats)
    metric = task.metrics()
    metric.update(logits[:2], Batch(batch.input[:2], target[:2]))
    metric.update(logits[2:], Batch(batch.input[2:], target[2:]))
    result = metric.compute()
    assert result["bpt"] == pytest.approx(nats.item() / math.log(2), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nats.item()), rel=1e-5)
    assert task.train_stat(logits, batch).item() == pytest.approx(4 * nats.item() / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match=r"model.kwargs.vocab_size=256"):
        task.loss(torch.randn(4, 10, 100), batch)
    with pytest.raises(ValueError, match="next token ids"):
        task.check(Batch(batch.input, target[:, 0]))


def gpt2_engine(addons: tuple[str, ...] = (), k: int = 3, method: str = "dgl", **options) -> LocalEngine:
    from locallearn.models.hub import transformers_model

    torch.manual_seed(0)
    model = transformers_model(
        "GPT2LMHeadModel",
        num_classes=256,
        n_positions=32,
        n_embd=32,
        n_layer=3,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    backbone = UnitBackbone.from_module(model, torch.randint(0, 256, (2, 16)), k=k)
    cfg = MethodCfg(name=method, addons=list(addons), **options)
    return LocalEngine(backbone, cfg, LanguageModelTask(256), OptimCfg(name="adamw", lr=1e-3), channels_last=False)


def text_batch(seed: int = 0) -> Batch:
    window = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(seed))
    return Batch(window[:, :-1], window[:, 1:])


def test_no_gradient_crosses_a_module_boundary_of_gpt2() -> None:
    engine = gpt2_engine()
    engine.step_mode = "end"
    reference = copy.deepcopy(engine)
    engine.set_lr(0.0)
    torch.manual_seed(1)
    engine.train_step(text_batch())
    torch.manual_seed(1)
    assert_grads_of_isolated_losses(engine, reference, text_batch())


@pytest.mark.parametrize(
    "method,addons",
    [("dgl", ()), ("dgl", ("man",)), ("dgl", ("lam", "cascade")), ("infopro", ()), ("infopro", ("man",))],
    ids=["dgl", "dgl+man", "dgl+mlaan", "infopro", "infopro+man"],
)
def test_gpt2_trains_with_dgl_infopro_and_the_addons(method: str, addons: tuple[str, ...]) -> None:
    """InfoPro on text: reconstruct the input token and predict the next one at every position (softmax)."""
    engine = gpt2_engine(addons, method=method, loss_mode="softmax", lambdas=[1.0, 1.0, 0.5, 1.0])
    first = engine.train_step(text_batch()).losses()
    for _ in range(5):
        result = engine.train_step(text_batch())  # the same batch: every module's loss must fall
    assert all(b < a for a, b in zip(first, result.losses())), (first, result.losses())


def test_gpt2_dgl_k3_learns_real_text_from_the_preset(corpus: Path, tmp_path: Path) -> None:
    """60 steps on English prose: well under the 8 bits per byte of a uniform guess (measured: DGL 4.74 at the final
    head, 4.27 at the first module's aux net; E2E 4.56 at lr 0.002)."""
    cfg = load_config(
        "configs/text/gpt2_bytes.yaml",
        [
            f"data.root={corpus}",
            "data.seq_len=64",
            "data.limit_train=1920",
            "optim.lr=0.004",
            "data.limit_test=64",
            "model.kwargs={n_positions: 64, n_embd: 64, n_layer: 3, n_head: 2, tie_word_embeddings: false}",
            "run.threads=1",
            f"run.out={tmp_path}",
            "run.progress=false",
        ],
    )
    result = fit(cfg, quiet=True)
    assert result["test_bpt"] < 5.5, f"did not learn: {result['test_bpt']:.2f} bits per byte"
    assert result["test_ppl"] == pytest.approx(2 ** result["test_bpt"], rel=1e-4)


def test_text_config_refusals(corpus: Path) -> None:
    with pytest.raises(ValueError, match=r"patch fusion \(pff, HPFF\) cuts a \(B, C, H, W\) map"):
        gpt2_engine(("pff",))
    with pytest.raises(ValueError, match="set method.loss_mode=softmax"):
        gpt2_engine(method="infopro", loss_mode="contrast")
    with pytest.raises(ConfigError, match=r"data.test_fraction=1.5 is out of range"):
        load_config("configs/text/gpt2_bytes.yaml", [f"data.root={corpus}", "data.test_fraction=1.5"])
