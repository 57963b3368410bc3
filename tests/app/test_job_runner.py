"""The job runner: a tiny retrain end to end through the worker process, one active job,
cancel, a killed worker, resume from checkpoints, and the evaluation numbers."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from app import jobs
from app.stages import STAGE_FUNCTIONS, evaluate_predictions, still_fires, teacher_stage
from db import jobs as job_rows
from db.curation import FrozenItem
from db.models import DatasetItem, Job, JobState, ModelVersion, ProposalRun

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from retrain_fixtures import FAKE_STAGES, make_curated_workspace, tracked_workers  # noqa: E402

TINY = {
    "teacher": "tiny-teacher",
    "student": "tiny-student",
    "epochs": 1,
    "image_size": 64,
    "batch_size": 4,
    "device": "cpu",
}


@pytest.fixture
def curated(workspace, tmp_path):
    make_curated_workspace(workspace, tmp_path / "images")
    return workspace


@pytest.fixture
def workers(monkeypatch):
    yield from tracked_workers(monkeypatch)


def _job(workspace, job_id) -> Job:
    with workspace.session() as session:
        return session.get(Job, job_id)


def _wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_tiny_retrain_end_to_end_through_the_worker_process(curated, workers):
    options = jobs.RetrainOptions(stages=list(jobs.STAGES), **TINY)
    job = jobs.submit_retrain(curated, options, created_by="test")
    states = [_job(curated, job.id).state]
    progress = []

    def seen(row):
        if row.state != states[-1]:
            states.append(row.state)
        progress.append(row.progress)

    final = jobs.follow_job(curated, job.id, on_update=seen, poll_s=0.25, timeout_s=120)
    log_text = (curated.root / "runs" / f"job-{job.id}.log").read_text()
    assert final.state == JobState.SUCCEEDED, log_text
    assert states == ["queued", "running", "succeeded"]
    assert progress == sorted(progress) and final.progress == 1.0
    assert final.active_slot is None and final.finished_at is not None
    for stage in jobs.STAGES:
        assert f"stage {stage}" in log_text

    # The frozen set, the registered models and their numbers.
    with curated.session() as session:
        roles = sorted(
            session.scalars(
                select(DatasetItem.role).where(
                    DatasetItem.dataset_version_id == final.results["dataset_version_id"]
                )
            )
        )
        models = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
    assert roles == ["eval"] * 3 + ["negative"] * 2 + ["train"] * 4
    assert [(m.kind, m.arch, m.job_id) for m in models] == [
        ("classifier", "resnet10", job.id),
        ("teacher", "tiny-teacher", job.id),
        ("student", "tiny-student", job.id),
    ]
    classifier, teacher, student = models
    assert student.parent_id == teacher.id
    assert curated.absolute(classifier.path).is_file()
    with curated.session() as session:
        run = session.scalar(select(ProposalRun).order_by(ProposalRun.id.desc()))
    assert run.model_version_id == classifier.id and run.image_count == 9
    assert final.results["proposals"]["proposal_run_id"] == run.id
    for model in (teacher, student):
        assert curated.absolute(model.path).is_file()
        assert model.classes == ["fire", "smoke"]
        assert model.metrics["eval_images"] == 3
        assert set(model.metrics["per_class"]) == {"fire", "smoke"}
        assert 0.0 <= model.metrics["AP50"] <= 1.0
        assert model.metrics["false_alarm"]["any"]["images"] == 1  # val_clean
        assert model.metrics["rejected_still_fire"]["lamp"]["images"] == 1
        assert len(model.metrics["pr_curves"]["fire"]["recall"]) == 101
    assert final.metrics["student"]["model_version_id"] == student.id
    assert final.metrics["teacher"]["AP50"] == teacher.metrics["AP50"]
    assert "pr_curves" not in final.metrics["student"]  # kept on the model version only


def test_second_job_is_refused_then_cancel_stops_the_worker(curated, workers, monkeypatch):
    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:SLOW_STAGES")
    job = jobs.submit_retrain(curated, jobs.RetrainOptions(**TINY))
    with pytest.raises(job_rows.JobAlreadyRunning) as refused:
        jobs.submit_retrain(curated, jobs.RetrainOptions(**TINY))
    assert refused.value.job_id == job.id

    marker = jobs.job_work_dir(curated, job.id) / "teacher-started"
    _wait_for(marker.exists, what="the slow teacher to start")
    _wait_for(lambda: _job(curated, job.id).step, what="a progress report")
    running = _job(curated, job.id)
    assert (running.state, running.stage, running.epoch) == ("running", "teacher", 1)
    assert running.losses["total"] > 0 and running.eta_s is not None

    jobs.cancel_job(curated, job.id)
    final = jobs.follow_job(curated, job.id, poll_s=0.25, timeout_s=30)
    assert final.state == JobState.CANCELLED, final.error
    assert workers[0].wait(timeout=30) == 3  # the worker's exit code for "cancelled"

    # The slot is free again, and the cancelled job resumes (here with fast fake stages).
    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:FAKE_STAGES")
    jobs.resume_retrain(curated, job.id)
    final = jobs.follow_job(curated, job.id, poll_s=0.25, timeout_s=60)
    assert final.state == JobState.SUCCEEDED
    assert final.metrics == {"student": {"AP50": 0.5}}


def test_killed_worker_job_is_failed_on_next_start(curated, workers, monkeypatch):
    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:SLOW_STAGES")
    job = jobs.submit_retrain(curated, jobs.RetrainOptions(**TINY))
    marker = jobs.job_work_dir(curated, job.id) / "teacher-started"
    _wait_for(marker.exists, what="the slow teacher to start")
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait(timeout=10)
    assert _job(curated, job.id).state == JobState.RUNNING  # nobody told the database

    monkeypatch.setenv(jobs.STAGES_REF_ENV, "retrain_fixtures:FAKE_STAGES")
    second = jobs.submit_retrain(curated, jobs.RetrainOptions(**TINY))
    dead = _job(curated, job.id)
    assert dead.state == JobState.FAILED and dead.active_slot is None
    assert f"worker (pid {workers[0].pid}) exited" in dead.error
    assert f"runs/job-{job.id}.log" in dead.error
    assert jobs.follow_job(curated, second.id, poll_s=0.25, timeout_s=60).state == "succeeded"


# ----------------------------------------------------------------------------------------------
# In-process: the runner's bookkeeping, with fake and real stages.


def test_failed_job_resumes_without_redoing_finished_stages(curated):
    calls = []

    def teacher(ctx):
        calls.append("teacher")
        return {"model_version_id": 11}

    def student(ctx):
        calls.append("student")
        if calls.count("student") == 1:
            raise RuntimeError("out of memory")
        assert ctx.results["teacher"]["model_version_id"] == 11
        return {"model_version_id": 12}

    stages = {"teacher": teacher, "student": student}
    options = jobs.RetrainOptions(stages=["student", "teacher"], **TINY)
    job = jobs.submit_retrain(curated, options, start=False)
    assert jobs.run_job(curated, job.id, stage_functions=stages) == JobState.FAILED
    failed = _job(curated, job.id)
    assert failed.error == "RuntimeError: out of memory"
    assert failed.results["teacher"]["model_version_id"] == 11
    version_id = failed.results["dataset_version_id"]

    jobs.resume_retrain(curated, job.id, start=False)
    assert jobs.run_job(curated, job.id, stage_functions=stages) == JobState.SUCCEEDED
    assert calls == ["teacher", "student", "student"]
    # The resumed job trains on the set frozen when it first started.
    assert _job(curated, job.id).results["dataset_version_id"] == version_id


def test_cancelled_training_resumes_from_its_checkpoint(curated, caplog):
    torch.set_num_threads(1)
    reports = []

    def teacher_cancelled_after_two_steps(ctx):
        report = ctx.reporter.report

        def counting(**progress):
            report(**progress)
            reports.append(progress.get("step"))
            if len(reports) == 1:
                ctx.reporter.cancel_flag.set()  # as a cancel read from the row would

        ctx.reporter.report = counting
        return teacher_stage(ctx)

    options = jobs.RetrainOptions(stages=["teacher"], **{**TINY, "batch_size": 2, "epochs": 2})
    job = jobs.submit_retrain(curated, options, start=False)
    state = jobs.run_job(
        curated, job.id, stage_functions={"teacher": teacher_cancelled_after_two_steps}
    )
    assert state == JobState.CANCELLED
    checkpoint_path = jobs.job_work_dir(curated, job.id) / "teacher.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    # The flag is read at the start of the next step, which still runs: 2 of 3 steps done.
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 2)

    jobs.resume_retrain(curated, job.id, start=False)
    with caplog.at_level("INFO"):
        assert jobs.run_job(curated, job.id, stage_functions=STAGE_FUNCTIONS) == "succeeded"
    assert "resuming" in caplog.text
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["epoch"] == 2
    assert _job(curated, job.id).results["teacher"]["epochs"] == 2


def test_cancel_interrupts_a_stage_without_cancel_hooks(curated, monkeypatch):
    """A stage running someone else's loop (propose) is interrupted by the heartbeat."""
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.05)
    job = jobs.submit_retrain(curated, jobs.RetrainOptions(stages=["proposals"]), start=False)
    reached = []

    def busy_proposals(ctx):
        with ctx.interruptible():
            jobs.cancel_job(curated, job.id)  # as the app's Cancel button would
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # never asks whether to stop
                time.sleep(0.01)
            reached.append("end")
        return {}

    state = jobs.run_job(curated, job.id, stage_functions={"proposals": busy_proposals})
    assert state == JobState.CANCELLED and reached == []


