"""Object-detection data: Pascal VOC (XML) and COCO (JSON) annotations, a rendered shapes set, COCO mAP.

Images are read with Pillow and resized to one square ``size`` (boxes scaled with them), so a split is one uint8
NCHW array that stays resident on the device like the classification sets (docs/data.md); aspect ratio is not kept,
which is fine for the CPU-sized benchmarks this serves. Targets are a padded (N, max_boxes, 5) float tensor of
``[label, x1, y1, x2, y2]`` in pixels of the resized image, label −1 for padding, so a batch is one tensor.

Every malformed input is a one-line :class:`DataError` naming the file: a missing annotation, a box outside the
image or with no area, an unknown category. XML is parsed with :mod:`xml.etree.ElementTree` (expat ≥ 2.4.1, as
shipped with Python 3.11, refuses entity-expansion bombs). mAP comes from ``pycocotools`` (the standard COCO
evaluator), never a hand-written one.
"""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DatasetSpec, register_dataset
from .idx import DataError
from .loader import ResidentLoader, seeded_generator

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
SHAPES = ("rectangle", "ellipse", "triangle")


@dataclass
class DetectionSet:
    """Resized uint8 images (N, 3, size, size), per-image boxes (M, 4) xyxy in pixels and labels (M,)."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    classes: list[str]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def targets(self) -> torch.Tensor:
        """The padded (N, max_boxes, 5) ``[label, x1, y1, x2, y2]`` tensor, label −1 for padding."""
        most = max([len(b) for b in self.boxes] + [1])
        out = torch.full((len(self), most, 5), -1.0)
        for i, (b, lab) in enumerate(zip(self.boxes, self.labels)):
            out[i, : len(b), 0] = torch.as_tensor(lab, dtype=torch.float32)
            out[i, : len(b), 1:] = torch.as_tensor(b, dtype=torch.float32)
        return out


def _load_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing; check the dataset root") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode the image ({e}); re-download or remove it") from None
    return np.asarray(rgb).transpose(2, 0, 1).copy(), (width, height)


def _checked_boxes(boxes: np.ndarray, width: int, height: int, source: Path, size: int) -> np.ndarray:
    """Validate xyxy pixel boxes against the original image, then scale them to the resized square."""
    boxes = boxes.reshape(-1, 4).astype(np.float64)
    for box in boxes:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):
            raise DataError(f"{source}: box {box.tolist()} has no area; fix or drop the annotation")
        if x1 < -0.5 or y1 < -0.5 or x2 > width + 0.5 or y2 > height + 0.5:
            raise DataError(f"{source}: box {box.tolist()} lies outside the {width}x{height} image; fix the annotation")
    boxes = boxes.clip(0, [width, height, width, height])
    return (boxes * [size / width, size / height, size / width, size / height]).astype(np.float32)


def read_voc(root: str | Path, split: str = "train", size: int = 128, classes: list[str] | None = None) -> DetectionSet:
    """Pascal VOC layout: ``ImageSets/Main/<split>.txt``, ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg|png``.
    Classes: ``classes`` if given, the 20 VOC classes when every name is one of them, else the sorted names found.
    ``difficult`` objects are kept (the VOC evaluator's ignore flag has no COCO equivalent)."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: missing; a VOC root holds ImageSets/Main/{split}.txt, Annotations/, JPEGImages/")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    parsed = []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"{xml_path}: annotation for image {image_id!r} is missing; add it or drop the id")
        try:
            tree = ET.parse(xml_path).getroot()
            objects = [
                (
                    o.findtext("name", "").strip(),
                    [float(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")],
                )
                for o in tree.iter("object")
            ]
        except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{xml_path}: malformed VOC annotation ({e}); re-download it") from None
        parsed.append((image_id, xml_path, objects))
    names = sorted({name for _, _, objects in parsed for name, _ in objects})
    if classes is None:
        classes = list(VOC_CLASSES) if set(names) <= set(VOC_CLASSES) else names
    index = {name: i for i, name in enumerate(classes)}
    images, boxes, labels = [], [], []
    for image_id, xml_path, objects in parsed:
        candidates = [root / "JPEGImages" / f"{image_id}{ext}" for ext in (".jpg", ".jpeg", ".png")]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        image, (width, height) = _load_image(path, size)
        unknown = [name for name, _ in objects if name not in index]
        if unknown:
            raise DataError(f"{xml_path}: unknown class {unknown[0]!r}; known: {', '.join(classes)}")
        raw = np.array([b for _, b in objects], dtype=np.float64).reshape(-1, 4)
        raw[:, :2] -= 1  # VOC coordinates are 1-based pixel indices
        images.append(image)
        boxes.append(_checked_boxes(raw, width, height, xml_path, size))
        labels.append(np.array([index[name] for name, _ in objects], dtype=np.int64))
    if not images:
        raise DataError(f"{listing}: lists no images")
    return DetectionSet(np.stack(images), boxes, labels, classes, ids)


def read_coco(images_dir: str | Path, annotations: str | Path, size: int = 128) -> DetectionSet:
    """COCO layout: an instances JSON (``images``, ``annotations`` with xywh ``bbox``, ``categories``) and its
    image folder. Category ids map to contiguous labels in id order; crowd annotations are skipped."""
    images_dir, annotations = Path(images_dir), Path(annotations)
    try:
        data = json.loads(annotations.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        entries, anns = data["images"], data["annotations"]
    except FileNotFoundError:
        raise DataError(f"{annotations}: COCO annotation file is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{annotations}: not a COCO instances file ({e.__class__.__name__}: {e})") from None
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict]] = {e["id"]: [] for e in entries}
    for ann in anns:
        if ann.get("image_id") not in by_image:
            raise DataError(f"{annotations}: annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}")
        if ann.get("category_id") not in label_of:
            raise DataError(f"{annotations}: annotation {ann.get('id')} has unknown category {ann.get('category_id')}")
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    images, boxes, labels = [], [], []
    for entry in entries:
        image, (width, height) = _load_image(images_dir / entry["file_name"], size)
        xywh = np.array([a["bbox"] for a in by_image[entry["id"]]], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        images.append(image)
        boxes.append(_checked_boxes(xyxy, width, height, annotations, size))
        labels.append(np.array([label_of[a["category_id"]] for a in by_image[entry["id"]]], dtype=np.int64))
    if not images:
        raise DataError(f"{annotations}: lists no images")
    return DetectionSet(
        np.stack(images), boxes, labels, [c["name"] for c in categories], [e["file_name"] for e in entries]
    )


def render_shapes(n: int, size: int = 64, seed: int = 0, max_objects: int = 3) -> DetectionSet:
    """A synthetic set whose boxes are known exactly: 1..``max_objects`` filled rectangles, ellipses and triangles
    (one class each) in random colours on a noisy background, each box the tight extent of its shape."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    images, boxes, labels = [], [], []
    for _ in range(n):
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img_boxes, img_labels = [], []
        for _ in range(rng.integers(1, max_objects + 1)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x1, y1 = rng.integers(0, size - w), rng.integers(0, size - h)
            label = int(rng.integers(0, len(SHAPES)))
            u, v = (xs - x1) / w, (ys - y1) / h  # coordinates inside the box, 0..1
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            if SHAPES[label] == "ellipse":
                inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
            elif SHAPES[label] == "triangle":
                inside &= v >= np.abs(2 * u - 1)
            if not inside.any():
                continue
            rows, cols = np.nonzero(inside)
            image[inside] = rng.integers(120, 256, 3)
            img_boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            img_labels.append(label)
        images.append(image.transpose(2, 0, 1))
        boxes.append(np.array(img_boxes, dtype=np.float32).reshape(-1, 4))
        labels.append(np.array(img_labels, dtype=np.int64))
    return DetectionSet(np.stack(images), boxes, labels, list(SHAPES), [f"{i:06d}" for i in range(n)])


def write_voc(data: DetectionSet, root: str | Path, split: str = "train") -> Path:
    """Write ``data`` in the VOC layout (PNG images, 1-based XML boxes): how the tests build VOC files."""
    from PIL import Image

    root = Path(root)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, image, b, lab in zip(data.names, data.images, data.boxes, data.labels):
        Image.fromarray(image.transpose(1, 2, 0)).save(root / "JPEGImages" / f"{name}.png")
        objects = "".join(
            f"<object><name>{data.classes[int(c)]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:g}</xmin>"
            f"<ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
            for c, (x1, y1, x2, y2) in zip(lab, b.tolist())
        )
        size = f"<size><width>{image.shape[2]}</width><height>{image.shape[1]}</height><depth>3</depth></size>"
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename>{size}{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(data.names) + "\n")
    return root


def coco_dict(data: DetectionSet) -> dict:
    """``data`` as a COCO instances dict (xywh boxes, 1-based category ids)."""
    images = [
        {
            "id": i + 1,
            "file_name": f"{name}.png",
            "width": int(data.images.shape[3]),
            "height": int(data.images.shape[2]),
        }
        for i, name in enumerate(data.names)
    ]
    annotations = []
    for i, (b, lab) in enumerate(zip(data.boxes, data.labels)):
        for box, c in zip(b.tolist(), lab.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(data.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(data: DetectionSet, images_dir: str | Path, annotations: str | Path) -> Path:
    """Write ``data`` as PNG images plus a COCO instances JSON: how the tests build COCO files."""
    from PIL import Image

    images_dir, annotations = Path(images_dir), Path(annotations)
    images_dir.mkdir(parents=True, exist_ok=True)
    for name, image in zip(data.names, data.images):
        Image.fromarray(image.transpose(1, 2, 0)).save(images_dir / f"{name}.png")
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(coco_dict(data)))
    return annotations


def coco_map(data: DetectionSet, detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@.5 with pycocotools. ``detections[i]`` = (boxes xyxy, scores, labels) of image i."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(data):
        raise ValueError(f"{len(detections)} detection lists for {len(data)} images")
    results = [
        {"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for i, (b, scores, lab) in enumerate(detections)
        for (x1, y1, x2, y2), s, c in zip(np.asarray(b, dtype=np.float64).tolist(), scores, lab)
    ]
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = coco_dict(data)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": max(float(evaluator.stats[0]), 0.0), "map50": max(float(evaluator.stats[1]), 0.0)}


class DetectionLoader(ResidentLoader):
    """Resident batches of ``(input, padded targets, raw_uint8)``: the classification loader's shuffling and
    normalisation, with a horizontal flip that mirrors the boxes too (random per image, a pure function of
    seed, epoch and batch like every augmentation here)."""

    def __init__(self, data: DetectionSet, batch_size: int, *, train: bool, flip: bool, **kwargs) -> None:
        super().__init__(
            data.images, np.zeros(len(data), np.int64), batch_size, train=train, pad=0, flip=False, **kwargs
        )
        self.labels = data.targets().to(self.device)
        self.flip_boxes = flip and train

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i, (x, target, raw) in enumerate(super().batches(epoch, start), start):
            if self.flip_boxes:
                flipped = (torch.rand(len(x), generator=seeded_generator(self.seed, epoch, i, 2)) < 0.5).to(self.device)
                x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
                raw = torch.where(flipped[:, None, None, None], raw.flip(-1), raw)
                mirrored = target.clone()
                mirrored[..., 1], mirrored[..., 3] = self.w - target[..., 3], self.w - target[..., 1]
                target = torch.where(flipped[:, None, None] & (target[..., :1] >= 0), mirrored, target)
            yield x, target, raw


def detection_loaders(spec: Any, data: Any, device: torch.device, seed: int, channels_last: bool):
    """(train, test) :class:`DetectionLoader` s and the spec with the class count of the files, for
    ``data.name`` = ``shapes`` (rendered: no files), ``voc`` or ``coco``; images resized to ``data.image_size``."""
    size = data.image_size or (64 if spec.name == "shapes" else 256)
    if spec.name == "shapes":
        train = render_shapes(data.limit_train or 2048, size, seed=0)
        test = render_shapes(data.limit_test or 256, size, seed=1)
    else:
        root = Path(data.root or next((r for r in spec.default_roots if Path(r).exists()), spec.default_roots[0]))
        train, test = (_read_split(spec.name, root, names, size) for names in (("trainval", "train"), ("test", "val")))
        if test.classes != train.classes:
            test = _read_split(spec.name, root, ("test", "val"), size, classes=train.classes)
        if data.limit_train:
            train = _subset(train, data.limit_train)
        if data.limit_test:
            test = _subset(test, data.limit_test)
    common = {"mean": spec.mean, "std": spec.std, "seed": seed, "device": device, "channels_last": channels_last}
    flip = spec.flip if data.flip is None else data.flip
    loaders = (
        DetectionLoader(train, data.batch_size, train=True, flip=flip, **common),
        DetectionLoader(test, data.eval_batch_size, train=False, flip=False, **common),
    )
    return (*loaders, replace(spec, num_classes=len(train.classes), size=size, classes=tuple(train.classes)))


def _read_split(name: str, root: Path, splits: tuple[str, ...], size: int, classes: list[str] | None = None):
    for split in splits:
        if name == "voc" and (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            return read_voc(root, split, size, classes)
        for folder in (f"{split}2017", split):
            ann = root / "annotations" / f"instances_{folder}.json"
            if name == "coco" and ann.is_file():
                return read_coco(root / folder, ann, size)
    layout = "ImageSets/Main/<split>.txt" if name == "voc" else "annotations/instances_<split>2017.json"
    raise DataError(f"{root}: no {name} split among {', '.join(splits)} ({layout}); set data.root to the dataset root")


def _subset(data: DetectionSet, n: int) -> DetectionSet:
    return DetectionSet(data.images[:n], data.boxes[:n], data.labels[:n], data.classes, data.names[:n])


def _no_arrays(root: Path, split: str):
    raise DataError("detection datasets stream through detection_loaders, not load_split; use build_loaders")


for _name, _roots, _hint in (
    ("shapes", (), "rendered on the fly: no files needed"),
    ("voc", ("data/VOCdevkit/VOC2007", "data/voc"), "a VOC year folder (ImageSets/Main, Annotations, JPEGImages)"),
    ("coco", ("data/coco",), "a COCO root (annotations/instances_train2017.json, train2017/, val2017/)"),
):
    register_dataset(
        DatasetSpec(
            name=_name,
            num_classes=len(SHAPES) if _name == "shapes" else 20 if _name == "voc" else 80,  # nominal: files decide
            channels=3,
            size=64 if _name == "shapes" else 256,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            pad=0,
            pad_mode="zero",
            flip=True,
            default_roots=_roots,
            read=_no_arrays,
            hint=_hint,
            task="detection",
            loaders=detection_loaders,
            classes=tuple(SHAPES) if _name == "shapes" else tuple(VOC_CLASSES) if _name == "voc" else (),
        )
    )
