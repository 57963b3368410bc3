import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from db.ingest import IngestOptions, ingest
from db.models import Box, BoxOrigin, BoxStatus, Image, Mask, MaskOrigin, Tag, TagOrigin
from db.queries import box_counts, image_tag_sets, splits
from db.workspace import WorkspaceError


def options(**kwargs) -> IngestOptions:
    return IngestOptions(progress=False, workers=2, **kwargs)


def stored_boxes(workspace) -> dict[str, list[tuple]]:
    """{image file name: sorted [(class, x1, y1, x2, y2, origin, status)]}."""
    with workspace.session() as session:
        rows = session.execute(
            select(
                Image.path, Box.class_id, Box.x1, Box.y1, Box.x2, Box.y2, Box.origin, Box.status
            ).join(Image, Box.image_id == Image.id)
        )
        names = {1: "fire", 2: "smoke"}
        result: dict[str, list[tuple]] = {}
        for path, class_id, *corners, origin, status in rows:
            entry = (names[class_id], *(round(c, 3) for c in corners), origin, status)
            result.setdefault(Path(path).name, []).append(entry)
    return {name: sorted(boxes) for name, boxes in result.items()}


def stored_tags(workspace) -> dict[str, dict[str, bool]]:
    with workspace.session() as session:
        tags = image_tag_sets(session, origins=(TagOrigin.GIVEN,))
        paths = dict(session.execute(select(Image.id, Image.path)).all())
    return {Path(paths[image_id]).name: tag for image_id, tag in tags.items()}


def test_tiny_dataset_yolo(workspace, tiny_dataset):
    report = ingest(
        workspace,
        tiny_dataset.images,
        options(yolo_dir=tiny_dataset.labels, classes_file=tiny_dataset.classes),
    )
    assert report.problems == []
    assert (report.new_images, report.skipped, report.tags, report.boxes) == (6, 0, 12, 6)
    assert report.summary().startswith("ingested 6, skipped 0")
    assert stored_tags(workspace) == tiny_dataset.tags
    expected = {
        name: sorted((c, *(float(v) for v in xyxy), "given", "accepted") for c, *xyxy in boxes)
        for name, boxes in tiny_dataset.boxes.items()
        if boxes
    }
    assert stored_boxes(workspace) == expected
    with workspace.session() as session:
        image = session.scalars(select(Image).where(Image.path.like("%fire_a.jpg"))).one()
        assert (image.width, image.height, image.split) == (64, 48, "train")
        assert image.path == str((tiny_dataset.images / "fire_a.jpg").resolve())
        assert len(image.content_hash) == 64


def test_same_ingest_twice_adds_nothing(workspace, tiny_dataset):
    opts = options(
        yolo_dir=tiny_dataset.labels,
        classes_file=tiny_dataset.classes,
        tags_csv=tiny_dataset.tags_csv,
    )
    first = ingest(workspace, tiny_dataset.images, opts)
    assert (first.new_images, first.tags, first.boxes) == (6, 12, 6)
    second = ingest(workspace, tiny_dataset.images, opts)
    assert (second.new_images, second.known_images, second.tags, second.boxes) == (0, 6, 0, 0)
    assert second.problems == []
    with workspace.session() as session:
        assert session.scalar(select(func.count(Image.id))) == 6
        assert session.scalar(select(func.count(Box.id))) == 6
        assert session.scalar(select(func.count(Tag.id))) == 12


def test_moved_file_is_recognised(workspace, tiny_dataset, tmp_path):
    ingest(workspace, tiny_dataset.images, options())
    moved_dir = tmp_path / "elsewhere" / "deeper"
    moved_dir.mkdir(parents=True)
    shutil.move(tiny_dataset.images / "fire_a.jpg", moved_dir / "renamed.jpg")
    report = ingest(workspace, tmp_path / "elsewhere", options())
    assert (report.new_images, report.known_images, report.moved) == (0, 1, 1)
    with workspace.session() as session:
        paths = set(session.scalars(select(Image.path)))
    assert str((moved_dir / "renamed.jpg").resolve()) in paths
    assert len(paths) == 6


