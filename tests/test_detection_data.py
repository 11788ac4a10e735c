"""Detection data: rendered shapes with exact boxes, VOC and COCO round trips, bad-input errors, COCO mAP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from locallearn.data.detection import (
    SHAPES,
    coco_map,
    read_coco,
    read_voc,
    render_shapes,
    write_coco,
    write_voc,
)
from locallearn.data.idx import DataError

from .conftest import one_line_data_error


@pytest.fixture(scope="module")
def shapes() -> object:
    return render_shapes(12, size=48, seed=3)


def test_rendered_boxes_cover_every_shape_pixel(shapes) -> None:
    assert shapes.images.shape == (12, 3, 48, 48) and shapes.classes == list(SHAPES)
    for image, boxes in zip(shapes.images, shapes.boxes):
        covered = np.zeros(image.shape[1:], dtype=bool)
        for x1, y1, x2, y2 in boxes.astype(int):
            covered[y1:y2, x1:x2] = True
            assert image[:, y1:y2, x1:x2].max() >= 120  # a shape is drawn inside its box
        assert image.max(axis=0)[~covered].max() < 60  # nothing but background outside the boxes
    targets = shapes.targets()
    assert targets.shape[0] == 12 and targets.shape[2] == 5
    assert (targets[..., 0] >= -1).all() and int((targets[..., 0] >= 0).sum()) == sum(len(b) for b in shapes.boxes)


def test_voc_round_trip(shapes, tmp_path: Path) -> None:
    write_voc(shapes, tmp_path / "voc")
    got = read_voc(tmp_path / "voc", "train", size=48, classes=list(SHAPES))
    np.testing.assert_array_equal(got.images, shapes.images)
    for a, b, la, lb in zip(got.boxes, shapes.boxes, got.labels, shapes.labels):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_array_equal(la, lb)
    assert read_voc(tmp_path / "voc", size=48).classes == sorted(SHAPES)  # names found, not the 20 VOC classes
    half = read_voc(tmp_path / "voc", size=24, classes=list(SHAPES))
    np.testing.assert_allclose(half.boxes[0], shapes.boxes[0] / 2, atol=1e-4)  # boxes scale with the resize


def test_coco_round_trip(shapes, tmp_path: Path) -> None:
    ann = write_coco(shapes, tmp_path / "images", tmp_path / "instances.json")
    got = read_coco(tmp_path / "images", ann, size=48)
    assert got.classes == list(SHAPES)
    for a, b, la, lb in zip(got.boxes, shapes.boxes, got.labels, shapes.labels):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_array_equal(la, lb)


def test_bad_voc_inputs_are_one_line_errors(shapes, tmp_path: Path) -> None:
    root = write_voc(shapes, tmp_path / "voc")
    with pytest.raises(DataError) as e:
        read_voc(root, "val")
    one_line_data_error(e, "val.txt", "missing")
    first = root / "Annotations" / f"{shapes.names[0]}.xml"
    text = first.read_text()
    first.write_text(text.replace("<xmax>", "<xmax>9", 1))  # x2 far outside the 48-pixel image
    with pytest.raises(DataError) as e:
        read_voc(root, size=48)
    one_line_data_error(e, first.name, "outside the 48x48 image")
    first.write_text("<annotation><object><name>ellipse")
    with pytest.raises(DataError) as e:
        read_voc(root, size=48)
    one_line_data_error(e, first.name, "malformed")
    first.unlink()
    with pytest.raises(DataError) as e:
        read_voc(root, size=48)
    one_line_data_error(e, first.name, "missing")


def test_bad_coco_inputs_are_one_line_errors(shapes, tmp_path: Path) -> None:
    ann = write_coco(shapes, tmp_path / "images", tmp_path / "instances.json")
    text = ann.read_text()
    ann.write_text(text.replace('"category_id": 1', '"category_id": 7', 1))
    with pytest.raises(DataError) as e:
        read_coco(tmp_path / "images", ann)
    one_line_data_error(e, "instances.json", "unknown category 7")
    ann.write_text(text)
    (tmp_path / "images" / f"{shapes.names[0]}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        read_coco(tmp_path / "images", ann)
    one_line_data_error(e, f"{shapes.names[0]}.png", "cannot decode")
    with pytest.raises(DataError) as e:
        read_coco(tmp_path / "images", tmp_path / "nope.json")
    one_line_data_error(e, "nope.json", "missing")


def test_coco_map_rewards_exact_boxes_and_penalises_shifted_ones(shapes) -> None:
    perfect = [(b, np.ones(len(b)), lab) for b, lab in zip(shapes.boxes, shapes.labels)]
    assert coco_map(shapes, perfect)["map"] == pytest.approx(1.0)
    shifted = [(b + 6, np.ones(len(b)), lab) for b, lab in zip(shapes.boxes, shapes.labels)]
    result = coco_map(shapes, shifted)
    assert 0 <= result["map"] < 0.9 and result["map"] <= result["map50"]
    wrong_class = [(b, np.ones(len(b)), (lab + 1) % 3) for b, lab in zip(shapes.boxes, shapes.labels)]
    assert coco_map(shapes, wrong_class)["map"] == 0.0
    assert coco_map(shapes, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * len(shapes)) == {"map": 0.0, "map50": 0.0}
