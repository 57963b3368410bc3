"""Ingesting the real development sets gives exactly the counts in ../shared/data/README.md."""

import pytest
from sqlalchemy import select

from db.ingest import IngestOptions, ingest
from db.models import Image, Mask
from db.queries import image_tag_sets, tag_counts

pytestmark = pytest.mark.shared_data


def options(**kwargs) -> IngestOptions:
    return IngestOptions(progress=False, **kwargs)


def test_fire_boxes_yolo(workspace, shared_data):
    root = shared_data / "fire-boxes"
    report = ingest(
        workspace,
        root / "images",
        options(yolo_dir=root / "labels", classes_file=root / "classes.txt"),
    )
    assert report.problems == []
    assert (report.new_images, report.skipped, report.tags) == (760, 0, 1520)
    with workspace.session() as session:
        tags = image_tag_sets(session, origins=("given",))
    combos = {}
    for image_tags in tags.values():
        key = (image_tags["fire"], image_tags["smoke"])
        combos[key] = combos.get(key, 0) + 1
    # 217 fire only, 330 smoke only, 70 both, 143 with neither.
    assert combos == {(True, False): 217, (False, True): 330, (True, True): 70, (False, False): 143}

    again = ingest(
        workspace,
        root / "images",
        options(yolo_dir=root / "labels", classes_file=root / "classes.txt"),
    )
    assert (again.new_images, again.known_images, again.tags, again.boxes) == (0, 760, 0, 0)


def test_fire_masks(workspace, shared_data):
    root = shared_data / "fire-masks"
    report = ingest(workspace, root / "images", options(masks_dir=root / "masks"))
    assert report.problems == []
    assert (report.new_images, report.masks, report.tags) == (902, 902, 902)
    with workspace.session() as session:
        assert len(session.scalars(select(Mask.id)).all()) == 902
        sizes = set(session.execute(select(Image.width, Image.height)).all())
    assert sizes <= {(400, 256), (320, 240)}


def test_fire_tags(workspace, shared_data):
    root = shared_data / "fire-tags"
    report = ingest(workspace, root / "images", options(tags_csv=root / "tags.csv"))
    # 454 files, but two are byte for byte the same photo (both tagged 0): one image, reported.
    assert report.found == 454
    assert (report.new_images, report.duplicates, report.skipped) == (453, 1, 0)
    assert len(report.problems) == 1
    assert "xR7vfcy.jpg: same content as" in report.problems[0]
    assert "43c82e58f5cfdb1e3483be00a9720684.jpg" in report.problems[0]
    with workspace.session() as session:
        counts = tag_counts(session, origin="given")
    # 77 fire and 377 not, of which 376 distinct images.
    assert counts == {"fire": {True: 77, False: 376}}
