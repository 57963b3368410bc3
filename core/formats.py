"""Annotation formats, read and written without a database: tags CSV, YOLO, COCO, Pascal VOC,
binary mask PNGs.

Every reader returns `ImageLabels` keyed by the image it names, plus `Problem`s (one line
each, naming the file and the reason) for what it could not use; it never raises for bad
content, so one broken line does not cost the rest of a dataset.

Coordinates. Boxes here are (x1, y1, x2, y2) in pixels of the image as a viewer shows it, with
EXIF orientation applied, which is also how annotation tools (CVAT, LabelImg, Roboflow) show
the image to the person drawing. YOLO's normalised centres are converted with that displayed
size. Pascal VOC corners are read as continuous pixel edges (what CVAT and LabelImg write);
the original VOC devkit counted pixels from 1, a one-pixel shift that is below annotation
noise and that we do not apply.

Keys. A label names its image by a key: the label file's path relative to its folder without
the suffix ("cam1/frame_001" for labels/cam1/frame_001.txt), or the file name a CSV, COCO or
VOC file gives ("frame_001.jpg"). `ImageKeyIndex` matches keys to image files: by relative
path first, then by a unique file stem, and reports ambiguous stems instead of guessing.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

# A corner this close outside the image is float rounding of a box drawn to the edge, not an
# annotation error: clip it without a report line.
EDGE_TOLERANCE_PX = 0.5

TAG_TRUE = {"1", "true", "yes", "y", "t"}
TAG_FALSE = {"0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class Problem:
    """One thing a reader could not use: `path: reason` is the line shown to the user."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class BoxLabel:
    """A box (x1, y1, x2, y2) in pixels of the displayed image; score for model boxes."""

    class_name: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None


@dataclass
class ImageLabels:
    """What one annotation file (or CSV row) says about one image.

    boxes_complete: the boxes list every object of every class (YOLO, COCO and VOC files), so
        a class without a box is absent; False for tags-only sources.
    unsure_classes: classes whose absence cannot be claimed because a line about them (or an
        unreadable line, which could be about any class) was dropped. None means all classes.
    tags: explicit image-level tags {class: present}.
    size: (width, height) the annotation file states, when it states one.
    mask_path, mask_class: for mask sources, the PNG and its class (tags then say whether it
        has a foreground pixel).
    """

    key: str
    source: str
    boxes: list[BoxLabel] = field(default_factory=list)
    boxes_complete: bool = False
    unsure_classes: set[str] | None = field(default_factory=set)
    tags: dict[str, bool] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    mask_path: str | None = None
    mask_class: str | None = None

    def mark_all_unsure(self) -> None:
        self.unsure_classes = None

    def mark_unsure(self, class_name: str) -> None:
        if self.unsure_classes is not None:
            self.unsure_classes.add(class_name)

    def is_unsure(self, class_name: str) -> bool:
        return self.unsure_classes is None or class_name in self.unsure_classes


def key_of(path: str | Path, root: str | Path | None = None) -> str:
    """The key of a file: its POSIX path relative to `root` (or as given), without suffix."""
    path = Path(path)
    if root is not None:
        path = path.relative_to(root)
    return PurePosixPath(path.as_posix()).with_suffix("").as_posix()


def name_key(name: str) -> str:
    """The key of a file name written inside an annotation ("a/b.jpg", "C:\\x\\b.jpg")."""
    posix = name.strip().replace("\\", "/")
    while posix.startswith("./"):
        posix = posix[2:]
    return PurePosixPath(posix).with_suffix("").as_posix()


