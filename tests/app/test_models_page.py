"""The Models page (AppTest): the Retrain form creates the job the command line creates, the
running job shows live with a Cancel button, a stopped job offers Resume, and model versions
are compared with their numbers."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from app import jobs
from app.stages import evaluate_predictions
from db.curation import FrozenItem
from db.models import Job, JobState, ModelVersion
from db.workspace import WORKSPACE_ENV


def _page():
    from app.ui.models import models_page

    models_page()


@pytest.fixture
def started(monkeypatch):
    """Worker starts are recorded, not done: the page's part ends at the job row."""
    calls = []
    monkeypatch.setattr(jobs, "start_worker", lambda workspace, job_id: calls.append(job_id))
    return calls


@pytest.fixture
def page(workspace, monkeypatch):
    monkeypatch.setenv(WORKSPACE_ENV, str(workspace.root))

    def run() -> AppTest:
        at = AppTest.from_function(_page, default_timeout=30)
        at.session_state["reviewer"] = "ana"
        return at.run()

    return run


def _texts(at: AppTest) -> str:
    parts = [e.value for e in [*at.markdown, *at.caption, *at.info, *at.error, *at.warning]]
    return "\n".join(str(p) for p in parts)


def _job(workspace, job_id: int) -> Job:
    with workspace.session() as session:
        return session.get(Job, job_id)


def test_empty_workspace_offers_retrain(page):
    at = page()
    assert not at.exception
    assert [h.value for h in at.header][:2] == ["Retrain", "Versions"]
    assert "No model yet" in _texts(at)
    assert at.button(key="FormSubmitter:retrain-Retrain") is not None


def test_retrain_form_preselects_the_pair_this_machine_can_train(page):
    import torch

    at = page()
    gpu = torch.cuda.is_available()
    expected = ("server", "edge") if gpu else ("tiny-teacher", "tiny-student")
    assert (at.selectbox[0].value, at.selectbox[1].value) == expected


def test_retrain_button_creates_the_job_and_shows_it_live(page, workspace, started):
    at = page()
    at.selectbox[0].set_value("tiny-teacher")
    at.selectbox[1].set_value("tiny-student")
    at.number_input[0].set_value(2)
    at.multiselect[0].set_value(["teacher", "student"])
    at.button(key="FormSubmitter:retrain-Retrain").click().run()
    assert not at.exception

    job = _job(workspace, 1)
    assert started == [1]
    assert job.state == JobState.QUEUED and job.created_by == "ana"
    options = jobs.RetrainOptions.from_dict(job.options)
    assert options == jobs.RetrainOptions(
        stages=["teacher", "student"],
        teacher="tiny-teacher",
        student="tiny-student",
        epochs=2,
        eval_splits=[],  # the workspace has no val or test split
    )

    # The worker reports progress; the page shows it.
    from db import jobs as job_rows

    with workspace.transaction() as session:
        job_rows.update_progress(
            session,
            job_id=1,
            stage="teacher",
            progress=0.3,
            epoch=1,
            step=4,
            eta_s=90,
            losses={"classification": 0.7, "total": 1.2},
        )
    at = page()
    assert not at.exception
    progress = at.get("progress")[0]
    assert progress.proto.value == 30 and "Job 1 queued: teacher" in progress.proto.text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Epoch"] == "1" and metrics["Step"] == "4"
    assert metrics["Stage ETA"] == "1 min 30 s"

    # Cancel: a job whose worker never started stops at once; Resume queues it again.
    at.button(key="cancel_1").click().run()
    assert _job(workspace, 1).cancel_requested
    at = page()
    assert "Job 1 was cancelled." in _texts(at)
    at.button(key="resume_1").click().run()
    assert not at.exception
    assert _job(workspace, 1).state == JobState.QUEUED and started == [1, 1]


def test_failed_job_shows_its_error_and_log(page, workspace, started):
    job = jobs.submit_retrain(workspace, jobs.RetrainOptions(), start=False)
    log_path = workspace.absolute(job.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("loading\nTraceback: boom at step 3\n")
    from db import jobs as job_rows

    with workspace.transaction() as session:
        job_rows.finish_job(
            session, job_id=job.id, state=JobState.FAILED, error="RuntimeError: boom"
        )
    at = page()
    assert f"Job {job.id} failed: RuntimeError: boom" in _texts(at)
    assert "boom at step 3" in at.code[0].value
    assert at.button(key=f"resume_{job.id}") is not None


def _metrics(fire_ap_predictions: dict) -> dict:
    """Real evaluate_predictions output on two hand-made evaluation images."""
    items = [
        FrozenItem(1, "a.jpg", 100, 100, "eval", [[10, 10, 50, 50, 0]], [], {}, []),
        FrozenItem(
            2,
            "b.jpg",
            100,
            100,
            "eval",
            [],
            [],
            {"fire": 0, "smoke": 0},
            [[0, 0, 30, 30, 0, "lamp"]],
        ),
    ]
    return evaluate_predictions(
        items, [items[1]], fire_ap_predictions, ["fire", "smoke"], score_threshold=0.5
    )


def test_versions_are_listed_and_compared(page, workspace, started):
    hit = {"boxes": [[10, 10, 50, 50]], "labels": [0], "scores": [0.9]}
    lamp = {"boxes": [[0, 0, 30, 30]], "labels": [0], "scores": [0.8]}
    with workspace.transaction() as session:
        teacher = ModelVersion(
            kind="teacher",
            arch="tiny-teacher",
            path="t.pt",
            classes=["fire", "smoke"],
            metrics=_metrics({1: hit}),
        )
        session.add(teacher)
        session.flush()
        student = ModelVersion(
            kind="student",
            arch="tiny-student",
            path="s.pt",
            classes=["fire", "smoke"],
            parent_id=teacher.id,
            metrics=_metrics({2: lamp}),
        )
        session.add(student)
        session.add(ModelVersion(kind="classifier", arch="resnet10", path="c.pt", classes=[]))
    at = page()
    assert not at.exception

    table = at.dataframe[0].value
    assert list(table["kind"]) == ["classifier", "student", "teacher"]
    metrics = {m.label: m for m in at.metric}
    assert metrics["teacher 1 (tiny-teacher): AP50"].value == "1.000"
    student_metric = metrics["student 2 (tiny-student): AP50"]
    assert student_metric.value == "0.000"
    assert "-1.000 vs teacher" in student_metric.delta

    per_class = at.dataframe[1].value
    assert per_class.loc["fire", ("teacher 1 (tiny-teacher)", "AP50")] == pytest.approx(1.0)
    assert len(at.get("vega_lite_chart")) == 2  # PR curves and still-fire reasons

    # The student fires on the lamp a reviewer rejected; the teacher does not.
    from app.ui.models import still_fire_frame

    with workspace.session() as session:
        chosen = [session.get(ModelVersion, 1), session.get(ModelVersion, 2)]
    still = still_fire_frame(chosen, {"lamp": "Lamp or glare"})
    assert still.loc["Lamp or glare"].to_dict() == {
        "teacher 1 (tiny-teacher)": 0.0,
        "student 2 (tiny-student)": 1.0,
    }
    texts = _texts(at)
    assert "false alarms on fire-free images 100.0% (1 of 1)" in texts
    assert "false alarms on fire-free images 0.0% (0 of 1)" in texts