def test_tags_only_keeps_boxes_as_reference(workspace, tiny_dataset):
    report = ingest(
        workspace,
        tiny_dataset.images,
        options(yolo_dir=tiny_dataset.labels, classes_file=tiny_dataset.classes, tags_only=True),
    )
    assert report.boxes == 6
    with workspace.session() as session:
        assert box_counts(session) == {(BoxOrigin.REFERENCE, BoxStatus.ACCEPTED): 6}
        origins = set(session.scalars(select(Tag.origin)))
    # Training must see the tags, so they are given; the boxes stay held out.
    assert origins == {TagOrigin.GIVEN}
    assert stored_tags(workspace) == tiny_dataset.tags


def test_split_and_labels_csv_form(workspace, tiny_dataset, tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,labels\nfire_a.jpg,fire\nboth_a.jpg,fire;smoke\nnone_a.jpg,\n")
    report = ingest(workspace, tiny_dataset.images, options(tags_csv=csv_path, split="val"))
    assert report.tags == 6
    assert stored_tags(workspace) == {
        "fire_a.jpg": {"fire": True, "smoke": False},
        "both_a.jpg": {"fire": True, "smoke": True},
        "none_a.jpg": {"fire": False, "smoke": False},
    }
    with workspace.session() as session:
        assert splits(session) == {"val": 6}


def test_explicit_tag_wins_over_boxes_and_the_conflict_is_reported(workspace, tiny_dataset):
    tiny_dataset.tags_csv.write_text("image,fire\nfire_a.jpg,0\n")
    report = ingest(
        workspace,
        tiny_dataset.images,
        options(
            yolo_dir=tiny_dataset.labels,
            classes_file=tiny_dataset.classes,
            tags_csv=tiny_dataset.tags_csv,
        ),
    )
    assert len(report.problems) == 1 and "fire tags disagree" in report.problems[0]
    assert stored_tags(workspace)["fire_a.jpg"] == {"fire": False, "smoke": False}


def test_exif_rotated_image_sizes_and_boxes_are_displayed_orientation(workspace, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    labels.mkdir()
    # Stored 40x20 landscape, EXIF 6: a viewer (and the annotator) sees 20x40 portrait.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    images.mkdir()
    PILImage.fromarray(stored).save(images / "rot.jpg", exif=exif.tobytes())
    (labels / "rot.txt").write_text("0 0.25 0.5 0.5 0.5\n")
    (tmp_path / "classes.txt").write_text("fire\nsmoke\n")
    ingest(workspace, images, options(yolo_dir=labels, classes_file=tmp_path / "classes.txt"))
    with workspace.session() as session:
        image = session.scalars(select(Image)).one()
        box = session.scalars(select(Box)).one()
    assert (image.width, image.height) == (20, 40)
    assert (box.x1, box.y1, box.x2, box.y2) == (0.0, 10.0, 10.0, 30.0)


def test_masks_ingest(workspace, tmp_path, make_image):
    images, masks = tmp_path / "frames", tmp_path / "masks"
    masks.mkdir()
    for name, on in [("f1", True), ("f2", False), ("f3", True)]:
        make_image(images / f"{name}.jpg", (16, 12))
        mask = np.zeros((12, 16), dtype=np.uint8)
        if on:
            mask[2:5, 3:9] = 255
        PILImage.fromarray(mask).save(masks / f"{name}.png")
    PILImage.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(masks / "f4.png")  # no image
    make_image(images / "f5.jpg", (16, 12))
    PILImage.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(masks / "f5.png")  # wrong size
    report = ingest(workspace, images, options(masks_dir=masks, mask_class="smoke"))
    assert (report.new_images, report.masks, report.tags) == (4, 3, 3)
    assert len(report.problems) == 2
    assert any("f4.png" in line and "no image" in line for line in report.problems)
    assert any("f5.png" in line and "10x10" in line for line in report.problems)
    assert stored_tags(workspace) == {
        "f1.jpg": {"smoke": True},
        "f2.jpg": {"smoke": False},
        "f3.jpg": {"smoke": True},
    }
    with workspace.session() as session:
        origins = set(session.scalars(select(Mask.origin)))
        paths = set(session.scalars(select(Mask.path)))
    assert origins == {MaskOrigin.GIVEN}
    assert str((masks / "f1.png").resolve()) in paths
    again = ingest(workspace, images, options(masks_dir=masks, mask_class="smoke"))
    assert (again.masks, again.tags) == (0, 0)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height: a decompression bomb for a header reader."""
    PILImage.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def broken_corpus(tmp_path, make_image):
    """A folder of good and bad images and labels; returns (root, good names, bad files)."""
    root = tmp_path / "corpus"
    images, labels = root / "images", root / "labels"
    labels.mkdir(parents=True)
    good = {
        "plain.jpg": make_image(images / "plain.jpg", (40, 30)),
        "grey.png": make_image(images / "grey.png", (40, 30), mode="L"),
        "cmyk.jpg": make_image(images / "cmyk.jpg", (40, 30), mode="CMYK"),
        "deep.png": make_image(images / "deep.png", (40, 30), mode="I;16"),
        "alpha.png": make_image(images / "alpha.png", (40, 30), mode="RGBA"),
        "palette.png": make_image(images / "palette.png", (40, 30), mode="P"),
        "bitmap.bmp": make_image(images / "bitmap.bmp", (40, 30)),
        "web.webp": make_image(images / "web.webp", (40, 30)),
        "rotated.jpg": make_image(images / "rotated.jpg", (40, 30), exif_orientation=8),
        "été feu ①.jpg": make_image(images / "dossier été" / "été feu ①.jpg", (40, 30)),
        "a/same.jpg": make_image(images / "a" / "same.jpg", (40, 30)),
        "b/same.jpg": make_image(images / "b" / "same.jpg", (40, 30)),
    }
    bad = {}
    bad["truncated.jpg"] = images / "truncated.jpg"
    full = make_image(tmp_path / "full.jpg", (64, 64)).read_bytes()
    bad["truncated.jpg"].write_bytes(full[: len(full) // 2])
    bad["corrupt.png"] = images / "corrupt.png"
    png = make_image(tmp_path / "full.png", (64, 64)).read_bytes()
    bad["corrupt.png"].write_bytes(png[:60] + bytes(200) + png[260:])
    bad["text.jpg"] = images / "text.jpg"
    bad["text.jpg"].write_text("this is not a picture")
    bad["empty.png"] = images / "empty.png"
    bad["empty.png"].write_bytes(b"")
    bad["bomb.png"] = png_claiming_size(images / "bomb.png", 30_000, 30_000)
    (images / "notes.txt").write_text("ignored: not an image extension")

    (root / "classes.txt").write_text("fire\nsmoke\n")
    (labels / "plain.txt").write_text(
        "0 0.5 0.5 0.5 0.5\n"  # fine: (10, 7.5, 30, 22.5)
        "0 0.5 0.5\n"  # malformed
        "7 0.5 0.5 0.2 0.2\n"  # class id out of range
    )
    (labels / "grey.txt").write_text(
        "1 0.0 0.5 0.5 0.5\n"  # half outside on the left: clipped to (0, 7.5, 10, 22.5)
        "1 2.0 2.0 0.1 0.1\n"  # fully outside: dropped
        "0 0.5 0.5 0.0 0.3\n"  # zero width: dropped
    )
    (labels / "rotated.txt").write_text("1 0.5 0.25 1.0 0.5\n")  # shown 30x40: (0, 0, 30, 20)
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # its image does not exist
    (labels / "truncated.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # its image is unusable
    (labels / "a").mkdir()
    (labels / "a" / "same.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "b").mkdir()
    (labels / "b" / "same.txt").write_text("")
    (labels / "same.txt").write_text("1 0.5 0.5 0.2 0.2\n")  # which same.jpg? ambiguous
    return root, good, bad


def test_broken_corpus_gives_one_line_per_bad_file(workspace, broken_corpus):
    root, good, bad = broken_corpus
    report = ingest(
        workspace,
        root / "images",
        options(yolo_dir=root / "labels", classes_file=root / "classes.txt"),
    )

    # Nothing good is lost: every good image is in, with its size as shown.
    assert report.found == len(good) + len(bad)
    assert (report.new_images, report.skipped) == (len(good), len(bad))
    assert report.summary().startswith(f"ingested {len(good)}, skipped {len(bad)}")
    with workspace.session() as session:
        sizes = {
            Path(p).name: (w, h)
            for p, w, h in session.execute(select(Image.path, Image.width, Image.height))
        }
    assert set(sizes) == {Path(name).name for name in good}
    assert sizes["rotated.jpg"] == (30, 40)
    assert all(size == (40, 30) for name, size in sizes.items() if name != "rotated.jpg")

    # One line per bad image file, naming it and saying why.
    reasons = {
        "truncated.jpg": "cannot decode",
        "corrupt.png": "cannot decode",
        "text.jpg": "not a readable image",
        "empty.png": "empty file",
        "bomb.png": "decompression bomb",
    }
    for name, path in bad.items():
        lines = [line for line in report.problems if line.startswith(f"{path}:")]
        assert len(lines) == 1, (name, report.problems)
        assert reasons[name] in lines[0]

    # Label problems: one line each, naming the label file (and line).
    labels = root / "labels"
    expected = [
        (f"{labels / 'plain.txt'}:2", "expected `class cx cy w h`"),
        (f"{labels / 'plain.txt'}:", "class id 7 is out of range"),
        (f"{labels / 'grey.txt'}:", "clipped to (0.0, 7.5, 10.0, 22.5)"),
        (f"{labels / 'grey.txt'}:", "outside the 40x30 image; dropped"),
        (f"{labels / 'grey.txt'}:", "zero or negative area; dropped"),
        (f"{labels / 'ghost.txt'}:", "no image with this name"),
        (f"{labels / 'truncated.txt'}:", "its image was skipped as unusable"),
        (f"{labels / 'same.txt'}:", "ambiguous: 2 images"),
    ]
    for prefix, reason in expected:
        hits = [line for line in report.problems if line.startswith(prefix) and reason in line]
        assert len(hits) == 1, (prefix, reason, report.problems)
    assert len(report.problems) == len(bad) + len(expected)

    # Good labels went in: clipped and rotated boxes in displayed pixels; same.jpg kept apart.
    boxes = stored_boxes(workspace)
    assert boxes["plain.jpg"] == [("fire", 10.0, 7.5, 30.0, 22.5, "given", "accepted")]
    assert boxes["grey.png"] == [("smoke", 0.0, 7.5, 10.0, 22.5, "given", "accepted")]
    assert boxes["rotated.jpg"] == [("smoke", 0.0, 0.0, 30.0, 20.0, "given", "accepted")]
    assert boxes["same.jpg"] == [("fire", 16.0, 12.0, 24.0, 18.0, "given", "accepted")]
    tags = stored_tags(workspace)
    # plain.txt had an unreadable line, which could have been smoke: no absent tag claimed.
    assert tags["plain.jpg"] == {"fire": True}
    # grey.txt dropped a fire box: fire is unknown, smoke present.
    assert tags["grey.png"] == {"smoke": True}
    assert tags["rotated.jpg"] == {"fire": False, "smoke": True}

    # The same lines are in the run's log file, with the summary last.
    logged = report.log_path.read_text().splitlines()
    assert report.log_path.parent == workspace.runs_dir
    assert report.log_path.name.startswith("ingest-")
    assert logged[:-1] == report.problems and logged[-1] == report.summary()


def test_nothing_usable(workspace, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    report = ingest(workspace, folder, options())
    assert not report.usable and report.skipped == 1


@pytest.mark.parametrize(
    "content,reason", [(b"\xff\xfe\x00fire\x00", "cannot be read"), (b"\n \n", "names no class")]
)
def test_unusable_classes_file_is_named_before_anything_is_ingested(
    workspace, tiny_dataset, tmp_path, content, reason
):
    classes = tmp_path / "classes.txt"
    classes.write_bytes(content)
    with pytest.raises(WorkspaceError, match=rf"classes file .*classes\.txt {reason}"):
        ingest(
            workspace,
            tiny_dataset.images,
            options(yolo_dir=tiny_dataset.labels, classes_file=classes),
        )
    with workspace.session() as session:
        assert session.scalar(select(func.count(Image.id))) == 0