class ImageKeyIndex:
    """Finds the image file a label key means.

    Args:
        keys: the key of every image (its path relative to the ingested folder, no suffix).
    """

    def __init__(self, keys: Iterable[str]):
        self._keys = set(keys)
        self._by_stem: dict[str, list[str]] = defaultdict(list)
        self._by_suffix: dict[str, list[str]] = defaultdict(list)
        for key in self._keys:
            parts = key.split("/")
            self._by_stem[parts[-1]].append(key)
            for start in range(1, len(parts) - 1):
                self._by_suffix["/".join(parts[start:])].append(key)

    def match(self, label_key: str) -> tuple[str | None, str | None]:
        """(image key, None) on a match, else (None, reason).

        Order: the exact relative path; a unique image whose path ends with the label's
        relative path (labels/train/a.txt for images/train/a.jpg); a unique file stem.
        """
        label_key = label_key.strip("/")
        if label_key in self._keys:
            return label_key, None
        if "/" in label_key:
            tails = self._by_suffix.get(label_key, [])
            if len(tails) == 1:
                return tails[0], None
            if len(tails) > 1:
                return None, _ambiguous(tails)
        stem = label_key.rsplit("/", 1)[-1]
        candidates = self._by_stem.get(stem, [])
        if len(candidates) == 1:
            return candidates[0], None
        if len(candidates) > 1:
            return None, _ambiguous(candidates)
        return None, "no image with this name in the ingested folder"


def _ambiguous(candidates: Sequence[str]) -> str:
    shown = ", ".join(sorted(candidates)[:4])
    more = f" and {len(candidates) - 4} more" if len(candidates) > 4 else ""
    return (
        f"ambiguous: {len(candidates)} images share this name ({shown}{more}); "
        "give labels the same sub-folders as the images"
    )


def clip_box(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """Clip a pixel box (x1, y1, x2, y2) to a width x height image.

    Returns:
        (box, None) when it lies inside (up to EDGE_TOLERANCE_PX), (clipped box, reason) when
        it was partly outside, (None, reason) when nothing usable remains (fully outside,
        zero area, or not finite).
    """
    values = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in values):
        return None, f"box {_fmt_box(values)} is not finite; dropped"
    if x2 <= x1 or y2 <= y1:
        return None, f"box {_fmt_box(values)} has zero or negative area; dropped"
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, f"box {_fmt_box(values)} lies outside the {width}x{height} image; dropped"
    clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
    overshoot = max(-x1, -y1, x2 - width, y2 - height)
    if overshoot <= 0:
        return values, None
    if overshoot <= EDGE_TOLERANCE_PX:
        return clipped, None
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None, f"box {_fmt_box(values)} has no area inside the image; dropped"
    return clipped, (
        f"box {_fmt_box(values)} reaches {overshoot:.1f} px outside the {width}x{height} "
        f"image; clipped to {_fmt_box(clipped)}"
    )


