"""Job rows: create one (one active job per workspace), report progress, cancel, finish, reap.

The database enforces "one queued or running job" by itself: Job.active_slot is 1 for an
active job and NULL otherwise, and a unique constraint on it makes a second insert fail,
even when two reviewers click Retrain in the same second on two machines.

A worker that dies (killed, out of memory, machine reboot) cannot mark its own job failed.
The next start of a job reaps it: an active job whose process is gone from this host, or whose
heartbeat is older than `stale_after_s`, is marked failed, pointing at its log.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Job, JobState, utcnow

log = logging.getLogger(__name__)

# A live worker writes its heartbeat every few seconds (app.worker.HEARTBEAT_S); this much
# silence means it is gone, even when its pid cannot be checked (another host).
STALE_AFTER_S = 120.0
# A queued job whose worker never reported in (it failed to start) is reaped after this.
QUEUED_TIMEOUT_S = 300.0

FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
# Job.options key set when no worker is started for the job (`pyrolabel retrain --no-worker`).
EXTERNAL_WORKER_KEY = "external_worker"


class JobAlreadyRunning(RuntimeError):
    """Another job is queued or running; `job_id` names it."""

    def __init__(self, job_id: int, state: str, stage: str | None):
        self.job_id = job_id
        self.state = state
        self.stage = stage
        where = f" ({stage})" if stage else ""
        super().__init__(
            f"job {job_id} is already {state}{where}; wait for it, or cancel it with "
            f"`pyrolabel retrain --cancel {job_id}`"
        )


class JobError(RuntimeError):
    """A job cannot do what was asked (unknown id, wrong state); the message says why."""


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state letter follows the parenthesised command name, which may hold spaces.
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobError(f"no job {job_id}; `pyrolabel retrain --list` shows the jobs")
    return job


def active_job(session: Session) -> Job | None:
    """The queued or running job, if any."""
    return session.scalar(select(Job).where(Job.active_slot.is_not(None)))


def latest_jobs(session: Session, *, limit: int = 20) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def reap_dead_jobs(
    session: Session,
    *,
    now: datetime | None = None,
    stale_after_s: float = STALE_AFTER_S,
    queued_timeout_s: float = QUEUED_TIMEOUT_S,
    is_alive: Callable[[int], bool] = pid_alive,
    host: str | None = None,
) -> list[Job]:
    """Mark failed every active job whose worker is gone; returns the reaped jobs.

    A worker is gone when its pid no longer runs on this host, when its heartbeat (or, before
    the first one, its start) is older than `stale_after_s`, or when a queued job never got a
    worker within `queued_timeout_s`.
    """
    now = now or utcnow()
    host = host or this_host()
    reaped = []
    for job in session.scalars(select(Job).where(Job.active_slot.is_not(None))):
        reason = None
        last_sign = job.heartbeat_at or job.started_at
        # A job queued for `pyrolabel worker` elsewhere (a batch scheduler) may wait for hours.
        external = (job.options or {}).get(EXTERNAL_WORKER_KEY, False)
        if job.pid is not None and job.host == host and not is_alive(job.pid):
            reason = f"worker (pid {job.pid}) exited without finishing"
        elif last_sign is not None and now - last_sign > timedelta(seconds=stale_after_s):
            reason = f"no heartbeat from the worker since {last_sign:%Y-%m-%d %H:%M:%S} UTC"
        elif (
            last_sign is None
            and not external
            and now - job.created_at > timedelta(seconds=queued_timeout_s)
        ):
            reason = "the worker never started"
        if reason is None:
            continue
        log_hint = f"; see its log {job.log_path}" if job.log_path else ""
        _finish(job, JobState.FAILED, error=f"{reason}{log_hint}", now=now)
        log.warning("job %d marked failed: %s%s", job.id, reason, log_hint)
        reaped.append(job)
    session.flush()
    return reaped


def create_job(
    session: Session,
    *,
    kind: str,
    options: dict[str, Any],
    created_by: str | None = None,
    reap: bool = True,
) -> Job:
    """Insert a queued job (flushed; the caller commits), first reaping dead workers' jobs.

    Raises:
        JobAlreadyRunning: another job is queued or running.
    """
    if reap:
        reap_dead_jobs(session)
    job = Job(kind=kind, options=options, created_by=created_by, state=JobState.QUEUED)
    try:
        # A savepoint, so a refused insert leaves the caller's transaction usable.
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        _raise_already_running(session)
        raise
    return job


def _raise_already_running(session: Session) -> None:
    other = active_job(session)
    if other is not None:
        raise JobAlreadyRunning(other.id, other.state, other.stage)


def resume_job(session: Session, *, job_id: int, reap: bool = True) -> Job:
    """Make a failed or cancelled job queued again; its worker skips finished stages and
    continues from the last checkpoint.

    Raises:
        JobError: the job is not failed or cancelled.
        JobAlreadyRunning: another job is queued or running.
    """
    if reap:
        reap_dead_jobs(session)
    job = get_job(session, job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise JobError(f"job {job_id} is {job.state}; only a failed or cancelled job resumes")
    try:
        with session.begin_nested():
            job.state = JobState.QUEUED
            job.active_slot = 1
            job.cancel_requested = False
            job.error = None
            job.finished_at = None
            job.pid = None
            job.host = None
            job.started_at = None
            job.heartbeat_at = None
            job.created_at = utcnow()  # the queued timeout counts from the resume
            session.flush()
    except IntegrityError:
        session.refresh(job)
        _raise_already_running(session)
        raise
    return job


def mark_running(session: Session, *, job_id: int, pid: int, host: str | None = None) -> Job:
    """The worker took the job: running, with its pid and host, and a first heartbeat."""
    job = get_job(session, job_id)
    if job.state != JobState.QUEUED:
        raise JobError(
            f"job {job_id} is {job.state}, not queued; `pyrolabel retrain --resume {job_id}` "
            "queues a failed or cancelled job again"
        )
    now = utcnow()
    job.state = JobState.RUNNING
    job.pid = pid
    job.host = host or this_host()
    job.started_at = now
    job.heartbeat_at = now
    session.flush()
    return job


def set_worker(session: Session, *, job_id: int, pid: int, log_path: str) -> None:
    """The runner started a worker process for a queued job (before the worker reports in)."""
    job = get_job(session, job_id)
    job.pid = pid
    job.host = this_host()
    job.log_path = log_path
    session.flush()


def update_progress(
    session: Session,
    *,
    job_id: int,
    stage: str | None = None,
    progress: float | None = None,
    epoch: int | None = None,
    step: int | None = None,
    losses: dict[str, float] | None = None,
    eta_s: float | None = None,
) -> bool:
    """Write progress and a heartbeat; returns whether a cancel was requested.

    progress: share of the whole job done, in [0, 1]. Fields left None keep their value,
    except that a new stage clears epoch, step, losses and ETA of the previous one.
    """
    job = get_job(session, job_id)
    if stage is not None and stage != job.stage:
        job.stage = stage
        job.epoch = job.step = job.losses = job.eta_s = None
    if progress is not None:
        job.progress = min(max(float(progress), 0.0), 1.0)
    if epoch is not None:
        job.epoch = epoch
    if step is not None:
        job.step = step
    if losses is not None:
        job.losses = {name: float(value) for name, value in losses.items()}
    if eta_s is not None:
        job.eta_s = float(eta_s)
    job.heartbeat_at = utcnow()
    session.flush()
    return job.cancel_requested


def heartbeat(session: Session, *, job_id: int) -> bool:
    """Record that the worker lives; returns whether a cancel was requested."""
    job = get_job(session, job_id)
    job.heartbeat_at = utcnow()
    session.flush()
    return job.cancel_requested


def request_cancel(session: Session, *, job_id: int) -> Job:
    """Ask the worker to stop at its next step. A queued job without a worker is cancelled
    at once; a finished job is left alone."""
    job = get_job(session, job_id)
    if job.state in FINISHED_STATES:
        return job
    job.cancel_requested = True
    if job.state == JobState.QUEUED and job.pid is None:
        _finish(job, JobState.CANCELLED, error=None, now=utcnow())
    session.flush()
    return job


def save_results(session: Session, *, job_id: int, results: dict[str, Any]) -> None:
    """Replace the job's results (what finished stages produced; read by a resumed job)."""
    job = get_job(session, job_id)
    job.results = dict(results)
    session.flush()


def finish_job(
    session: Session,
    *,
    job_id: int,
    state: JobState,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Job:
    """Mark the job succeeded, failed or cancelled, and free the active slot."""
    if state not in FINISHED_STATES:
        raise ValueError(f"{state} is not a finished state")
    job = get_job(session, job_id)
    if metrics is not None:
        job.metrics = metrics
    if state == JobState.SUCCEEDED:
        job.progress = 1.0
    _finish(job, state, error=error, now=utcnow())
    session.flush()
    return job


def _finish(job: Job, state: JobState, *, error: str | None, now: datetime) -> None:
    job.state = state
    job.active_slot = None
    job.error = error
    job.finished_at = now
    job.eta_s = None
