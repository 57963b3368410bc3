"""Export, and the round trip: ingest, export, ingest into a fresh workspace, same annotations.

The first workspace runs on every backend; the second is always a new SQLite file, so on
PostgreSQL the round trip also crosses backends.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from core.formats import BoxLabel, coco_document, read_mask, voc_xml
from db.export import export_annotations, export_names
from db.ingest import IngestOptions, ingest
from db.models import Box, BoxOrigin, BoxStatus, Image, LabelClass, Mask, Tag, TagOrigin
from db.proposals import ProposedImage, open_proposal_run, write_proposals
from db.review import accept_box, add_point
from db.workspace import Workspace

CLASSES = ["fire", "smoke"]


def options(**kwargs) -> IngestOptions:
    return IngestOptions(progress=False, workers=2, **kwargs)


def annotations(workspace: Workspace) -> dict[str, dict]:
    """{content hash: {"boxes": sorted [(class, x1, y1, x2, y2, origin)], "tags": {...},
    "masks": {class: mask bytes}}}, independent of ids and paths."""
    with workspace.session() as session:
        names = dict(session.execute(select(LabelClass.id, LabelClass.name)).all())
        hashes = dict(session.execute(select(Image.id, Image.content_hash)).all())
        result = {h: {"boxes": [], "tags": {}, "masks": {}} for h in hashes.values()}
        for box in session.scalars(select(Box)):
            corners = (box.x1, box.y1, box.x2, box.y2)
            result[hashes[box.image_id]]["boxes"].append(
                (names[box.class_id], *corners, box.origin, box.status, box.score)
            )
        for tag in session.scalars(select(Tag).where(Tag.origin == TagOrigin.GIVEN)):
            result[hashes[tag.image_id]]["tags"][names[tag.class_id]] = tag.present
        for mask in session.scalars(select(Mask)):
            pixels = read_mask(workspace.absolute(mask.path))
            result[hashes[mask.image_id]]["masks"][names[mask.class_id]] = pixels.tobytes()
    for entry in result.values():
        entry["boxes"].sort(key=lambda b: (b[0], round(b[1], 1), round(b[2], 1)))
    return result


def assert_same_annotations(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for content_hash, want in expected.items():
        have = got[content_hash]
        assert have["tags"] == want["tags"], content_hash
        assert have["masks"] == want["masks"], content_hash
        assert len(have["boxes"]) == len(want["boxes"]), content_hash
        for a, b in zip(have["boxes"], want["boxes"], strict=True):
            assert (a[0], a[5], a[6]) == (b[0], b[5], b[6])
            np.testing.assert_allclose(a[1:5], b[1:5], atol=atol)
            assert (a[7] is None) == (b[7] is None)


def fresh_workspace(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "again")
    ws.init(CLASSES)
    return ws


def test_yolo_round_trip(workspace, tiny_dataset, tmp_path):
    ingest(
        workspace,
        tiny_dataset.images,
        options(yolo_dir=tiny_dataset.labels, classes_file=tiny_dataset.classes),
    )
    report = export_annotations(workspace, "yolo", tmp_path / "out")
    assert (report.images, report.negatives, report.boxes) == (6, 2, 6)
    out = tmp_path / "out"
    assert (out / "classes.txt").read_text() == "fire\nsmoke\n"
    assert (out / "labels" / "none_a.txt").read_text() == ""  # a negative
    assert len((out / "images.txt").read_text().splitlines()) == 6

    again = fresh_workspace(tmp_path)
    second = ingest(
        again,
        tiny_dataset.images,
        options(yolo_dir=out / "labels", classes_file=out / "classes.txt"),
    )
    assert second.problems == []
    # Six decimals of a normalised coordinate on a 64 px image: 3e-5 px.
    assert_same_annotations(annotations(again), annotations(workspace), atol=1e-4)
    again.dispose()


def write_coco_source(tiny_dataset, path: Path) -> None:
    images, boxes = [], []
    for index, (name, labelled) in enumerate(sorted(tiny_dataset.boxes.items()), start=1):
        images.append((index, name, 64, 48))
        # Fractional corners, as annotation tools write them.
        boxes += [
            (index, BoxLabel(c, x1 + 0.25, y1 + 0.5, x2 - 0.125, y2))
            for c, x1, y1, x2, y2 in labelled
        ]
    path.write_text(json.dumps(coco_document(images, boxes, CLASSES)))


def test_coco_round_trip(workspace, tiny_dataset, tmp_path):
    source = tmp_path / "source.json"
    write_coco_source(tiny_dataset, source)
    first = ingest(workspace, tiny_dataset.images, options(coco_json=source))
    assert (first.boxes, first.tags, first.problems) == (6, 12, [])
    assert _tags_by_name(workspace) == tiny_dataset.tags

    report = export_annotations(workspace, "coco", tmp_path / "out")
    document = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert len(document["images"]) == 6 and len(document["annotations"]) == 6
    assert [c["name"] for c in document["categories"]] == CLASSES
    assert Path(document["info"]["images_root"]) == tiny_dataset.images.resolve()
    assert report.boxes == 6

    again = fresh_workspace(tmp_path)
    second = ingest(
        again, tiny_dataset.images, options(coco_json=tmp_path / "out" / "annotations.json")
    )
    assert second.problems == []
    assert_same_annotations(annotations(again), annotations(workspace), atol=1e-3)
    again.dispose()


def _tags_by_name(workspace) -> dict[str, dict[str, bool]]:
    with workspace.session() as session:
        rows = session.execute(
            select(Image.path, LabelClass.name, Tag.present)
            .join(Image, Tag.image_id == Image.id)
            .join(LabelClass, Tag.class_id == LabelClass.id)
        )
        result: dict[str, dict[str, bool]] = {}
        for path, name, present in rows:
            result.setdefault(Path(path).name, {})[name] = present
    return result


def test_voc_round_trip_with_same_names_in_two_folders(workspace, tmp_path, make_image):
    images, xml_dir = tmp_path / "images", tmp_path / "voc"
    sources = {
        "cam1/frame": [BoxLabel("fire", 3, 4, 20.5, 30)],
        "cam2/frame": [BoxLabel("smoke", 10, 0, 40, 12), BoxLabel("fire", 1, 1, 5, 5)],
        "cam2/empty": [],
    }
    for key, boxes in sources.items():
        make_image(images / f"{key}.jpg", (48, 36))
        target = xml_dir / f"{key}.xml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(voc_xml(Path(key).name + ".jpg", 48, 36, boxes))
    first = ingest(workspace, images, options(voc_dir=xml_dir))
    assert (first.boxes, first.problems) == (3, [])

    report = export_annotations(workspace, "voc", tmp_path / "out")
    assert (report.images, report.negatives, report.boxes) == (3, 1, 3)
    # Two images share the stem "frame": names keep their folders.
    written = sorted(
        p.relative_to(tmp_path / "out" / "Annotations").as_posix()
        for p in (tmp_path / "out").rglob("*.xml")
    )
    assert written == ["cam1/frame.xml", "cam2/empty.xml", "cam2/frame.xml"]

    again = fresh_workspace(tmp_path)
    second = ingest(again, images, options(voc_dir=tmp_path / "out" / "Annotations"))
    assert second.problems == []
    assert_same_annotations(annotations(again), annotations(workspace), atol=0.005)
    again.dispose()


def test_masks_round_trip(workspace, tmp_path, make_image):
    images, masks = tmp_path / "frames", tmp_path / "masks"
    rng = np.random.default_rng(0)
    for index in range(4):
        make_image(images / f"f{index}.jpg", (20, 14))
        mask = (rng.random((14, 20)) > 0.7) if index else np.zeros((14, 20), dtype=bool)
        masks.mkdir(exist_ok=True)
        PILImage.fromarray((mask * 255).astype(np.uint8)).save(masks / f"f{index}.png")
    first = ingest(workspace, images, options(masks_dir=masks))
    assert (first.masks, first.tags) == (4, 4)

    report = export_annotations(workspace, "masks", tmp_path / "out")
    assert (report.images, report.masks) == (4, 4)
    assert sorted(p.name for p in (tmp_path / "out" / "fire").iterdir()) == [
        "f0.png",
        "f1.png",
        "f2.png",
        "f3.png",
    ]

    again = fresh_workspace(tmp_path)
    ingest(again, images, options(masks_dir=tmp_path / "out" / "fire", mask_class="fire"))
    assert_same_annotations(annotations(again), annotations(workspace), atol=0)
    again.dispose()


@pytest.fixture
def reviewed_workspace(workspace, tiny_dataset):
    """tiny_dataset's boxes as given, plus one box of each other origin and status on none_a."""
    ingest(
        workspace,
        tiny_dataset.images,
        options(yolo_dir=tiny_dataset.labels, classes_file=tiny_dataset.classes),
    )
    with workspace.transaction() as session:
        image_id = session.scalar(select(Image.id).where(Image.path.like("%none_b.jpg")))
        fire = session.scalar(select(LabelClass.id).where(LabelClass.name == "fire"))

        def add(origin, status, x1, score=None):
            session.add(
                Box(
                    image_id=image_id,
                    class_id=fire,
                    x1=x1,
                    y1=1,
                    x2=x1 + 5,
                    y2=6,
                    origin=origin,
                    status=status,
                    score=score,
                )
            )

        add(BoxOrigin.PSEUDO, BoxStatus.ACCEPTED, 1, score=0.9)
        add(BoxOrigin.PSEUDO, BoxStatus.PENDING, 10, score=0.4)
        add(BoxOrigin.PSEUDO, BoxStatus.REJECTED, 20, score=0.8)
        add(BoxOrigin.PSEUDO, BoxStatus.EDITED, 30, score=0.7)
        add(BoxOrigin.HUMAN, BoxStatus.ACCEPTED, 40)
        add(BoxOrigin.REFERENCE, BoxStatus.ACCEPTED, 50)
    return workspace