def _fmt_box(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


# Tags CSV


def read_tags_csv(
    path: str | Path, class_names: Sequence[str]
) -> tuple[list[ImageLabels], list[Problem]]:
    """Read `image,fire,smoke` (1/0 per class) or `image,labels` (`;`-separated present names).

    In the `labels` form every workspace class not listed is absent. A blank cell leaves that
    class untagged. Columns and names that are not workspace classes are reported and skipped.
    """
    path = Path(path)
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        return [], [Problem(str(path), f"cannot read the tags CSV ({err})")]
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return [], [Problem(str(path), "empty tags CSV")]
    header = [cell.strip() for cell in rows[0]]
    lowered = [cell.lower() for cell in header]
    if "image" not in lowered:
        return [], [Problem(str(path), f"no `image` column in the header {header}")]
    image_col = lowered.index("image")
    known = set(class_names)
    labels_col = lowered.index("labels") if "labels" in lowered else None
    class_cols: dict[int, str] = {}
    if labels_col is None:
        for col, name in enumerate(header):
            if col == image_col or not name:
                continue
            if name in known:
                class_cols[col] = name
            else:
                problems.append(
                    Problem(str(path), f"column {name!r} is not a workspace class; ignored")
                )
        if not class_cols:
            problems.append(Problem(str(path), "no class columns (expected image,fire,smoke)"))
            return [], problems

    labels: list[ImageLabels] = []
    for line_no, row in enumerate(rows[1:], start=2):
        where = f"{path}:{line_no}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= image_col or not row[image_col].strip():
            problems.append(Problem(where, "no image name; row skipped"))
            continue
        name = row[image_col].strip()
        entry = ImageLabels(key=name_key(name), source=where)
        if labels_col is not None:
            cell = row[labels_col] if len(row) > labels_col else ""
            listed = {part.strip() for part in cell.split(";") if part.strip()}
            for unknown in sorted(listed - known):
                problems.append(Problem(where, f"{unknown!r} is not a workspace class; ignored"))
            entry.tags = {cls: cls in listed for cls in class_names}
        else:
            for col, cls in class_cols.items():
                value = row[col].strip().lower() if len(row) > col else ""
                if value in TAG_TRUE:
                    entry.tags[cls] = True
                elif value in TAG_FALSE:
                    entry.tags[cls] = False
                elif value:
                    problems.append(
                        Problem(where, f"{cls}={row[col]!r} is not 1/0; that tag is skipped")
                    )
        if entry.tags:
            labels.append(entry)
    return labels, problems


# YOLO


def read_classes_file(path: str | Path) -> list[str]:
    """Class names, one per line, in id order (YOLO classes.txt); blank lines are skipped."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return [line.strip() for line in lines if line.strip()]


@dataclass(frozen=True)
class YoloBox:
    """One YOLO line: class id and normalised centre and size in [0, 1]."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixels of a width x height (displayed) image."""
        return (
            (self.cx - self.w / 2) * width,
            (self.cy - self.h / 2) * height,
            (self.cx + self.w / 2) * width,
            (self.cy + self.h / 2) * height,
        )


def parse_yolo_text(text: str, source: str) -> tuple[list[YoloBox], list[Problem]]:
    """Parse `class cx cy w h` lines (a sixth value, a score, is allowed and ignored)."""
    boxes, problems = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{source}:{line_no}"
        if len(parts) not in (5, 6):
            problems.append(
                Problem(where, f"expected `class cx cy w h`, got {len(parts)} values; skipped")
            )
            continue
        try:
            class_id = int(parts[0])
            cx, cy, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            problems.append(Problem(where, f"not numbers: {line.strip()!r}; skipped"))
            continue
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            problems.append(Problem(where, f"not finite: {line.strip()!r}; skipped"))
            continue
        boxes.append(YoloBox(class_id, cx, cy, w, h))
    return boxes, problems


def read_yolo_dir(
    labels_dir: str | Path, class_names: Sequence[str]
) -> tuple[list[YoloFile], list[Problem]]:
    """Read every `*.txt` under labels_dir (recursive), except a classes.txt at its top.

    Boxes stay normalised here: pixels need the image's displayed size, which ingest reads
    from the image (`yolo_labels`). An empty file is a negative image.
    """
    labels_dir = Path(labels_dir)
    files, problems = [], []
    for path in sorted(labels_dir.rglob("*.txt")):
        if path.parent == labels_dir and path.name in ("classes.txt", "obj.names"):
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem(str(path), f"cannot read ({err}); skipped"))
            continue
        boxes, file_problems = parse_yolo_text(text, str(path))
        problems += file_problems
        files.append(
            YoloFile(key_of(path, labels_dir), str(path), boxes, malformed=bool(file_problems))
        )
    return files, problems


@dataclass
class YoloFile:
    """One YOLO label file, boxes still normalised; malformed: some line was unreadable."""

    key: str
    path: str
    boxes: list[YoloBox]
    malformed: bool


def yolo_labels(
    yolo_file: YoloFile,
    width: int,
    height: int,
    file_classes: Sequence[str],
    workspace_classes: Sequence[str],
) -> tuple[ImageLabels, list[Problem]]:
    """Pixel boxes of one YOLO file for a width x height (displayed) image, not yet clipped."""
    labels = ImageLabels(key=yolo_file.key, source=yolo_file.path, boxes_complete=True)
    problems = []
    if yolo_file.malformed:
        labels.mark_all_unsure()
    known = set(workspace_classes)
    for box in yolo_file.boxes:
        if not 0 <= box.class_id < len(file_classes):
            problems.append(
                Problem(
                    yolo_file.path,
                    f"class id {box.class_id} is out of range (the classes file has "
                    f"{len(file_classes)}); box skipped",
                )
            )
            labels.mark_all_unsure()
            continue
        name = file_classes[box.class_id]
        if name not in known:
            continue  # reported once per class by the caller
        labels.boxes.append(BoxLabel(name, *box.to_pixels(width, height)))
    return labels, problems


