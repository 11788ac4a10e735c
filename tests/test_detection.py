"""Detection model and task: FPN taps detach across modules, FCOS assignment, losses, NMS, a detector that learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.data.detection import render_shapes
from locallearn.models import create_model
from locallearn.models.detector import Tap
from locallearn.tasks.detection import DetectionTask, assign, giou_loss, nms, sigmoid_focal_loss
from locallearn.tasks.task import Batch
from locallearn.train.config import SplitCfg


def _pred(points: list[tuple[float, float, int]], num_classes: int = 2) -> torch.Tensor:
    """A prediction tensor holding only point coordinates (the rest zeros)."""
    pred = torch.zeros(1, len(points), num_classes + 8)
    pred[0, :, -3:] = torch.tensor(points, dtype=torch.float32)
    return pred


def test_assignment_takes_inside_central_points_and_the_smaller_box() -> None:
    target = torch.tensor([[[0, 0, 0, 32, 32], [1, 8, 8, 16, 16], [-1, 0, 0, 0, 0]]], dtype=torch.float32)
    pred = _pred([(12, 12, 8), (16, 16, 8), (40, 40, 8), (2, 2, 8)])
    labels, matched = assign(pred, target)
    # (12,12) is inside both boxes and near both centres: the smaller box (label 1) wins; (16,16) is near the
    # big box's centre but on the small box's edge; (40,40) is outside; (2,2) is inside but far from the centre.
    assert labels.tolist() == [[1, 0, -1, -1]]
    torch.testing.assert_close(matched[0, 0], torch.tensor([8.0, 8, 16, 16]))


def test_multi_level_assignment_sends_large_boxes_to_coarse_levels() -> None:
    # Ranges by the largest distance to a side: stride 8 up to 16, stride 16 up to 32, stride 32 the rest.
    target = torch.tensor([[[0, 0, 0, 64, 64]]], dtype=torch.float32)  # reach 32 at the centre
    labels, _ = assign(_pred([(32, 32, 8), (32, 32, 16), (32, 32, 32)]), target)
    assert labels.tolist() == [[-1, 0, -1]]
    target = torch.tensor([[[0, 0, 0, 96, 96]]], dtype=torch.float32)  # reach 48
    labels, _ = assign(_pred([(48, 48, 8), (48, 48, 16), (48, 48, 32)]), target)
    assert labels.tolist() == [[-1, -1, 0]]
    labels, _ = assign(_pred([(48, 48, 8)]), target)  # a single level (an aux head) takes every size
    assert labels.tolist() == [[0]]


def test_assignment_ranges_follow_the_next_finer_level_whatever_the_strides() -> None:
    # Levels 8 and 32 only: stride 8 takes reaches up to 16, stride 32 everything above 2 x 8.
    target = torch.tensor([[[0, 0, 0, 40, 40], [1, 100, 100, 120, 120]]], dtype=torch.float32)  # reaches 20, 10
    labels, _ = assign(_pred([(20, 20, 8), (20, 20, 32), (110, 110, 8), (110, 110, 32)]), target)
    assert labels.tolist() == [[-1, 0, 1, -1]]


def _sparse_fcos_loss(task: DetectionTask, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FCOS's loss written the direct way, on the positives picked by a mask (data-dependent shapes)."""
    labels, matched = assign(pred, target)
    positive = labels >= 0
    num_pos = positive.sum().clamp(min=1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), task.num_classes).float() * positive[..., None]
    cls = sigmoid_focal_loss(pred[..., : task.num_classes], onehot).sum() / num_pos
    if not positive.any():
        return cls
    p, b = pred[positive], matched[positive]
    x, y = p[:, -3], p[:, -2]
    ltrb = torch.stack([x - b[:, 0], y - b[:, 1], b[:, 2] - x, b[:, 3] - y], -1).detach()
    ctr = torch.sqrt(
        (ltrb[:, [0, 2]].amin(-1) / ltrb[:, [0, 2]].amax(-1)) * (ltrb[:, [1, 3]].amin(-1) / ltrb[:, [1, 3]].amax(-1))
    )
    box = (
        giou_loss(torch.stack([x - p[:, -8], y - p[:, -7], x + p[:, -6], y + p[:, -5]], -1), b) * ctr
    ).sum() / ctr.sum()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(p[:, -4], ctr, reduction="sum") / num_pos
    return cls + box + bce


