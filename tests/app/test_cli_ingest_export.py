"""`pyrolabel ingest` and `pyrolabel export` through the command line."""

import json

from sqlalchemy import func, select

from app.cli import main
from db.models import Box, Image, Tag


def cli(workspace, *args) -> int:
    return main(["--workspace", str(workspace.root), *args])


def yolo_args(tiny_dataset):
    return ["--yolo", str(tiny_dataset.labels), "--classes", str(tiny_dataset.classes)]


def test_ingest_prints_problems_then_the_summary(workspace, tiny_dataset, capsys):
    (tiny_dataset.labels / "fire_a.txt").write_text("0 0.5 0.5 0.2\n0 0.5 0.5 0.25 0.25\n")
    (tiny_dataset.images / "broken.jpg").write_text("not a jpeg")
    code = cli(workspace, "ingest", str(tiny_dataset.images), *yolo_args(tiny_dataset))
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ingested 6, skipped 1 (0 already known); added ")
    assert "2 problems" in lines[-1] and "runs/ingest-" in lines[-1]
    assert lines[0].startswith(f"{tiny_dataset.images / 'broken.jpg'}: not a readable image")
    assert lines[1].startswith(f"{tiny_dataset.labels / 'fire_a.txt'}:1: expected")
    log_files = list(workspace.runs_dir.glob("ingest-*.log"))
    assert len(log_files) == 1
    assert log_files[0].read_text().splitlines() == lines


def test_ingest_twice_and_tags_only_options(workspace, tiny_dataset, capsys):
    args = ["ingest", str(tiny_dataset.images), *yolo_args(tiny_dataset), "--split", "val"]
    assert cli(workspace, *args, "--tags-only") == 0
    assert cli(workspace, *args, "--tags-only") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("ingested 0, skipped 0 (6 already known); added 0 tags, 0 boxes")
    with workspace.session() as session:
        assert set(session.scalars(select(Image.split))) == {"val"}
        assert set(session.scalars(select(Box.origin))) == {"reference"}
        assert session.scalar(select(func.count(Tag.id))) == 12


def test_nothing_usable_exits_non_zero(workspace, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert cli(workspace, "ingest", str(empty)) == 1
    captured = capsys.readouterr()
    assert "no usable image" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("ingested 0, skipped 0")


def test_bad_arguments_name_the_fix(workspace, tiny_dataset, tmp_path, capsys):
    assert (
        cli(workspace, "ingest", str(tiny_dataset.images), "--tags", str(tmp_path / "no.csv")) == 2
    )
    assert "is not a file" in capsys.readouterr().err
    code = cli(workspace, "ingest", str(tiny_dataset.images), "--yolo", str(tiny_dataset.labels))
    # tiny_dataset keeps classes.txt beside the labels folder, so --classes is found.
    assert code == 0
    code = cli(
        workspace,
        "ingest",
        str(tiny_dataset.images),
        "--masks",
        str(tiny_dataset.labels),
        "--mask-class",
        "dog",
    )
    assert code == 2
    assert "--mask-class 'dog' is not a workspace class" in capsys.readouterr().err


def test_export_each_format(workspace, tiny_dataset, tmp_path, capsys):
    assert cli(workspace, "ingest", str(tiny_dataset.images), *yolo_args(tiny_dataset)) == 0
    for fmt in ("coco", "yolo", "voc"):
        assert cli(workspace, "export", fmt, str(tmp_path / fmt)) == 0
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert summary == f"exported 6 images (2 negatives), 6 boxes as {fmt} to {tmp_path / fmt}"
    document = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(document["annotations"]) == 6
    assert len(list((tmp_path / "voc" / "Annotations").glob("*.xml"))) == 6
    # No masks were ingested and nothing was proposed: the negatives' empty masks only.
    assert cli(workspace, "export", "masks", str(tmp_path / "masks")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == f"exported 2 images (2 negatives), 4 masks as masks to {tmp_path / 'masks'}"
    # A split with nothing in it is an error that says what to try.
    assert cli(workspace, "export", "masks", str(tmp_path / "none"), "--split", "val") == 1
    assert "nothing to export" in capsys.readouterr().err