def test_options_are_validated_and_ordered():
    options = jobs.RetrainOptions(stages=["evaluation", "teacher"])
    assert options.stages == ["teacher", "evaluation"]
    assert jobs.RetrainOptions.from_dict(options.to_dict()) == options
    assert jobs.selected(["all"]) == list(jobs.STAGES)
    with pytest.raises(ValueError, match="unknown stage 'techer'"):
        jobs.RetrainOptions(stages=["techer"])
    with pytest.raises(ValueError, match="--distill"):
        jobs.RetrainOptions(distill="fitnet")
    with pytest.raises(ValueError, match="--distill-tau must be positive"):
        jobs.RetrainOptions(distill_tau=0)


def test_distill_options_reach_the_student_config():
    from core.distill import DistillConfig

    plain = DistillConfig(**jobs.RetrainOptions().distill_config("t.pt"))
    assert (plain.kind, plain.teacher, plain.tau) == ("cwd", "t.pt", DistillConfig().tau)
    cwd = jobs.RetrainOptions(
        distill_tau=4.0, distill_feature_weight=0.0, distill_logit_weight=1.5
    ).distill_config("t.pt")
    assert DistillConfig(**cwd) == DistillConfig(
        kind="cwd", teacher="t.pt", tau=4.0, feature_weight=0.0, logit_weight=1.5
    )
    # KD has its own temperature; the CWD one stays at its default.
    kd = DistillConfig(**jobs.RetrainOptions(distill="kd", distill_tau=3.0).distill_config("t.pt"))
    assert (kd.kd_tau, kd.tau) == (3.0, DistillConfig().tau)


