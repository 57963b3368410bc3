"""The job runner: retrain jobs run in a worker process, and report through their job row.

    submit_retrain()  creates the job row (one active job per workspace, see db.jobs) and
                      starts `python -m app.worker --workspace W JOB_ID` detached from the
                      caller, its output appended to runs/job-<id>.log
    run_job()         the worker's body: freeze the curated set, run the chosen stages in
                      order, write stage / epoch / step / loss terms / ETA to the row, stop at
                      the next step when a cancel is requested, record what each finished stage
                      produced in Job.results so a resumed job skips it
    follow_job()      polls the row until the job ends (the command line's progress bar)

Neither Streamlit nor the command line trains in its own process: a browser tab that closes or
a terminal that hangs up must not kill a two-hour training run, and a crash of a training run
must not take the review app down with it.

Stages are functions `stage(ctx: StageContext) -> dict` (see app.stages for the real ones);
their order is fixed (STAGES) whatever order the user names them in.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from db import jobs as job_rows
from db.models import Job, JobState
from db.workspace import Workspace

log = logging.getLogger(__name__)

JOB_KIND = "retrain"
STAGES = ("classifier", "proposals", "teacher", "student", "evaluation")
DEFAULT_STAGES = ("teacher", "student", "evaluation")
# Rough share of a job's time per stage, for the overall progress bar.
STAGE_WEIGHTS = {"classifier": 3.0, "proposals": 1.0, "teacher": 4.0, "student": 4.0}
STAGE_WEIGHTS["evaluation"] = 0.5
# Stages that read the frozen curated set.
DATASET_STAGES = ("teacher", "student", "evaluation")
DISTILL_MODES = ("cwd", "kd", "none")
# Detector variants offered for each role (core.detectors.VARIANTS; named here so the app can
# show them without importing torch). Every pair has the same pyramid strides.
TEACHER_VARIANTS = ("server", "tiny-teacher")
STUDENT_VARIANTS = ("edge", "tiny-student")

HEARTBEAT_S = 5.0  # well under db.jobs.STALE_AFTER_S
PROGRESS_EVERY_S = 1.0  # at most one progress write a second; SQLite has one writer
STAGES_REF_ENV = "PYROLABEL_STAGE_FUNCTIONS"


class JobCancelled(Exception):
    """Raised inside a stage when the job's cancel was requested; the worker stops cleanly."""