@pytest.mark.parametrize(
    "include_pending,include_reference,expected_x1",
    [(False, False, [1, 40]), (True, False, [1, 10, 40]), (False, True, [1, 40, 50])],
)
def test_export_holds_accepted_and_human_boxes(
    reviewed_workspace, tmp_path, include_pending, include_reference, expected_x1
):
    export_annotations(
        reviewed_workspace,
        "coco",
        tmp_path / "out",
        include_pending=include_pending,
        include_reference=include_reference,
    )
    document = json.loads((tmp_path / "out" / "annotations.json").read_text())
    file_ids = {image["file_name"]: image["id"] for image in document["images"]}
    on_image = [a for a in document["annotations"] if a["image_id"] == file_ids["none_b.jpg"]]
    assert sorted(a["bbox"][0] for a in on_image) == expected_x1
    # Only pending proposals carry their score.
    assert [a["bbox"][0] for a in on_image if "score" in a] == ([10] if include_pending else [])
    assert len(document["annotations"]) == 6 + len(expected_x1)


def test_point_box_is_exported_once_accepted(reviewed_workspace, tmp_path):
    """A box grown from a reviewer's click is a proposal: pending, it needs include_pending."""
    with reviewed_workspace.transaction() as session:
        image_id = session.scalar(select(Image.id).where(Image.path.like("%none_b.jpg")))
        blob = np.zeros((48, 64), np.float32)  # tiny_dataset images are 64x48
        blob[16:32, 24:40] = 1.0
        _, box = add_point(
            session,
            image_id=image_id,
            reviewer="ana",
            class_name="fire",
            x=32.0,
            y=24.0,
            fg_prob=blob,
        )
        box_id, version, grown = box.id, box.version, box.x1

    def exported_x1(include_pending: bool) -> list[float]:
        out = tmp_path / f"out-{include_pending}"
        export_annotations(reviewed_workspace, "coco", out, include_pending=include_pending)
        document = json.loads((out / "annotations.json").read_text())
        file_ids = {image["file_name"]: image["id"] for image in document["images"]}
        image = file_ids["none_b.jpg"]
        return sorted(a["bbox"][0] for a in document["annotations"] if a["image_id"] == image)

    assert exported_x1(include_pending=False) == [1, 40]
    assert exported_x1(include_pending=True) == sorted([1, 10, 40, grown])
    with reviewed_workspace.transaction() as session:
        accept_box(session, box_id=box_id, version=version, reviewer="ana")
    assert exported_x1(include_pending=False) == sorted([1, 40, grown])


