import cv2
import pytest
from sqlalchemy import func, select, update

from app.cli import main
from app.commands import train as train_command
from db.models import Box, Image, LabelClass, ModelVersion, Point, ProposalImage, ProposalRun, Tag

TINY_TRAIN = [
    "train",
    "classifier",
    "--arch",
    "resnet10",
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--image-size",
    "32",
    "--batch-size",
    "3",
    "--weights",
    "none",
    "--workers",
    "0",
]
TINY_PROPOSE = ["propose", "--image-size", "32", "--scales", "1.0", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tagged_workspace(workspace, tiny_dataset):
    root = str(workspace.root)
    code = main(
        [
            "--workspace",
            root,
            "ingest",
            str(tiny_dataset.images),
            "--tags",
            str(tiny_dataset.tags_csv),
        ]
    )
    assert code == 0
    return workspace


def _cli(workspace, *args) -> int:
    return main(["--workspace", str(workspace.root), *args])


def test_train_then_propose_end_to_end(tagged_workspace, capsys):
    ws = tagged_workspace
    assert _cli(ws, *TINY_TRAIN) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("epoch 2/2 [recursion] cls=") and "cam=" in line for line in out)
    assert out[-1].startswith("trained classifier 1 (resnet10) on 6 images, 2 epochs")
    with ws.session() as session:
        version = session.scalars(select(ModelVersion)).one()
        assert version.kind == "classifier" and version.classes == ["fire", "smoke"]
        assert version.config["image_size"] == 32 and "final_losses" in version.metrics
    assert ws.absolute(version.path).is_file()

    assert _cli(ws, *TINY_PROPOSE, "--batch-size", "4") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("proposal run 1 (model 1, split all): 6 images") and "done" in summary
    with ws.session() as session:
        run = session.scalars(select(ProposalRun)).one()
        assert run.state == "done" and run.image_count == 6 and run.params["threshold"] == 0.5
        rows = session.scalars(select(ProposalImage)).all()
        assert len(rows) == 6 and all(set(r.probs) == {"fire", "smoke"} for r in rows)
        model_tags = session.scalar(select(func.count(Tag.id)).where(Tag.origin == "model"))
        assert model_tags == 12
        image = session.scalars(select(Image).order_by(Image.id)).first()
        boxes = session.scalars(select(Box).where(Box.origin == "pseudo")).all()
        assert all(b.status == "pending" and b.proposal_run_id == run.id for b in boxes)
        assert all(0 <= b.x1 < b.x2 <= 64 and 0 <= b.y1 < b.y2 <= 48 for b in boxes)
    mask = cv2.imread(
        str(ws.root / rows[0].mask_dir / f"{image.id}_fire.png"), cv2.IMREAD_UNCHANGED
    )
    assert mask.shape == (image.height, image.width)
    assert (ws.root / f"cams/run-{run.id}/{image.id}_smoke.png").is_file()


def test_propose_resumes_an_interrupted_run(tagged_workspace, capsys):
    ws = tagged_workspace
    assert _cli(ws, *TINY_TRAIN) == 0
    assert _cli(ws, *TINY_PROPOSE) == 0
    # Pretend the run stopped after four images.
    with ws.transaction() as session:
        last_two = session.scalars(
            select(ProposalImage.id).order_by(ProposalImage.id.desc()).limit(2)
        ).all()
        session.query(ProposalImage).filter(ProposalImage.id.in_(last_two)).delete()
        session.execute(update(ProposalRun).values(state="running"))
    capsys.readouterr()
    assert _cli(ws, *TINY_PROPOSE) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "resuming proposal run 1: 2 images left"
    assert ": 2 images" in out[-1] and out[-1].endswith("done")
    with ws.session() as session:
        assert session.scalar(select(func.count(ProposalImage.id))) == 6
        assert session.scalar(select(func.count(ProposalRun.id))) == 1
        # Re-proposed images keep one model tag per class.
        assert session.scalar(select(func.count(Tag.id)).where(Tag.origin == "model")) == 12


def test_interrupted_training_resumes(tagged_workspace, capsys, monkeypatch):
    ws = tagged_workspace
    monkeypatch.setattr(train_command._EpochPrinter, "should_stop", lambda self: True)
    assert _cli(ws, *TINY_TRAIN) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert _cli(ws, *TINY_TRAIN, "--resume") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("trained classifier 1")
    # Nothing is left to resume once the run is registered.
    assert _cli(ws, *TINY_TRAIN, "--resume") == 1
    assert "no interrupted classifier run" in capsys.readouterr().err


def test_points_count_but_never_override_an_absent_tag(tagged_workspace):
    from db.proposals import training_images

    ws = tagged_workspace
    with ws.transaction() as session:
        fire = session.scalars(select(LabelClass).where(LabelClass.name == "fire")).one()
        by_name = {i.path.rsplit("/", 1)[-1]: i for i in session.scalars(select(Image))}
        session.add(
            Point(image_id=by_name["none_a.jpg"].id, class_id=fire.id, x=5, y=5, reviewer="r")
        )
        session.add(
            Point(image_id=by_name["fire_a.jpg"].id, class_id=fire.id, x=9, y=9, reviewer="r")
        )
    with ws.session() as session:
        images = {i.path.rsplit("/", 1)[-1]: i for i in training_images(session, splits=["train"])}
    assert (
        images["none_a.jpg"].tags == {"fire": False, "smoke": False}
        and not images["none_a.jpg"].points
    )
    assert images["fire_a.jpg"].points == [("fire", 9.0, 9.0)]


def test_errors_name_the_fix(workspace, capsys):
    assert _cli(workspace, *TINY_TRAIN) == 1
    assert "no tagged image" in capsys.readouterr().err
    assert _cli(workspace, "propose") == 1
    assert "pyrolabel train classifier" in capsys.readouterr().err


def test_train_classifier_distils_from_a_registered_teacher(tagged_workspace, capsys):
    ws = tagged_workspace
    assert _cli(ws, *TINY_TRAIN) == 0
    capsys.readouterr()
    assert _cli(ws, *TINY_TRAIN, "--teacher", "1") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(
        line.startswith("epoch 2/2") and "kd_logits=" in line and "cwd_cam=" in line for line in out
    )
    assert out[-1].startswith("trained classifier 2 (resnet10)")
    with ws.session() as session:
        student = session.get(ModelVersion, 2)
        teacher = session.get(ModelVersion, 1)
        assert student.config["teacher"] == str(ws.absolute(teacher.path))

    assert _cli(ws, *TINY_TRAIN, "--teacher", "7") == 1
    assert "--teacher 7: no such classifier checkpoint" in capsys.readouterr().err