def test_offered_detector_pairs_exist_and_match():
    from core.detectors import TEACHER_FOR, VARIANTS

    for teacher, student in zip(jobs.TEACHER_VARIANTS, jobs.STUDENT_VARIANTS, strict=True):
        assert teacher in VARIANTS and student in VARIANTS
        assert TEACHER_FOR[student] == teacher


def test_fake_stages_match_the_real_stage_names():
    assert set(FAKE_STAGES) <= set(jobs.STAGES)
    assert set(STAGE_FUNCTIONS) <= set(jobs.STAGES)


# ----------------------------------------------------------------------------------------------
# The evaluation numbers, on hand-made predictions.


def _item(image_id, role, boxes=(), tags=None, rejected=()):
    return FrozenItem(
        image_id=image_id,
        path=f"{image_id}.jpg",
        width=100,
        height=100,
        role=role,
        boxes=[list(b) for b in boxes],
        points=[],
        tags=tags or {},
        rejected=[list(r) for r in rejected],
    )


def _pred(*boxes):
    """boxes: (x1, y1, x2, y2, label, score)."""
    return {
        "boxes": [b[:4] for b in boxes],
        "labels": [b[4] for b in boxes],
        "scores": [b[5] for b in boxes],
    }


def test_still_fires_needs_same_class_same_spot_and_score():
    rejected = [[10, 10, 50, 50, 0, "lamp"], [60, 60, 90, 90, 1, "sunset"]]
    assert still_fires(rejected, _pred((12, 12, 48, 52, 0, 0.9)), 0.5) == {"lamp"}
    assert still_fires(rejected, _pred((12, 12, 48, 52, 1, 0.9)), 0.5) == set()  # other class
    assert still_fires(rejected, _pred((12, 12, 48, 52, 0, 0.4)), 0.5) == set()  # low score
    assert still_fires(rejected, _pred((70, 0, 99, 30, 0, 0.9)), 0.5) == set()  # elsewhere
    both = _pred((10, 10, 50, 50, 0, 0.6), (61, 61, 90, 90, 1, 0.7))
    assert still_fires(rejected, both, 0.5) == {"lamp", "sunset"}