def test_tagged_image_without_box_is_left_out(workspace, tiny_dataset, tmp_path):
    ingest(workspace, tiny_dataset.images, options(tags_csv=tiny_dataset.tags_csv))
    report = export_annotations(workspace, "yolo", tmp_path / "out")
    # Only the two all-absent images are usable; four tagged images have no box to export.
    assert (report.images, report.negatives, report.left_out) == (2, 2, 4)
    assert "left out 4" in report.summary()


def test_export_split(workspace, tiny_dataset, tmp_path, make_image):
    opts = options(yolo_dir=tiny_dataset.labels, classes_file=tiny_dataset.classes)
    ingest(workspace, tiny_dataset.images, opts)
    extra = tmp_path / "val"
    make_image(extra / "v.jpg", (64, 48))
    (tmp_path / "val_labels").mkdir()
    (tmp_path / "val_labels" / "v.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    opts.yolo_dir, opts.split = tmp_path / "val_labels", "val"
    ingest(workspace, extra, opts)
    report = export_annotations(workspace, "yolo", tmp_path / "out", split="val")
    assert (report.images, report.boxes) == (1, 1)
    assert [p.name for p in (tmp_path / "out" / "labels").iterdir()] == ["v.txt"]


def test_export_names():
    unique = [Path("/d/a/x.jpg"), Path("/d/b/y.jpg")]
    assert export_names(unique) == {unique[0]: "x", unique[1]: "y"}
    clash = [Path("/d/a/x.jpg"), Path("/d/b/x.png"), Path("/d/b/c/z.jpg")]
    assert export_names(clash) == {clash[0]: "a/x", clash[1]: "b/x", clash[2]: "b/c/z"}


def test_mask_export_cuts_pseudo_masks_to_reviewed_boxes(workspace, tiny_dataset, tmp_path):
    """The RS+EPM mask of an accepted box's class, inside that box; negatives as empty masks."""
    ingest(workspace, tiny_dataset.images, options(tags_csv=tiny_dataset.tags_csv))
    mask_dir = workspace.masks_dir / "run-1"
    mask_dir.mkdir(parents=True)
    with workspace.transaction() as session:
        ids = {Path(p).name: i for i, p in session.execute(select(Image.id, Image.path))}
        run_id, _ = open_proposal_run(session, model_version_id=None, split=None, params={})
        # Probability 0.8 over the left half, 0.3 (under the threshold) over the right half.
        probability = np.full((48, 64), 0.3 * 255, np.uint8)
        probability[:, :32] = 0.8 * 255
        for name in ("fire_a.jpg", "fire_b.jpg"):
            PILImage.fromarray(probability).save(mask_dir / f"{ids[name]}_fire.png")
        write_proposals(
            session,
            run_id=run_id,
            items=[
                ProposedImage(
                    ids["fire_a.jpg"],
                    {"fire": 0.9},
                    [("fire", 8, 8, 40, 24, 0.9)],
                    None,
                    workspace.relative(mask_dir),
                ),
                ProposedImage(
                    ids["fire_b.jpg"],
                    {"fire": 0.9},
                    [("fire", 0, 0, 16, 16, 0.6)],
                    None,
                    workspace.relative(mask_dir),
                ),
            ],
        )
        accepted = session.scalar(select(Box).where(Box.image_id == ids["fire_a.jpg"]))
        accept_box(session, box_id=accepted.id, version=accepted.version, reviewer="ana")

    def exported(include_pending: bool) -> tuple[dict[str, np.ndarray], int]:
        out = tmp_path / f"masks-{include_pending}"
        report = export_annotations(workspace, "masks", out, include_pending=include_pending)
        return {
            f"{p.parent.name}/{p.stem}": read_mask(p) for p in sorted(out.rglob("*.png"))
        }, report.negatives

    masks, negatives = exported(include_pending=False)
    expected = np.zeros((48, 64), bool)
    expected[8:24, 8:32] = True  # the accepted box (8, 8, 40, 24) where probability >= 0.5
    np.testing.assert_array_equal(masks.pop("fire/fire_a"), expected)
    # The two fire-free images, as empty masks of every class; nothing else.
    assert negatives == 2
    assert sorted(masks) == ["fire/none_a", "fire/none_b", "smoke/none_a", "smoke/none_b"]
    assert not any(mask.any() for mask in masks.values())

    masks, _ = exported(include_pending=True)
    pending = np.zeros((48, 64), bool)
    pending[0:16, 0:16] = True
    np.testing.assert_array_equal(masks["fire/fire_b"], pending)