def clip_labels(labels: ImageLabels, width: int, height: int) -> list[Problem]:
    """Clip labels.boxes to a width x height image in place (see clip_box); a dropped box
    makes its class unsure, so no absent tag is claimed for it."""
    problems, kept = [], []
    for box in labels.boxes:
        clipped, reason = clip_box(box.x1, box.y1, box.x2, box.y2, width, height)
        if reason:
            problems.append(Problem(labels.source, f"{box.class_name} {reason}"))
        if clipped is None:
            labels.mark_unsure(box.class_name)
            continue
        kept.append(BoxLabel(box.class_name, *clipped, score=box.score))
    labels.boxes = kept
    return problems


def write_yolo_text(boxes: Iterable[BoxLabel], width: int, height: int, classes: Sequence[str]):
    """YOLO lines for pixel boxes on a width x height image (an empty string for none)."""
    lines = []
    for box in boxes:
        cx = (box.x1 + box.x2) / 2 / width
        cy = (box.y1 + box.y2) / 2 / height
        w = (box.x2 - box.x1) / width
        h = (box.y2 - box.y1) / height
        line = f"{classes.index(box.class_name)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"
        if box.score is not None:
            line += f" {box.score:.4f}"
        lines.append(line)
    return "".join(line + "\n" for line in lines)


# COCO


