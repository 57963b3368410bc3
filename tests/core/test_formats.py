import json

import numpy as np
import pytest
from PIL import Image

from core.formats import (
    BoxLabel,
    ImageKeyIndex,
    ImageLabels,
    clip_box,
    clip_labels,
    coco_document,
    key_of,
    name_key,
    parse_yolo_text,
    read_coco,
    read_mask,
    read_masks_dir,
    read_tags_csv,
    read_voc_dir,
    read_yolo_dir,
    voc_xml,
    write_mask,
    write_yolo_text,
    yolo_labels,
)

CLASSES = ["fire", "smoke"]


def random_boxes(rng, n, width, height):
    """Boxes well inside a width x height image, in pixels."""
    boxes = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
        x2, y2 = rng.uniform(x1 + 1, width), rng.uniform(y1 + 1, height)
        boxes.append(BoxLabel(str(rng.choice(CLASSES)), x1, y1, x2, y2))
    return boxes


def assert_same_boxes(got, expected, atol):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.class_name == b.class_name
        np.testing.assert_allclose([a.x1, a.y1, a.x2, a.y2], [b.x1, b.y1, b.x2, b.y2], atol=atol)


def test_yolo_lines_to_pixels():
    boxes, problems = parse_yolo_text("0 0.5 0.5 0.25 0.5\n\n1 0.1 0.2 0.2 0.4 0.9\n", "a.txt")
    assert problems == []
    assert boxes[0].to_pixels(200, 100) == (75.0, 25.0, 125.0, 75.0)
    np.testing.assert_allclose(boxes[1].to_pixels(200, 100), (0.0, 0.0, 40.0, 40.0), atol=1e-9)