def test_evaluation_numbers_on_hand_made_predictions():
    fire, smoke = 0, 1
    eval_items = [
        _item(1, "eval", boxes=[(10, 10, 50, 50, fire)]),
        _item(2, "eval", boxes=[(20, 20, 60, 60, smoke)]),
        _item(3, "eval", tags={"fire": 0, "smoke": 0}),
        _item(4, "eval", tags={"fire": 0, "smoke": 0}, rejected=[(5, 5, 40, 40, fire, "lamp")]),
    ]
    negatives = [
        _item(5, "negative", rejected=[(0, 0, 30, 30, fire, "lamp")]),
        _item(6, "negative", rejected=[(0, 0, 30, 30, fire, "torch")]),
    ]
    predictions = {
        1: _pred((10, 10, 50, 50, fire, 0.9)),  # a perfect fire box
        2: _pred((20, 20, 60, 60, fire, 0.8)),  # smoke called fire: missed smoke, false fire
        3: _pred((0, 0, 10, 10, smoke, 0.3)),  # below the firing threshold
        4: _pred((5, 5, 40, 40, fire, 0.7)),  # the lamp again
        5: _pred((0, 0, 30, 30, fire, 0.6)),  # the lamp again
        6: _pred(),  # the torch is gone
    }
    metrics = evaluate_predictions(
        eval_items,
        [eval_items[3], *negatives],
        predictions,
        ["fire", "smoke"],
        score_threshold=0.5,
    )
    # fire: two false fire boxes scored below the true one (0.8 and 0.7 vs 0.9) -> precision 1
    # at recall 1, AP 1. smoke: never found -> 0.
    assert metrics["per_class"]["fire"]["AP50"] == pytest.approx(1.0)
    assert metrics["per_class"]["smoke"]["AP50"] == 0.0
    assert metrics["AP50"] == pytest.approx(0.5)
    # Images without fire: 2, 3, 4; fire fired on 2 and 4. Without smoke: 1, 3, 4; none.
    assert metrics["false_alarm"]["fire"] == {"rate": 2 / 3, "false_alarms": 2, "images": 3}
    assert metrics["false_alarm"]["smoke"]["false_alarms"] == 0
    assert metrics["false_alarm"]["any"] == {"rate": 0.5, "false_alarms": 1, "images": 2}
    assert metrics["rejected_still_fire"] == {
        "lamp": {"images": 2, "still_fire": 2, "rate": 1.0},
        "torch": {"images": 1, "still_fire": 0, "rate": 0.0},
    }
    assert metrics["rejected_still_fire_held_out"] == {
        "lamp": {"images": 1, "still_fire": 1, "rate": 1.0}
    }
    assert set(metrics["pr_curves"]) == {"fire", "smoke"}


def test_undefined_numbers_are_stored_as_null():
    metrics = evaluate_predictions(
        [_item(1, "eval", boxes=[(0, 0, 10, 10, 0)])],
        [],
        {},
        ["fire", "smoke"],
        score_threshold=0.5,
    )
    assert metrics["per_class"]["smoke"]["AP"] is None  # no smoke in the truth
    assert metrics["false_alarm"]["fire"]["rate"] is None  # no image without fire
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())
