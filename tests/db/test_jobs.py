"""Job rows: one active job per workspace (enforced by the database), progress, cancel, reaping
of dead workers, resume."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from db import jobs
from db.models import Job, JobState, utcnow


def _create(workspace, **options):
    with workspace.transaction() as session:
        return jobs.create_job(session, kind="retrain", options=options, created_by="ana").id


def test_second_job_is_refused_while_one_is_active(workspace):
    first = _create(workspace, epochs=1)
    with workspace.transaction() as session:
        with pytest.raises(jobs.JobAlreadyRunning) as refused:
            jobs.create_job(session, kind="retrain", options={})
        # The refused insert left the caller's transaction usable.
        assert session.scalar(select(func.count(Job.id))) == 1
    assert refused.value.job_id == first
    assert f"job {first} is already queued" in str(refused.value)

    with workspace.transaction() as session:
        jobs.finish_job(session, job_id=first, state=JobState.SUCCEEDED)
    second = _create(workspace)
    assert second != first
    with workspace.session() as session:
        assert jobs.active_job(session).id == second


def test_the_database_itself_refuses_a_second_active_slot(workspace):
    """Even code that skips create_job cannot have two active jobs."""
    from sqlalchemy.exc import IntegrityError

    _create(workspace)
    with pytest.raises(IntegrityError), workspace.transaction() as session:
        session.add(Job(kind="retrain", state=JobState.RUNNING, active_slot=1))


def test_progress_cancel_and_finish(workspace):
    job_id = _create(workspace)
    with workspace.transaction() as session:
        jobs.mark_running(session, job_id=job_id, pid=4242, host="here")
        cancel = jobs.update_progress(
            session,
            job_id=job_id,
            stage="teacher",
            progress=0.25,
            epoch=1,
            step=3,
            losses={"classification": 0.5},
            eta_s=12.0,
        )
    assert cancel is False
    with workspace.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.stage, job.progress, job.epoch, job.step) == (
            "running",
            "teacher",
            0.25,
            1,
            3,
        )
        assert job.losses == {"classification": 0.5}
        assert job.heartbeat_at is not None and job.heartbeat_at.tzinfo is not None

    # A new stage clears the previous stage's epoch, step, losses and ETA.
    with workspace.transaction() as session:
        jobs.request_cancel(session, job_id=job_id)
        assert jobs.update_progress(session, job_id=job_id, stage="student", progress=2.0)
        job = session.get(Job, job_id)
        assert (job.epoch, job.step, job.losses, job.eta_s, job.progress) == (
            None,
            None,
            None,
            None,
            1.0,
        )
        jobs.finish_job(session, job_id=job_id, state=JobState.CANCELLED)
    with workspace.session() as session:
        job = session.get(Job, job_id)
        assert job.state == "cancelled" and job.active_slot is None and job.finished_at
        # A finished job stays as it is when cancelled again.
        assert jobs.request_cancel(session, job_id=job_id).state == "cancelled"


def test_cancel_of_a_queued_job_without_worker_is_immediate(workspace):
    job_id = _create(workspace)
    with workspace.transaction() as session:
        job = jobs.request_cancel(session, job_id=job_id)
        assert job.state == JobState.CANCELLED and job.active_slot is None


@pytest.mark.parametrize("dead", ["pid", "heartbeat", "never_started"])
def test_dead_worker_job_is_failed_on_next_start(workspace, dead):
    job_id = _create(workspace)
    now = utcnow()
    with workspace.transaction() as session:
        job = session.get(Job, job_id)
        job.log_path = "runs/job-1.log"
        if dead == "pid":
            jobs.mark_running(session, job_id=job_id, pid=999_999, host=jobs.this_host())
        elif dead == "heartbeat":
            # On another host the pid cannot be checked; the heartbeat still tells.
            jobs.mark_running(session, job_id=job_id, pid=1, host="elsewhere")
            job.heartbeat_at = now - timedelta(seconds=jobs.STALE_AFTER_S + 1)
        else:
            job.created_at = now - timedelta(seconds=jobs.QUEUED_TIMEOUT_S + 1)

    with workspace.transaction() as session:
        new = jobs.create_job(session, kind="retrain", options={})
        assert new.id != job_id
    with workspace.session() as session:
        old = session.get(Job, job_id)
        assert old.state == JobState.FAILED and old.active_slot is None
        assert "runs/job-1.log" in old.error
        expected = {"pid": "pid 999999", "heartbeat": "no heartbeat", "never_started": "never"}
        assert expected[dead] in old.error


def test_live_workers_are_not_reaped(workspace):
    import os

    job_id = _create(workspace)
    with workspace.transaction() as session:
        # A fresh queued job is waiting for its worker, not dead.
        assert jobs.reap_dead_jobs(session) == []
        jobs.mark_running(session, job_id=job_id, pid=os.getpid(), host=jobs.this_host())
        assert jobs.reap_dead_jobs(session) == []
    with workspace.transaction() as session:
        assert session.get(Job, job_id).state == JobState.RUNNING
        with pytest.raises(jobs.JobAlreadyRunning):
            jobs.create_job(session, kind="retrain", options={})


def test_a_job_waiting_for_an_external_worker_is_not_reaped(workspace):
    with workspace.transaction() as session:
        job = jobs.create_job(session, kind="retrain", options={jobs.EXTERNAL_WORKER_KEY: True})
        job.created_at = utcnow() - timedelta(seconds=jobs.QUEUED_TIMEOUT_S * 10)
    with workspace.transaction() as session:
        assert jobs.reap_dead_jobs(session) == []


def test_pid_alive_sees_this_process_and_not_a_missing_one():
    import os

    assert jobs.pid_alive(os.getpid())
    assert not jobs.pid_alive(999_999)


def test_resume_requeues_a_failed_job_keeping_its_results(workspace):
    job_id = _create(workspace)
    with workspace.transaction() as session:
        jobs.mark_running(session, job_id=job_id, pid=5, host="here")
        jobs.save_results(session, job_id=job_id, results={"teacher": {"model_version_id": 3}})
        jobs.finish_job(session, job_id=job_id, state=JobState.FAILED, error="boom")
    with workspace.transaction() as session:
        job = jobs.resume_job(session, job_id=job_id)
        assert (job.state, job.active_slot, job.error, job.pid) == ("queued", 1, None, None)
        assert job.results == {"teacher": {"model_version_id": 3}}
    # Queued or running jobs, and a second active one, do not resume.
    with workspace.transaction() as session:
        with pytest.raises(jobs.JobError, match="only a failed or cancelled"):
            jobs.resume_job(session, job_id=job_id)
    other = None
    with workspace.transaction() as session:
        jobs.finish_job(session, job_id=job_id, state=JobState.CANCELLED)
        other = jobs.create_job(session, kind="retrain", options={}).id
    with workspace.transaction() as session:
        with pytest.raises(jobs.JobAlreadyRunning) as refused:
            jobs.resume_job(session, job_id=job_id)
        assert refused.value.job_id == other


def test_unknown_job_names_the_fix(workspace):
    with workspace.session() as session, pytest.raises(jobs.JobError, match="no job 77"):
        jobs.get_job(session, 77)
