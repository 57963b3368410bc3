import json
import math

import cv2
import numpy as np
import pytest

from app.cli import main
from db.models import Box, Image, LabelClass, Mask, ProposalImage, ProposalRun, Tag
from db.workspace import Workspace

WIDTH, HEIGHT = 40, 30


def _rect_png(path, rows: slice, cols: slice, value: int = 255):
    plane = np.zeros((HEIGHT, WIDTH), np.uint8)
    plane[rows, cols] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), plane)
    return path


def _populate(workspace: Workspace, *, pseudo_mask_as_row: bool = True) -> dict[str, int]:
    """Four images with hand-made truth and proposals (numbers worked out in the tests).

    a: reference fire box and mask; the run's fire box is exact, its mask shifted 5 px right.
    b: tagged fire-free and smoke-free; the run puts a fire box there, scored above a's.
    c: tagged fire-free, a reference smoke box; the run finds the smoke box exactly.
    d: tagged fire, no reference box; the run's fire box there has nothing to match.
    """
    root = workspace.root
    with workspace.transaction() as session:
        fire, smoke = (session.query(LabelClass).filter_by(name=n).one() for n in ("fire", "smoke"))
        images = {}
        for name in "abcd":
            image = Image(
                path=f"/data/{name}.jpg",
                content_hash=name * 64,
                width=WIDTH,
                height=HEIGHT,
                split="val",
            )
            session.add(image)
            images[name] = image
        session.add(Image(path="/data/t.jpg", content_hash="t" * 64, width=8, height=8))
        run = ProposalRun(split="val", state="done", params={"threshold": 0.5})
        session.add(run)
        session.flush()
        for image in images.values():
            session.add(
                ProposalImage(run_id=run.id, image_id=image.id, probs={}, mask_dir="masks/run")
            )

        a, b, c, d = (images[n] for n in "abcd")
        session.add(
            Box(
                image_id=a.id,
                class_id=fire.id,
                x1=5,
                y1=5,
                x2=25,
                y2=25,
                origin="reference",
                status="accepted",
            )
        )
        session.add(
            Box(
                image_id=c.id,
                class_id=smoke.id,
                x1=2,
                y1=2,
                x2=30,
                y2=20,
                origin="reference",
                status="accepted",
            )
        )
        for image, klass, present in (
            (b, fire, False),
            (b, smoke, False),
            (c, fire, False),
            (c, smoke, True),
            (d, fire, True),
        ):
            session.add(Tag(image_id=image.id, class_id=klass.id, present=present, origin="given"))
        ref = _rect_png(root / "ref" / "a.png", slice(5, 25), slice(5, 25))
        session.add(Mask(image_id=a.id, class_id=fire.id, path=str(ref), origin="reference"))
        pseudo = [
            (a, fire, (5, 5, 25, 25), 0.9),
            (b, fire, (1, 1, 9, 9), 0.95),
            (c, smoke, (2, 2, 30, 20), 0.7),
            (d, fire, (0, 0, 20, 20), 0.99),
        ]
        for image, klass, (x1, y1, x2, y2), score in pseudo:
            session.add(
                Box(
                    image_id=image.id,
                    class_id=klass.id,
                    x1=x1,
                    y1=y1,
                    x2=x2,
                    y2=y2,
                    origin="pseudo",
                    score=score,
                    proposal_run_id=run.id,
                )
            )
        # probability 200/255 = 0.78 over rows 5..24, cols 10..29
        name = f"{a.id}_fire.png"
        mask_path = _rect_png(root / "masks" / "run" / name, slice(5, 25), slice(10, 30), 200)
        if pseudo_mask_as_row:
            mask_path = mask_path.rename(root / "masks" / "elsewhere.png")
            session.add(
                Mask(
                    image_id=a.id,
                    class_id=fire.id,
                    path="masks/elsewhere.png",
                    origin="pseudo",
                    proposal_run_id=run.id,
                )
            )
        # A faint smoke prediction on a must not count: a has no smoke reference mask.
        _rect_png(root / "masks" / "run" / f"{a.id}_smoke.png", slice(0, 30), slice(0, 40), 255)
        return {"run": run.id, **{n: i.id for n, i in images.items()}}