@dataclass
class RetrainOptions:
    """What a retrain job does; stored as Job.options. Defaults work on a GPU server.

    stages: any of STAGES; they always run in STAGES order.
    teacher / student: detector variants (core.detectors.VARIANTS).
    epochs / image_size / batch_size: None keeps each stage's own default.
    distill: "cwd" (channel-wise, on FPN features and logits), "kd" (logits only) or "none".
    distill_tau / distill_feature_weight / distill_logit_weight: the distillation's temperature
        and the weights of its feature and logit terms (None keeps core.distill.DistillConfig's
        defaults); KD reads the temperature and the logit weight only.
    eval_splits: held out for evaluation; never trained on.
    train_on_reference: train on reference labels of training splits (off: DESIGN keeps
        reference labels out of training).
    score_threshold: a detection at or above it "fires" (false-alarm rate, rejected images).
    """

    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    teacher: str = "server"
    student: str = "edge"
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int | None = None
    distill: str = "cwd"
    distill_tau: float | None = None
    distill_feature_weight: float | None = None
    distill_logit_weight: float | None = None
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    train_on_reference: bool = False
    score_threshold: float = 0.5
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
        if not self.stages:
            raise ValueError(f"choose at least one stage of {', '.join(STAGES)}")
        self.stages = [s for s in STAGES if s in self.stages]
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"--distill must be one of {', '.join(DISTILL_MODES)}")
        if self.distill_tau is not None and self.distill_tau <= 0:
            raise ValueError("--distill-tau must be positive")
        for name in ("distill_feature_weight", "distill_logit_weight"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be zero or more")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError("--image-size must be at least 32")
        self.eval_splits = list(self.eval_splits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def distill_config(self, teacher: str) -> dict[str, Any]:
        """core.distill.DistillConfig's keyword arguments for this job's student."""
        config: dict[str, Any] = {"kind": self.distill, "teacher": teacher}
        if self.distill_tau is not None:
            config["kd_tau" if self.distill == "kd" else "tau"] = self.distill_tau
        if self.distill_feature_weight is not None:
            config["feature_weight"] = self.distill_feature_weight
        if self.distill_logit_weight is not None:
            config["logit_weight"] = self.distill_logit_weight
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetrainOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


# ----------------------------------------------------------------------------------------------
# Progress, as the stages report it.


class ProgressReporter:
    """Writes a stage's progress to the job row, at most once per PROGRESS_EVERY_S, and keeps
    the job's cancel flag as the last write (or heartbeat) read it."""

    def __init__(self, workspace: Workspace, job_id: int, stages: list[str]):
        self.workspace = workspace
        self.job_id = job_id
        self.stages = stages
        self.cancel_flag = threading.Event()
        # While set, a cancel seen by the heartbeat raises KeyboardInterrupt in the main thread,
        # for stages that run code with no cancel hook (see StageContext.interruptible).
        self.interrupt_on_cancel = threading.Event()
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._stage_started = time.monotonic()
        self._last_write = 0.0
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self._offsets, offset = {}, 0.0
        for stage in stages:
            self._offsets[stage] = offset / total
            offset += STAGE_WEIGHTS[stage]
        self._shares = {s: STAGE_WEIGHTS[s] / total for s in stages}

    def start_stage(self, stage: str) -> None:
        self._stage = stage
        self._stage_started = time.monotonic()
        self._write(stage=stage, progress=self._offsets[stage], force=True)

    def report(
        self,
        *,
        fraction: float | None = None,
        epoch: int | None = None,
        step: int | None = None,
        losses: Mapping[str, float] | None = None,
        eta_s: float | None = None,
        force: bool = False,
    ) -> None:
        """Progress within the current stage. Never raises on a cancel (a training loop calls
        it from inside a step); stages ask `should_stop()` or call `check_cancel()`.

        fraction: share of the stage done, in [0, 1]. epoch, step: 1-based, as people count.
        losses: the latest value of each loss term. eta_s: seconds left in the stage; by
        default extrapolated from the time the stage took to reach `fraction`.
        """
        progress = None
        if fraction is not None and self._stage is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            progress = self._offsets[self._stage] + fraction * self._shares[self._stage]
            elapsed = time.monotonic() - self._stage_started
            if eta_s is None and fraction > 0:
                eta_s = elapsed * (1 - fraction) / fraction
        self._write(
            progress=progress, epoch=epoch, step=step, losses=losses, eta_s=eta_s, force=force
        )

    def should_stop(self) -> bool:
        return self.cancel_flag.is_set()

    def check_cancel(self) -> None:
        if self.cancel_flag.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled")

    def heartbeat(self) -> None:
        """Called from the heartbeat thread."""
        with self._lock, self.workspace.transaction() as session:
            if job_rows.heartbeat(session, job_id=self.job_id):
                self.cancel_flag.set()
        if self.cancel_flag.is_set() and self.interrupt_on_cancel.is_set():
            self.interrupt_on_cancel.clear()
            log.info("job %d: cancel requested; interrupting the stage", self.job_id)
            _thread.interrupt_main()

    def _write(self, *, force: bool = False, **values: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_EVERY_S:
            return
        self._last_write = now
        with self._lock, self.workspace.transaction() as session:
            if job_rows.update_progress(session, job_id=self.job_id, **values):
                self.cancel_flag.set()


@dataclass
class StageContext:
    """What a stage function gets.

    results: what earlier stages (of this job, or of its earlier runs before a resume)
        returned, by stage name, plus "dataset_version_id".
    work_dir: models/job-<id>/, for this job's checkpoints; a stage that finds its own
        checkpoint there resumes from it.
    """

    workspace: Workspace
    job_id: int
    options: RetrainOptions
    results: dict[str, Any]
    work_dir: Path
    reporter: ProgressReporter

    def report(self, **progress: Any) -> None:
        self.reporter.report(**progress)

    def should_stop(self) -> bool:
        return self.reporter.should_stop()

    def check_cancel(self) -> None:
        self.reporter.check_cancel()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Run code that has no cancel hook (another command's loop): a cancel then raises
        KeyboardInterrupt in it, within a heartbeat, which the job records as cancelled."""
        self.reporter.interrupt_on_cancel.set()
        try:
            yield
        finally:
            self.reporter.interrupt_on_cancel.clear()


StageFunction = Callable[[StageContext], dict[str, Any]]


def load_stage_functions(ref: str | None = None) -> Mapping[str, StageFunction]:
    """The stage functions: app.stages.STAGE_FUNCTIONS, or `module:attribute` (tests inject
    fake stages this way, through $PYROLABEL_STAGE_FUNCTIONS or the worker's --stages-from)."""
    import importlib

    ref = ref or os.environ.get(STAGES_REF_ENV) or "app.stages:STAGE_FUNCTIONS"
    module_name, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "STAGE_FUNCTIONS")


# ----------------------------------------------------------------------------------------------
# The worker's body.


def job_log_path(workspace: Workspace, job_id: int) -> Path:
    return workspace.runs_dir / f"job-{job_id}.log"


def job_work_dir(workspace: Workspace, job_id: int) -> Path:
    return workspace.models_dir / f"job-{job_id}"


def run_job(
    workspace: Workspace,
    job_id: int,
    *,
    stage_functions: Mapping[str, StageFunction] | None = None,
) -> str:
    """Run a queued job to its end in this process; returns its final state.

    Every outcome lands in the row: succeeded (with metrics), cancelled (a cancel request,
    Ctrl-C or SIGTERM; checkpoints are kept for a resume) or failed (the error, with the
    traceback in the log).
    """
    stage_functions = stage_functions if stage_functions is not None else load_stage_functions()
    with workspace.transaction() as session:
        job = job_rows.mark_running(session, job_id=job_id, pid=os.getpid())
        options = RetrainOptions.from_dict(job.options)
        results = dict(job.results or {})
        already_cancelled = job.cancel_requested
    log.info("job %d: stages %s (pid %d)", job_id, ", ".join(options.stages), os.getpid())

    reporter = ProgressReporter(workspace, job_id, options.stages)
    if already_cancelled:
        reporter.cancel_flag.set()
    stop_heartbeat = threading.Event()
    heartbeat = threading.Thread(
        target=_heartbeat_loop, args=(reporter, stop_heartbeat), daemon=True
    )
    heartbeat.start()
    previous_sigterm = _sigterm_as_interrupt()
    state, error = JobState.FAILED, None
    try:
        reporter.check_cancel()
        if "dataset_version_id" not in results and set(options.stages) & set(DATASET_STAGES):
            results["dataset_version_id"] = _freeze(workspace, job_id, options)
            _save_results(workspace, job_id, results)

        ctx = StageContext(
            workspace=workspace,
            job_id=job_id,
            options=options,
            results=results,
            work_dir=job_work_dir(workspace, job_id),
            reporter=reporter,
        )
        for stage in options.stages:
            if stage in results:
                log.info("job %d: %s already done, skipped", job_id, stage)
                continue
            reporter.check_cancel()
            if stage not in stage_functions:
                raise RuntimeError(f"no function for stage {stage!r}")
            reporter.start_stage(stage)
            log.info("job %d: stage %s", job_id, stage)
            started = time.monotonic()
            result = dict(stage_functions[stage](ctx) or {})
            result["seconds"] = round(time.monotonic() - started, 2)
            results[stage] = result
            _save_results(workspace, job_id, results)
        state = JobState.SUCCEEDED
    except (JobCancelled, KeyboardInterrupt):
        state = JobState.CANCELLED
        log.warning(
            "job %d cancelled; `pyrolabel retrain --resume %d` continues it", job_id, job_id
        )
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        log.error("job %d failed: %s\n%s", job_id, error, traceback.format_exc())
    finally:
        stop_heartbeat.set()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)

    metrics = results.get("evaluation", {}).get("metrics")
    with workspace.transaction() as session:
        job_rows.finish_job(session, job_id=job_id, state=state, error=error, metrics=metrics)
    log.info("job %d %s", job_id, state)
    return state


def _heartbeat_loop(reporter: ProgressReporter, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            reporter.heartbeat()
        except Exception as err:  # a locked database now and then must not kill the job
            log.warning("heartbeat failed: %s", err)


def _sigterm_as_interrupt():
    """SIGTERM stops the job like Ctrl-C: training saves a checkpoint, the job is cancelled."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _freeze(workspace: Workspace, job_id: int, options: RetrainOptions) -> int:
    from db.curation import freeze_dataset_version

    with workspace.transaction() as session:
        version = freeze_dataset_version(
            session,
            eval_splits=options.eval_splits,
            include_reference=options.train_on_reference,
            name=f"job {job_id}",
        )
        return version.id


def _save_results(workspace: Workspace, job_id: int, results: dict[str, Any]) -> None:
    with workspace.transaction() as session:
        job_rows.save_results(session, job_id=job_id, results=results)


# ----------------------------------------------------------------------------------------------
# Starting and following workers.


def submit_retrain(
    workspace: Workspace,
    options: RetrainOptions,
    *,
    created_by: str | None = None,
    start: bool = True,
) -> Job:
    """Create a retrain job and start its worker; the button and `pyrolabel retrain` both
    call this. With start=False the job waits for `pyrolabel worker ID` (or run_job).

    Raises:
        db.jobs.JobAlreadyRunning: another job is queued or running.
    """
    values = options.to_dict()
    if not start:
        values[job_rows.EXTERNAL_WORKER_KEY] = True
    with workspace.transaction() as session:
        job = job_rows.create_job(session, kind=JOB_KIND, options=values, created_by=created_by)
        session.flush()
        job.log_path = workspace.relative(job_log_path(workspace, job.id))
    if start:
        start_worker(workspace, job.id)
    return job


def resume_retrain(workspace: Workspace, job_id: int, *, start: bool = True) -> Job:
    """Queue a failed or cancelled job again and start its worker."""
    with workspace.transaction() as session:
        job = job_rows.resume_job(session, job_id=job_id)
    if start:
        start_worker(workspace, job_id)
    return job


def cancel_job(workspace: Workspace, job_id: int) -> Job:
    with workspace.transaction() as session:
        return job_rows.request_cancel(session, job_id=job_id)


def worker_command(workspace: Workspace, job_id: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.worker",
        "--detached",
        "--workspace",
        str(workspace.root),
        str(job_id),
    ]


def start_worker(workspace: Workspace, job_id: int) -> subprocess.Popen:
    """Start the worker for a queued job as a detached process (its own session, so a closing
    terminal or a Streamlit restart does not signal it); output goes to runs/job-<id>.log."""
    log_path = job_log_path(workspace, job_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if workspace.db_url != Workspace(workspace.root).db_url:
        # Through the environment, not argv: a URL may hold a password `ps` would show.
        env["PYROLABEL_DB_URL"] = workspace.db_url
    # The worker imports this checkout's packages, whatever the caller's working folder.
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    try:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                worker_command(workspace, job_id),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as err:
        with workspace.transaction() as session:
            job_rows.finish_job(
                session,
                job_id=job_id,
                state=JobState.FAILED,
                error=f"could not start the worker: {err}",
            )
        raise
    with workspace.transaction() as session:
        job_rows.set_worker(
            session, job_id=job_id, pid=process.pid, log_path=workspace.relative(log_path)
        )
    log.info("job %d: worker pid %d, log %s", job_id, process.pid, log_path)
    return process


def follow_job(
    workspace: Workspace,
    job_id: int,
    *,
    on_update: Callable[[Job], None] | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Job:
    """Poll the job row until the job is no longer active; returns the final row.

    A worker that died without a word is noticed here too (the row is reaped), so a follower
    never waits forever.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with workspace.transaction() as session:
            job_rows.reap_dead_jobs(session)
            job = job_rows.get_job(session, job_id)
        if on_update is not None:
            on_update(job)
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s} s")
        time.sleep(poll_s)


def describe(job: Job) -> str:
    """One line about a job, for the command line and the app."""
    parts = [f"job {job.id} {job.state}"]
    if job.stage and job.state in (JobState.QUEUED, JobState.RUNNING):
        parts.append(job.stage)
        if job.epoch:
            parts.append(f"epoch {job.epoch}")
        if job.step:
            parts.append(f"step {job.step}")
        if job.losses:
            parts.append(" ".join(f"{k}={v:.3f}" for k, v in job.losses.items()))
        if job.eta_s is not None:
            parts.append(f"ETA {format_seconds(job.eta_s)} for this stage")
    if job.error:
        parts.append(job.error)
    return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def selected(stages: Iterable[str]) -> list[str]:
    """Stage names from user text in STAGES order ("all" means every stage)."""
    stages = [s.strip() for s in stages if s.strip()]
    if "all" in stages:
        return list(STAGES)
    return RetrainOptions(stages=stages).stages