def read_coco(
    path: str | Path, class_names: Sequence[str]
) -> tuple[list[ImageLabels], list[Problem]]:
    """Read a COCO detection JSON: one ImageLabels per entry of `images`.

    bbox is [x, y, width, height] in pixels. An image entry without annotations is a negative.
    Categories that are not workspace classes are reported once and skipped.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        images = data["images"]
        annotations = data.get("annotations", [])
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [], [Problem(str(path), f"not a COCO JSON ({type(err).__name__}: {err})")]
    problems: list[Problem] = []
    known = set(class_names)
    for name in sorted(set(categories.values()) - known):
        problems.append(Problem(str(path), f"category {name!r} is not a workspace class; skipped"))

    by_id: dict[object, ImageLabels] = {}
    for index, entry in enumerate(images):
        try:
            image_id, file_name = entry["id"], str(entry["file_name"])
            size = (int(entry["width"]), int(entry["height"])) if "width" in entry else None
        except (KeyError, TypeError, ValueError) as err:
            problems.append(Problem(f"{path} images[{index}]", f"malformed entry ({err})"))
            continue
        by_id[image_id] = ImageLabels(
            key=name_key(file_name),
            source=f"{path} ({file_name})",
            boxes_complete=True,
            size=size,
        )
    for index, ann in enumerate(annotations):
        where = f"{path} annotations[{index}]"
        try:
            labels = by_id[ann["image_id"]]
        except (KeyError, TypeError):
            problems.append(Problem(where, "refers to an image id not in `images`; skipped"))
            continue
        name = categories.get(ann.get("category_id"))
        if name is None:
            problems.append(Problem(where, f"unknown category id {ann.get('category_id')}"))
            labels.mark_all_unsure()
            continue
        if name not in known:
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            score = float(ann["score"]) if ann.get("score") is not None else None
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(where, f"bbox is not [x, y, w, h]: {ann.get('bbox')!r}"))
            labels.mark_unsure(name)
            continue
        labels.boxes.append(BoxLabel(name, x, y, x + w, y + h, score=score))
    return list(by_id.values()), problems


def coco_document(
    images: Sequence[tuple[int, str, int, int]],
    boxes: Sequence[tuple[int, BoxLabel]],
    classes: Sequence[str],
) -> dict:
    """A COCO detection document.

    Args:
        images: (image id, file name, width, height) per image.
        boxes: (image id, box) pairs; a box's score goes into the annotation when set.
        classes: workspace classes; category ids are their index + 1 (COCO starts at 1).
    """
    annotations = []
    for ann_id, (image_id, box) in enumerate(boxes, start=1):
        w, h = box.x2 - box.x1, box.y2 - box.y1
        ann = {
            "id": ann_id,
            "image_id": image_id,
            "category_id": classes.index(box.class_name) + 1,
            "bbox": [round(box.x1, 3), round(box.y1, 3), round(w, 3), round(h, 3)],
            "area": round(w * h, 3),
            "iscrowd": 0,
        }
        if box.score is not None:
            ann["score"] = round(box.score, 6)
        annotations.append(ann)
    return {
        "info": {"description": "exported by pyrolabel"},
        "images": [
            {"id": i, "file_name": name, "width": w, "height": h} for i, name, w, h in images
        ],
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(classes)
        ],
    }


# Pascal VOC


def read_voc_dir(
    voc_dir: str | Path, class_names: Sequence[str]
) -> tuple[list[ImageLabels], list[Problem]]:
    """Read every `*.xml` under voc_dir (recursive).

    The key is the XML file's own relative path, not its <filename> (whose folder is often the
    annotator's machine), so same-named images in two folders stay apart. An XML without
    objects is a negative.
    """
    voc_dir = Path(voc_dir)
    labels, problems = [], []
    known = set(class_names)
    unknown_names: set[str] = set()
    for path in sorted(voc_dir.rglob("*.xml")):
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as err:
            problems.append(Problem(str(path), f"not a readable XML ({err}); skipped"))
            continue
        entry = ImageLabels(key=key_of(path, voc_dir), source=str(path), boxes_complete=True)
        try:
            size = root.find("size")
            if size is not None:
                entry.size = (int(size.findtext("width")), int(size.findtext("height")))
        except (TypeError, ValueError):
            problems.append(Problem(str(path), "unreadable <size>; the image's own size is used"))
        for index, obj in enumerate(root.iter("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            if name not in known:
                unknown_names.add(name)
                continue
            box = obj.find("bndbox")
            try:
                coords = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
                score_text = obj.findtext("score")
                score = float(score_text) if score_text else None
            except (AttributeError, TypeError, ValueError):
                problems.append(Problem(str(path), f"object {index} ({name}): bad <bndbox>"))
                entry.mark_unsure(name)
                continue
            entry.boxes.append(BoxLabel(name, *coords, score=score))
        labels.append(entry)
    for name in sorted(unknown_names):
        problems.append(Problem(str(voc_dir), f"object name {name!r} is not a workspace class"))
    return labels, problems


def voc_xml(file_name: str, width: int, height: int, boxes: Iterable[BoxLabel]) -> str:
    """A Pascal VOC annotation; a box's score is written as <score> when set."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    for box in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = box.class_name
        ET.SubElement(obj, "difficult").text = "0"
        if box.score is not None:
            ET.SubElement(obj, "score").text = f"{box.score:.6g}"
        bndbox = ET.SubElement(obj, "bndbox")
        corners = (box.x1, box.y1, box.x2, box.y2)
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
            ET.SubElement(bndbox, tag).text = _voc_number(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _voc_number(value: float) -> str:
    # Whole pixels as integers, which every VOC reader parses; fractions kept to 0.01 px.
    return str(int(round(value))) if abs(value - round(value)) < 1e-6 else f"{value:.2f}"


# Masks


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask PNG as (H, W) bool: any value above 0 is the class.

    Grey, 1-bit and 16-bit masks compare the value; palette masks their index (VOC style);
    colour masks any channel (alpha ignored).

    Raises:
        OSError / ValueError: the file is not a readable image.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
            return np.asarray(img.convert("RGB")).max(axis=2) > 0
        if img.mode == "LA":
            return np.asarray(img)[..., 0] > 0
        return np.asarray(img) > 0


def read_masks_dir(
    masks_dir: str | Path, class_name: str
) -> tuple[list[ImageLabels], list[Problem]]:
    """Every PNG under masks_dir (recursive) as a mask of `class_name`, keyed like its image.

    Each entry's size is the mask's (width, height) and its tag says whether any pixel is set.
    """
    masks_dir = Path(masks_dir)
    labels, problems = [], []
    for path in sorted(masks_dir.rglob("*")):
        if not (path.is_file() and path.suffix.lower() == ".png"):
            continue
        try:
            mask = read_mask(path)
        except Exception as err:  # Pillow raises many types for a broken file
            problems.append(Problem(str(path), f"not a readable mask PNG ({err}); skipped"))
            continue
        labels.append(
            ImageLabels(
                key=key_of(path, masks_dir),
                source=str(path),
                tags={class_name: bool(mask.any())},
                size=(mask.shape[1], mask.shape[0]),
                mask_path=str(path),
                mask_class=class_name,
            )
        )
    return labels, problems


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write an (H, W) bool mask as an 8-bit PNG, 255 for the class and 0 elsewhere."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