@pytest.mark.parametrize("pseudo_mask_as_row", [True, False])
def test_evaluate_scores_hand_made_run(workspace, tmp_path, capsys, pseudo_mask_as_row):
    _populate(workspace, pseudo_mask_as_row=pseudo_mask_as_row)
    out = tmp_path / "scores.json"
    code = main(
        ["--workspace", str(workspace.root), "evaluate", "--split", "val", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())

    # Masks on a: fire 300 shared of 500 -> 0.6; background 700 shared of 900.
    assert report["masks"]["images"] == 1
    assert report["masks"]["iou"]["fire"] == pytest.approx(0.6)
    assert report["masks"]["iou"]["background"] == pytest.approx(7 / 9)
    assert report["masks"]["iou"]["smoke"] is None
    assert report["masks"]["mIoU"] == pytest.approx((0.6 + 7 / 9) / 2)

    # Boxes. fire: scored on a (truth), b and c (known fire-free), not d. b's false positive
    # outranks a's hit: AP50 = 0.5, the same at every IoU since a's box is exact.
    fire = report["boxes"]["per_class"]["fire"]
    assert fire["images"] == 3 and fire["gt_boxes"] == 1
    assert fire["AP50"] == pytest.approx(0.5) and fire["AP"] == pytest.approx(0.5)
    smoke = report["boxes"]["per_class"]["smoke"]
    assert smoke["images"] == 2 and smoke["AP50"] == pytest.approx(1.0)
    assert report["boxes"]["AP50"] == pytest.approx(0.75)
    curve = fire["pr_curve"]
    assert len(curve["recall"]) == len(curve["precision"]) == len(curve["score"]) == 101
    assert curve["precision"][-1] == pytest.approx(0.5) and curve["score"][-1] == 0.9
    assert smoke["pr_curve"]["precision"] == [1.0] * 101

    # False alarms: fire-free b and c, b got a fire box; smoke-free b got none; b is the only
    # image known to hold no class, and it got a box.
    alarms = report["false_alarms"]
    assert alarms["fire"] == {"rate": 0.5, "false_alarms": 1, "images": 2}
    assert alarms["smoke"] == {"rate": 0.0, "false_alarms": 0, "images": 1}
    assert alarms["any"]["rate"] == 1.0

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("evaluated proposal run")
    assert "mIoU 68.9" in lines[-1] and "AP50 75.0" in lines[-1]
    assert any(line.startswith("fire") and "60.0" in line for line in lines)


def test_min_score_spares_low_boxes_from_false_alarms(workspace, tmp_path):
    _populate(workspace)
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "--workspace",
                str(workspace.root),
                "evaluate",
                "--min-score",
                "0.96",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["false_alarms"]["fire"]["rate"] == 0.0


def test_without_a_run_the_error_names_the_fix(workspace, capsys):
    assert main(["--workspace", str(workspace.root), "evaluate"]) == 1
    assert "pyrolabel propose" in capsys.readouterr().err


def test_split_without_images_in_the_run_is_an_error(workspace, capsys):
    _populate(workspace)
    assert main(["--workspace", str(workspace.root), "evaluate", "--split", "train"]) == 1
    assert "no proposal run over split train" in capsys.readouterr().err
    with workspace.transaction() as session:
        session.query(ProposalRun).one().split = None  # a run over every split
    assert main(["--workspace", str(workspace.root), "evaluate", "--split", "train"]) == 1
    err = capsys.readouterr().err
    assert "holds no image of split train" in err and "propose --split train" in err


def test_nan_scores_are_written_as_null(workspace, tmp_path):
    ids = _populate(workspace)
    with workspace.transaction() as session:
        session.query(Box).filter_by(origin="reference").delete()
        session.query(Mask).filter_by(origin="reference").delete()
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "--workspace",
                str(workspace.root),
                "evaluate",
                "--run",
                str(ids["run"]),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["masks"]["mIoU"] is None and report["boxes"]["AP50"] is None
    assert not math.isnan(report["false_alarms"]["fire"]["rate"])