@pytest.mark.parametrize("boxes", [True, False])
def test_dense_loss_equals_the_loss_over_the_positives_and_runs_on_meta(boxes: bool) -> None:
    """The loss weights every point by its 0/1 positive mask instead of indexing the positives: same value and
    gradients (within float rounding of the longer sums), and shapes that never depend on the data."""
    torch.manual_seed(0)
    model, task = create_model("fcos_resnet18", num_classes=3, width=8), DetectionTask(["a", "b", "c"])
    data = render_shapes(4, size=64, seed=1)
    x = torch.from_numpy(data.images).float() / 255
    target = data.targets() if boxes else torch.full((4, 1, 5), -1.0)
    grads = []
    for loss_fn in (lambda p: task.loss(p, Batch(x, target)), lambda p: _sparse_fcos_loss(task, p, target)):
        model.zero_grad()
        loss = loss_fn(model(x))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.device("meta"):
        meta = create_model("fcos_resnet18", num_classes=3, width=8)
        loss = task.loss(meta(torch.empty(4, 3, 64, 64)), Batch(torch.empty(4, 3, 64, 64), torch.empty(4, 5, 5)))
    assert loss.shape == () and loss.is_meta


def test_giou_and_nms() -> None:
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    torch.testing.assert_close(giou_loss(a, b), torch.tensor([0.0, 1 + 10 / 30]))  # disjoint: 1 − (0 − 10/30)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou=0.5).tolist() == [0, 2]
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou=0.9).tolist() == [0, 1, 2]


def test_detector_output_layout_and_taps_detach_only_across_modules() -> None:
    torch.manual_seed(0)
    model = create_model("fcos_resnet18", num_classes=3, width=8)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 3 + 8)
    assert sorted(out[0, :, -1].unique().tolist()) == [8.0, 16.0, 32.0]
    taps = [i for i, u in enumerate(model.units) if isinstance(u, Tap)]
    model.configure_split([len(model)])  # E2E: the FPN's gradient reaches C3/C4
    assert not any(model.units[i].detach for i in taps)
    model.configure_split([taps[0] + 1, len(model)])  # C3 in module 0, C4 with the head in module 1
    assert [model.units[i].detach for i in taps] == [True, False]


def test_detection_loss_reaches_only_the_last_module_through_the_fpn() -> None:
    torch.manual_seed(0)
    model = create_model("fcos_resnet18", num_classes=3, width=8)
    data = render_shapes(4, size=64, seed=0)
    x, target = torch.tensor(data.images).float().div(255), data.targets()
    tap = next(i for i, u in enumerate(model.units) if isinstance(u, Tap))
    model.configure_split([tap + 1, len(model)])
    h = x
    for unit in model.units[: tap + 1]:
        h = unit(h)
    h = h.detach()  # what the engine passes on
    for unit in model.units[tap + 1 :]:
        h = unit(h)
    DetectionTask(data.classes).loss(h, Batch(x, target)).backward()
    assert all(p.grad is None for u in model.units[: tap + 1] for p in u.parameters())
    assert all(p.grad is not None for p in model.units[-1].parameters())


def test_decode_returns_boxes_inside_the_image_sorted_by_score() -> None:
    torch.manual_seed(0)
    model = create_model("fcos_resnet18", num_classes=3, width=8).eval()
    task = DetectionTask(["a", "b", "c"], score_threshold=0.0, top_k=20)
    with torch.no_grad():
        detections = task.decode(model(torch.randn(2, 3, 64, 64)), (64, 64))
    for boxes, scores, labels in detections:
        assert 0 < len(boxes) <= 20 and (boxes >= 0).all() and (boxes <= 64).all()
        assert (scores[:-1] >= scores[1:]).all() and set(labels.tolist()) <= {0, 1, 2}


