"""`pyrolabel retrain`, `pyrolabel worker` and `pyrolabel export-model` as a user runs them.

Training here is fake (retrain_fixtures' stages) except for the model export-model exports;
the real stages run end to end in test_jobs.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app import jobs
from app.cli import main
from db.models import Job, ModelVersion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from retrain_fixtures import make_curated_workspace, tracked_workers  # noqa: E402


@pytest.fixture
def workers(monkeypatch):
    yield from tracked_workers(monkeypatch)


@pytest.fixture
def cli(workspace, tmp_path, capsys):
    """Run `pyrolabel --workspace W ...` in this process; returns (exit code, stdout lines)
    and keeps the last stderr in `cli.stderr`."""
    make_curated_workspace(workspace, tmp_path / "images")

    def run(*argv: str) -> tuple[int, list[str]]:
        code = main(["--workspace", str(workspace.root), *argv])
        captured = capsys.readouterr()
        run.stderr = captured.err
        return code, captured.out.strip().splitlines()

    return run


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:FAKE_STAGES")


def test_retrain_runs_a_job_and_prints_a_summary(cli, workers, fake_stages):
    code, out = cli(
        "retrain",
        "--teacher",
        "tiny-teacher",
        "--student",
        "tiny-student",
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--eval-split",
        "val",
    )
    assert code == 0, out
    assert out[-1].startswith("job 1 succeeded in ")
    code, out = cli("retrain", "--list")
    assert code == 0 and out[-1] == "1 jobs"
    assert "job 1 succeeded" in out[0] and "[teacher,student,evaluation]" in out[0]


def test_detach_refuse_cancel_resume(cli, workers, monkeypatch, workspace):
    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:SLOW_STAGES")
    code, out = cli("retrain", "--detach", "--stages", "teacher,student")
    assert code == 0 and out[-1].startswith("job 1 started;")

    code, _ = cli("retrain", "--detach")
    assert code == 1
    assert "job 1 is already running" in cli.stderr or "job 1 is already queued" in cli.stderr

    code, out = cli("retrain", "--cancel", "1")
    assert code == 0 and out[-1].startswith("job 1: cancel requested")
    code, out = cli("retrain", "--follow", "1")
    assert code == 3
    assert out[-1].startswith("job 1 cancelled") and "pyrolabel retrain --resume 1" in out[-1]

    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:FAKE_STAGES")
    code, out = cli("retrain", "--resume", "1")
    assert code == 0 and out[-1].startswith("job 1 succeeded")
    with workspace.session() as session:
        assert session.get(Job, 1).options["stages"] == ["teacher", "student"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "techer"], "unknown stage 'techer'"),
        (["--teacher", "huge"], "--teacher 'huge' is not one of"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--distill-tau", "-1"], "--distill-tau must be positive"),
        (["--distill-logit-weight", "-2"], "--distill-logit-weight must be zero or more"),
    ],
)
def test_bad_options_name_the_fix(cli, argv, message):
    code, _ = cli("retrain", *argv)
    assert code == 2
    assert message in cli.stderr


def test_worker_command_runs_a_queued_job_in_the_foreground(cli, workspace, fake_stages):
    code, out = cli("retrain", "--no-worker")
    assert code == 0 and out[-1] == "job 1 queued; run it with `pyrolabel worker 1`"
    code, out = cli("worker", "1")
    assert code == 0 and out[-1].startswith("job 1 succeeded")
    assert "stage teacher" in (workspace.root / "runs" / "job-1.log").read_text()
    code, _ = cli("worker", "1")
    assert code == 2 and "not queued" in cli.stderr


def test_worker_under_torchrun_is_refused_and_the_job_stays_queued(
    cli, workspace, fake_stages, monkeypatch
):
    cli("retrain", "--no-worker")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _ = cli("worker", "1")
    assert code == 2 and "without torchrun" in cli.stderr
    monkeypatch.delenv("WORLD_SIZE")
    code, out = cli("worker", "1")
    assert code == 0 and out[-1].startswith("job 1 succeeded")


def _register_tiny_student(workspace) -> int:
    """A tiny student trained for one step, registered like a retrain job would."""
    from core.train_detector import DetectorTrainConfig, train_detector

    torch.set_num_threads(1)
    image = next((workspace.root.parent / "images").glob("train_fire_1.png"))
    checkpoint = workspace.models_dir / "student.pt"
    config = DetectorTrainConfig(
        variant="tiny-student", epochs=1, batch_size=1, image_size=64, device="cpu", augment=False
    )
    train_detector(
        config,
        [(str(image), [[10, 10, 40, 40]], [0])],
        ["fire", "smoke"],
        checkpoint_path=checkpoint,
    )
    with workspace.transaction() as session:
        version = ModelVersion(
            kind="student", arch="tiny-student", path="models/student.pt", classes=["fire", "smoke"]
        )
        session.add(version)
        session.add(ModelVersion(kind="classifier", arch="resnet10", path="x.pt", classes=[]))
        session.flush()
        return version.id


def test_export_model_writes_onnx_that_matches_pytorch(cli, workspace, tmp_path):
    model_id = _register_tiny_student(workspace)
    onnx_path = tmp_path / "out" / "student.onnx"
    code, out = cli("export-model", str(model_id), "--onnx", str(onnx_path))
    assert code == 0, out
    assert onnx_path.is_file()
    assert out[-1].startswith(f"exported student {model_id} (tiny-student) to {onnx_path}")
    assert "onnxruntime matches PyTorch" in out[-1]

    assert cli("export-model", "99", "--onnx", str(onnx_path))[0] == 1
    assert cli("export-model", str(model_id + 1), "--onnx", str(onnx_path))[0] == 1  # classifier
    assert (
        cli("export-model", str(model_id), "--onnx", str(onnx_path), "--image-size", "50")[0] == 2
    )