def test_malformed_yolo_lines_are_reported_by_line():
    text = "0 0.5 0.5 0.2 0.2\n0 0.5 0.5\nfire 0.5 0.5 0.2 0.2\n1 nan 0.5 0.2 0.2\n"
    boxes, problems = parse_yolo_text(text, "lab.txt")
    assert len(boxes) == 1
    assert [p.path for p in problems] == ["lab.txt:2", "lab.txt:3", "lab.txt:4"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yolo_write_then_read_gives_the_boxes_back(tmp_path, seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(50, 900)), int(rng.integers(50, 900))
    boxes = random_boxes(rng, 5, width, height)
    (tmp_path / "img.txt").write_text(write_yolo_text(boxes, width, height, CLASSES))
    files, problems = read_yolo_dir(tmp_path, CLASSES)
    assert problems == [] and files[0].key == "img"
    labels, problems = yolo_labels(files[0], width, height, CLASSES, CLASSES)
    assert problems == [] and labels.boxes_complete
    # Six decimals of a normalised coordinate: at most 0.5e-6 * 900 px apart.
    assert_same_boxes(labels.boxes, boxes, atol=1e-3)


def test_yolo_class_ids_out_of_range_and_unknown_classes(tmp_path):
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    files, _ = read_yolo_dir(tmp_path, CLASSES)
    labels, problems = yolo_labels(files[0], 100, 100, ["fire", "smoke", "person"], CLASSES)
    assert [b.class_name for b in labels.boxes] == ["fire"]
    assert len(problems) == 1 and "class id 5 is out of range" in problems[0].reason
    # A dropped line could have been any class, so no class may be called absent.
    assert labels.is_unsure("smoke")


def test_empty_yolo_file_is_a_negative(tmp_path):
    (tmp_path / "neg.txt").write_text("")
    (tmp_path / "classes.txt").write_text("fire\nsmoke\n")
    files, problems = read_yolo_dir(tmp_path, CLASSES)
    assert [f.key for f in files] == ["neg"] and problems == []
    labels, _ = yolo_labels(files[0], 10, 10, CLASSES, CLASSES)
    assert labels.boxes == [] and labels.boxes_complete and not labels.is_unsure("fire")


def reference_clip(box, width, height):
    """Intersection with the image rectangle, or None when it has no area."""
    x1, y1 = max(box[0], 0), max(box[1], 0)
    x2, y2 = min(box[2], width), min(box[3], height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clip_box_matches_rectangle_intersection(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        width, height = int(rng.integers(5, 100)), int(rng.integers(5, 100))
        x1, x2 = sorted(rng.uniform(-50, 150, 2))
        y1, y2 = sorted(rng.uniform(-50, 150, 2))
        clipped, reason = clip_box(x1, y1, x2, y2, width, height)
        expected = reference_clip((x1, y1, x2, y2), width, height)
        if expected is None:
            assert clipped is None and "dropped" in reason
            continue
        np.testing.assert_allclose(clipped, expected)
        inside = x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height
        overshoot = max(-x1, -y1, x2 - width, y2 - height)
        assert (reason is None) == (inside or overshoot <= 0.5)


def test_clip_box_reasons():
    box, reason = clip_box(10, 10, 10, 20, 50, 50)
    assert box is None and "zero or negative area" in reason
    box, reason = clip_box(60, 10, 70, 20, 50, 50)
    assert box is None and "outside the 50x50 image" in reason
    box, reason = clip_box(-10, 0, 20, 20, 50, 50)
    assert box == (0.0, 0, 20, 20) and "clipped" in reason
    # Rounding at the edge is clipped without a report.
    assert clip_box(0, 0, 50.3, 50, 50, 50) == ((0, 0, 50.0, 50), None)


def test_clip_labels_marks_dropped_classes_unsure():
    labels = ImageLabels("k", "src", boxes=[BoxLabel("fire", 60, 60, 70, 70)], boxes_complete=True)
    problems = clip_labels(labels, 50, 50)
    assert labels.boxes == [] and len(problems) == 1
    assert labels.is_unsure("fire") and not labels.is_unsure("smoke")


def test_key_index_matching():
    index = ImageKeyIndex(["a/same", "b/same", "cam1/x/frame", "solo", "deep/dir/one"])
    assert index.match("a/same") == ("a/same", None)
    assert index.match("solo") == ("solo", None)
    assert index.match("one") == ("deep/dir/one", None)
    assert index.match("dir/one") == ("deep/dir/one", None)
    assert index.match("x/frame") == ("cam1/x/frame", None)
    key, reason = index.match("same")
    assert key is None and "ambiguous: 2 images" in reason and "a/same" in reason
    key, reason = index.match("missing")
    assert key is None and "no image" in reason


def test_keys():
    assert key_of("/d/labels/cam 1/été.txt", "/d/labels") == "cam 1/été"
    assert name_key("./cam1/a.jpg") == "cam1/a"
    assert name_key("C:\\data\\a.b.jpg") == "C:/data/a.b"


def test_tags_csv_columns(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("image,fire,smoke,person\na.jpg,1,0,1\nb.jpg,0,,0\nc.jpg,x,1,0\n,1,1,1\n")
    labels, problems = read_tags_csv(path, CLASSES)
    assert {entry.key: entry.tags for entry in labels} == {
        "a": {"fire": True, "smoke": False},
        "b": {"fire": False},
        "c": {"smoke": True},
    }
    reasons = [str(p) for p in problems]
    assert any("'person' is not a workspace class" in r for r in reasons)
    assert any(r.startswith(f"{path}:4") and "not 1/0" in r for r in reasons)
    assert any(r.startswith(f"{path}:5") and "no image name" in r for r in reasons)


def test_tags_csv_labels_form(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("image,labels\nsub/a.png,fire;smoke\nb.png,\nc.png, smoke ;dog\n")
    labels, problems = read_tags_csv(path, CLASSES)
    assert {entry.key: entry.tags for entry in labels} == {
        "sub/a": {"fire": True, "smoke": True},
        "b": {"fire": False, "smoke": False},
        "c": {"fire": False, "smoke": True},
    }
    assert len(problems) == 1 and "'dog'" in problems[0].reason


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_document_reads_back(tmp_path, seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 4, 300, 200)
    boxes[0] = BoxLabel(boxes[0].class_name, 1, 2, 30, 40, score=0.75)
    document = coco_document(
        [(7, "cam/a.jpg", 300, 200), (9, "b.jpg", 300, 200)],
        [(7, box) for box in boxes],
        CLASSES,
    )
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(document))
    labels, problems = read_coco(path, CLASSES)
    assert problems == []
    by_key = {entry.key: entry for entry in labels}
    assert set(by_key) == {"cam/a", "b"}
    assert by_key["b"].boxes == [] and by_key["b"].boxes_complete  # a negative
    assert by_key["cam/a"].size == (300, 200)
    assert_same_boxes(by_key["cam/a"].boxes, boxes, atol=1e-3)
    assert by_key["cam/a"].boxes[0].score == 0.75


def test_coco_problems(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                "annotations": [
                    {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
                    {"image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]},
                    {"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
                    {"image_id": 1, "category_id": 1, "bbox": "oops"},
                ],
                "categories": [{"id": 1, "name": "fire"}, {"id": 3, "name": "car"}],
            }
        )
    )
    labels, problems = read_coco(path, CLASSES)
    assert len(labels[0].boxes) == 1
    reasons = " | ".join(str(p) for p in problems)
    assert "'car' is not a workspace class" in reasons
    assert "annotations[1]" in reasons and "annotations[3]" in reasons
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    labels, problems = read_coco(broken, CLASSES)
    assert labels == [] and "not a COCO JSON" in problems[0].reason


@pytest.mark.parametrize("seed", [0, 1])
def test_voc_xml_reads_back(tmp_path, seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 3, 120, 80) + [BoxLabel("smoke", 0, 0, 12, 8, score=0.5)]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.xml").write_text(voc_xml("a.jpg", 120, 80, boxes))
    (tmp_path / "neg.xml").write_text(voc_xml("neg.jpg", 120, 80, []))
    (tmp_path / "bad.xml").write_text("<annotation><object>")
    labels, problems = read_voc_dir(tmp_path, CLASSES)
    by_key = {entry.key: entry for entry in labels}
    assert set(by_key) == {"sub/a", "neg"}
    assert len(problems) == 1 and problems[0].path.endswith("bad.xml")
    assert by_key["sub/a"].size == (120, 80)
    # Fractions are written to 0.01 px.
    assert_same_boxes(by_key["sub/a"].boxes, boxes, atol=0.005)
    assert by_key["sub/a"].boxes[-1].score == 0.5
    assert by_key["neg"].boxes == [] and by_key["neg"].boxes_complete


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "RGBA", "I;16"])
def test_read_mask_modes(tmp_path, mode):
    truth = np.zeros((6, 8), dtype=bool)
    truth[1:4, 2:7] = True
    if mode == "P":
        img = Image.fromarray(truth.astype(np.uint8), mode="L").convert("P")
    elif mode == "I;16":
        img = Image.fromarray((truth * 1000).astype("<u2"))
    elif mode == "1":
        img = Image.fromarray(truth)
    else:
        img = Image.fromarray((truth * 255).astype(np.uint8), mode="L").convert(mode)
    path = tmp_path / "m.png"
    img.save(path)
    np.testing.assert_array_equal(read_mask(path), truth)


def test_masks_dir_and_write_mask(tmp_path):
    truth = np.zeros((5, 7), dtype=bool)
    truth[2, 3] = True
    write_mask(tmp_path / "masks" / "cam" / "a.png", truth)
    write_mask(tmp_path / "masks" / "empty.png", np.zeros((5, 7), dtype=bool))
    (tmp_path / "masks" / "broken.png").write_bytes(b"\x89PNG broken")
    labels, problems = read_masks_dir(tmp_path / "masks", "fire")
    by_key = {entry.key: entry for entry in labels}
    assert by_key["cam/a"].tags == {"fire": True} and by_key["cam/a"].size == (7, 5)
    assert by_key["empty"].tags == {"fire": False}
    assert len(problems) == 1 and "broken.png" in problems[0].path
    assert np.asarray(Image.open(tmp_path / "masks" / "cam" / "a.png")).max() == 255