@pytest.mark.timeout(120)
def test_a_tiny_detector_learns_the_shapes() -> None:
    """Rendered shapes (boxes known exactly), 60 SGD steps: mAP@.5 far above the untrained model's."""
    torch.manual_seed(0)
    train, test = render_shapes(128, size=48, seed=0, max_objects=2), render_shapes(32, size=48, seed=1, max_objects=2)
    model = create_model("fcos_resnet18", num_classes=3, width=8)
    model.configure_split([len(model)])
    task = DetectionTask(train.classes)
    x, t = torch.tensor(train.images).float().div(255), train.targets()
    xt = torch.tensor(test.images).float().div(255)

    def map50() -> float:
        model.eval()
        metric = task.metrics()
        with torch.no_grad():
            metric.update(model(xt), Batch(xt, test.targets()))
        model.train()
        return metric.compute()["map50"]

    before = map50()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = task.loss(model(x[idx]), Batch(x[idx], t[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = map50()
    assert after > max(0.1, 10 * before), (before, after)


@pytest.mark.parametrize("method", ["dgl", "glcan"])
def test_local_detection_methods_isolate_gradients(method: str) -> None:
    """DGL-style (plain head per module) and GLCAN (local adapter + copy of the dense head at the module's stride)
    on a K=3 detector: each local loss reaches exactly its module and aux net, taps included."""
    from locallearn import MethodCfg
    from locallearn.train.config import OptimCfg
    from locallearn.train.engine import LocalEngine

    from .test_engine import assert_gradient_isolation

    torch.manual_seed(0)
    data = render_shapes(4, size=64, seed=0)
    task = DetectionTask(data.classes)
    backbone = create_model("fcos_resnet18", num_classes=3, width=8)
    engine = LocalEngine(
        backbone, MethodCfg(name=method), task, OptimCfg(), split=SplitCfg(k=3, ends=[3, 6, 10], preset="ends")
    )
    x = torch.tensor(data.images).float().div(255).contiguous(memory_format=torch.channels_last)
    batch = Batch(x, data.targets(), torch.tensor(data.images))
    assert_gradient_isolation(engine, batch)
    engine.train_step(batch)
    result = engine.evaluate([(batch.input, batch.target, batch.raw)])
    assert 0 <= result["test_map"] <= 1 and len(result["aux_map"]) == 2


@pytest.mark.parametrize("path", sorted(Path("configs/detection").glob("*.yaml")), ids=str)
def test_detection_presets_train_a_step(path: Path, tmp_path: Path) -> None:
    from locallearn.train.config import load_config
    from locallearn.train.entry import fit

    cfg = load_config(path, ["data.limit_train=32", "data.limit_test=16", "run.max_steps=1", f"run.out={tmp_path}"])
    assert fit(cfg, quiet=True)["step"] == 1


@pytest.mark.parametrize("method", ["e2e", "dgl"])
def test_no_tapped_activation_outlives_its_forward(method: str) -> None:
    """The FPN takes C3/C4 off the board: after a training step (the head in the tap's module or not) and after an
    evaluation nothing is left holding an activation, and the engine can be copied (a non-leaf tensor could not)."""
    import copy

    from locallearn import MethodCfg
    from locallearn.train.config import OptimCfg
    from locallearn.train.engine import LocalEngine

    torch.manual_seed(0)
    data = render_shapes(2, size=64, seed=0)
    backbone = create_model("fcos_resnet18", num_classes=3, width=8)
    k, ends = (1, [10]) if method == "e2e" else (3, [3, 6, 10])
    engine = LocalEngine(
        backbone,
        MethodCfg(name=method),
        DetectionTask(data.classes),
        OptimCfg(),
        split=SplitCfg(k=k, ends=ends, preset="ends"),
    )
    x = torch.tensor(data.images).float().div(255)
    batch = Batch(x, data.targets(), torch.tensor(data.images))
    board = backbone.units[-1].board
    engine.train_step(batch)
    assert board == {}
    engine.evaluate([(batch.input, batch.target, batch.raw)])
    assert board == {}
    copy.deepcopy(engine)
