"""The Models page: retrain with one click, follow the job live, compare what it produced.

The Retrain button creates the same job as `pyrolabel retrain` (app.jobs.submit_retrain); the
training runs in a worker process, so this page only reads the job row, every two seconds,
in a fragment that reruns on its own.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy import select

from app import jobs
from app.ui import common
from db import jobs as job_rows
from db.models import FalsePositiveReason, Image, Job, JobState, ModelVersion
from db.workspace import Workspace

DETECTOR_KINDS = ("teacher", "student")
LOG_TAIL_LINES = 40


def models_page() -> None:
    ws = common.workspace()
    reviewer = common.reviewer_ui()
    common.reviewer_sidebar(reviewer)
    st.title("Models")

    retrain_panel(ws, reviewer)

    versions = _model_versions(ws)
    detectors = [v for v in versions if v.kind in DETECTOR_KINDS]
    st.header("Versions")
    if not versions:
        st.info("No model yet: start a retrain above once reviewers have accepted some boxes.")
        return
    st.dataframe(versions_table(versions), hide_index=True, width="stretch")
    scored = [v for v in detectors if v.metrics and v.metrics.get("eval_images") is not None]
    if scored:
        comparison_ui(ws, scored)
    jobs_history(ws)


# ----------------------------------------------------------------------------------------------
# Retrain: the form, the live progress, resume.


def retrain_panel(ws: Workspace, reviewer: str) -> None:
    with ws.transaction() as session:
        # A worker that died would otherwise show as running until the next retrain.
        job_rows.reap_dead_jobs(session)
        active = job_rows.active_job(session)
        last = next(iter(job_rows.latest_jobs(session, limit=1)), None)
    st.header("Retrain")
    if active is not None:
        job_progress(ws, active.id)
        return

    if last is not None and last.state in (JobState.FAILED, JobState.CANCELLED):
        stopped_job_ui(ws, last)
    options = retrain_options_ui(_splits(ws))
    if options is None:
        return
    try:
        job = jobs.submit_retrain(ws, options, created_by=reviewer)
    except job_rows.JobAlreadyRunning as err:
        st.error(str(err))
        return
    except OSError as err:
        st.error(f"could not start the worker process: {err}")
        return
    st.toast(f"Job {job.id} started")
    st.rerun()


@st.cache_resource(show_spinner=False)
def _has_gpu() -> bool:
    """Whether the worker will find a GPU here (the worker runs on this machine); torch is
    imported once per server for it."""
    import torch

    return torch.cuda.is_available()


def retrain_options_ui(splits: list[str]) -> jobs.RetrainOptions | None:
    """The Retrain form; returns the chosen options once the button is pressed."""
    defaults = jobs.RetrainOptions()
    with st.form("retrain"):
        stages = st.multiselect(
            "Stages",
            jobs.STAGES,
            default=list(jobs.DEFAULT_STAGES),
            help="classifier and proposals make new pseudo boxes for review; teacher, student "
            "and evaluation train the detectors on what reviewers accepted",
        )
        left, middle, right = st.columns(3)
        # server + edge train for hours on a CPU: there the tiny pair (minutes) comes first.
        pair = 0 if _has_gpu() else 1
        cpu_note = None if pair == 0 else "no GPU here: the tiny pair trains in minutes on a CPU"
        teacher = left.selectbox("Teacher", jobs.TEACHER_VARIANTS, index=pair, help=cpu_note)
        student = middle.selectbox("Student", jobs.STUDENT_VARIANTS, index=pair, help=cpu_note)
        distill = right.selectbox(
            "Distillation",
            jobs.DISTILL_MODES,
            format_func={"cwd": "channel-wise (CWD)", "kd": "logits (KD)", "none": "none"}.get,
        )
        epochs = left.number_input("Epochs (0: each stage's default)", min_value=0, value=0)
        image_size = middle.number_input(
            "Image size (0: each model's default)", min_value=0, value=0, step=32
        )
        eval_splits = right.multiselect(
            "Evaluation splits",
            splits,
            default=[s for s in defaults.eval_splits if s in splits],
            help="held out: never trained on, scored after training",
        )
        # Empty keeps core.distill's defaults (temperature 1 for CWD, 2 for KD; weights 2).
        tau = left.number_input(
            "Distillation temperature",
            min_value=0.1,
            value=None,
            step=0.5,
            placeholder="default",
            help="CWD's softmax over positions (KD's over classes) is taken at this temperature",
        )
        feature_weight = middle.number_input(
            "CWD feature weight",
            min_value=0.0,
            value=None,
            step=0.5,
            placeholder="default (2)",
            help="0 leaves the feature term out",
        )
        logit_weight = right.number_input(
            "Logit weight",
            min_value=0.0,
            value=None,
            step=0.5,
            placeholder="default (2)",
            help="0 leaves the logit term out",
        )
        train_on_reference = st.checkbox(
            "Also train on reference labels of training splits",
            help="reference labels (ingest --tags-only) are held-out truth; off by default",
        )
        submitted = st.form_submit_button("Retrain", type="primary", icon=":material/play_arrow:")
    if not submitted:
        return None
    if not stages:
        st.error("Choose at least one stage.")
        return None
    return jobs.RetrainOptions(
        stages=stages,
        teacher=teacher,
        student=student,
        distill=distill,
        distill_tau=tau,
        distill_feature_weight=feature_weight,
        distill_logit_weight=logit_weight,
        epochs=int(epochs) or None,
        image_size=int(image_size) or None,
        eval_splits=eval_splits,
        train_on_reference=train_on_reference,
    )


@st.fragment(run_every=2)
def job_progress(ws: Workspace, job_id: int) -> None:
    """The running job, redrawn every two seconds; the whole page reruns once it ends."""
    with ws.transaction() as session:
        job_rows.reap_dead_jobs(session)
        job = job_rows.get_job(session, job_id)
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        st.rerun(scope="app")

    stages = ", ".join((job.options or {}).get("stages", []))
    st.progress(job.progress, text=f"Job {job.id} {job.state}: {job.stage or 'starting'}")
    cols = st.columns(4)
    cols[0].metric("Stage", job.stage or "-")
    cols[1].metric("Epoch", job.epoch or "-")
    cols[2].metric("Step", job.step or "-")
    eta = jobs.format_seconds(job.eta_s) if job.eta_s is not None else "-"
    cols[3].metric("Stage ETA", eta)
    if job.losses:
        losses = pd.DataFrame({"loss": list(job.losses.values())}, index=list(job.losses))
        st.dataframe(losses.T, width="stretch")
    st.caption(f"Stages: {stages}. Started by {job.created_by or 'unknown'}. Log: {job.log_path}")
    if job.cancel_requested:
        st.info("Cancel requested; the worker stops after its current step.")
    elif st.button("Cancel job", key=f"cancel_{job.id}", icon=":material/stop:"):
        jobs.cancel_job(ws, job.id)
        st.rerun(scope="fragment")


def stopped_job_ui(ws: Workspace, job: Job) -> None:
    """The last job failed or was cancelled: why, its log, and a way to continue it."""
    if job.state == JobState.FAILED:
        st.error(f"Job {job.id} failed: {job.error}")
    else:
        st.warning(f"Job {job.id} was cancelled.")
    if job.log_path:
        path = ws.absolute(job.log_path)
        if path.is_file():
            with st.expander("Log (last lines)"):
                lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                st.code("\n".join(lines), language=None)
    if st.button(
        f"Resume job {job.id}",
        key=f"resume_{job.id}",
        icon=":material/replay:",
        help="continue from its last checkpoint; finished stages are not run again",
    ):
        try:
            jobs.resume_retrain(ws, job.id)
        except (job_rows.JobAlreadyRunning, job_rows.JobError) as err:
            st.error(str(err))
            return
        st.rerun()


# ----------------------------------------------------------------------------------------------
# Versions and their numbers.


def _model_versions(ws: Workspace) -> list[ModelVersion]:
    with ws.session() as session:
        return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def _splits(ws: Workspace) -> list[str]:
    with ws.session() as session:
        return sorted(session.scalars(select(Image.split).distinct()))


def _reason_labels(ws: Workspace) -> dict[str, str]:
    with ws.session() as session:
        rows = session.execute(select(FalsePositiveReason.key, FalsePositiveReason.label))
        return {key: label for key, label in rows}


def _label(version: ModelVersion) -> str:
    return f"{version.kind} {version.id} ({version.arch})"


def versions_table(versions: list[ModelVersion]) -> pd.DataFrame:
    rows = []
    for version in versions:
        metrics = version.metrics or {}
        alarm = (metrics.get("false_alarm") or {}).get("any", {}).get("rate")
        rows.append(
            {
                "id": version.id,
                "kind": version.kind,
                "arch": version.arch,
                "created": version.created_at.strftime("%Y-%m-%d %H:%M"),
                "job": version.job_id,
                "dataset version": version.dataset_version_id,
                "teacher": version.parent_id,
                "AP": metrics.get("AP"),
                "AP50": metrics.get("AP50"),
                "false alarms (fire-free images)": alarm,
                "evaluated images": metrics.get("eval_images"),
            }
        )
    return pd.DataFrame(rows)


def _default_comparison(scored: list[ModelVersion]) -> list[int]:
    """The newest student and the teacher it learned from, else the newest two."""
    students = [v for v in scored if v.kind == "student"]
    if students:
        chosen = [students[0].id]
        if any(v.id == students[0].parent_id for v in scored):
            chosen.insert(0, students[0].parent_id)
        return chosen
    return [v.id for v in scored[:2]]


def comparison_ui(ws: Workspace, scored: list[ModelVersion]) -> None:
    st.header("Compare")
    by_id = {v.id: v for v in scored}
    chosen_ids = st.multiselect(
        "Versions",
        list(by_id),
        default=_default_comparison(scored),
        format_func=lambda i: _label(by_id[i]),
    )
    chosen = [by_id[i] for i in chosen_ids]
    if not chosen:
        return

    # Headline numbers; with a teacher and a student, the student's gap to its teacher.
    teacher = next((v for v in chosen if v.kind == "teacher"), None)
    cols = st.columns(len(chosen))
    for col, version in zip(cols, chosen, strict=True):
        metrics = version.metrics
        delta = None
        if teacher is not None and version.kind == "student" and _both(metrics, teacher, "AP50"):
            delta = f"{metrics['AP50'] - teacher.metrics['AP50']:+.3f} vs teacher"
        col.metric(f"{_label(version)}: AP50", _number(metrics.get("AP50")), delta=delta)
        alarm = (metrics.get("false_alarm") or {}).get("any", {})
        col.caption(
            f"AP {_number(metrics.get('AP'))}; false alarms on fire-free images "
            f"{_percent(alarm.get('rate'))} ({alarm.get('false_alarms', 0)} of "
            f"{alarm.get('images', 0)}); {metrics.get('eval_images', 0)} evaluated images"
        )

    st.subheader("AP per class")
    st.dataframe(per_class_table(chosen), width="stretch")

    left, right = st.columns(2)
    with left:
        st.subheader("Precision-recall (IoU 0.5)")
        curves = pr_curves_frame(chosen)
        if curves.empty:
            st.caption("No evaluation images with boxes.")
        else:
            st.line_chart(curves, x="recall", y=[c for c in curves.columns if c != "recall"])
    with right:
        st.subheader("Rejected false positives that still fire")
        still = still_fire_frame(chosen, _reason_labels(ws))
        if still.empty:
            st.caption("No box was rejected as a false positive in these models' dataset.")
        else:
            st.bar_chart(still, horizontal=True, stack=False)
            st.caption(
                "Share of images whose rejected box, per reason, still gets a box of its class "
                "(same spot, score at or above the job's threshold)."
            )

    st.subheader("False-alarm rate per class")
    st.dataframe(false_alarm_table(chosen), width="stretch")


def per_class_table(chosen: list[ModelVersion]) -> pd.DataFrame:
    """Rows: classes; columns: (model, AP) and (model, AP50)."""
    data: dict[tuple[str, str], dict[str, Any]] = {}
    for version in chosen:
        for name, values in (version.metrics.get("per_class") or {}).items():
            for key in ("AP", "AP50"):
                data.setdefault((_label(version), key), {})[name] = values.get(key)
    return pd.DataFrame(data)


def false_alarm_table(chosen: list[ModelVersion]) -> pd.DataFrame:
    data: dict[str, dict[str, Any]] = {}
    for version in chosen:
        for name, values in (version.metrics.get("false_alarm") or {}).items():
            label = "fire-free images (any class)" if name == "any" else name
            data.setdefault(_label(version), {})[label] = values.get("rate")
    return pd.DataFrame(data)


def pr_curves_frame(chosen: list[ModelVersion]) -> pd.DataFrame:
    """One "recall" column and a precision column per (model, class)."""
    frame = pd.DataFrame()
    for version in chosen:
        for name, curve in (version.metrics.get("pr_curves") or {}).items():
            if "recall" not in frame:
                frame["recall"] = curve["recall"]
            frame[f"{_label(version)} {name}"] = curve["precision"]
    return frame


def still_fire_frame(chosen: list[ModelVersion], labels: dict[str, str]) -> pd.DataFrame:
    """Rows: false-positive reasons; columns: models; values: share that still fires."""
    data: dict[str, dict[str, float]] = {}
    for version in chosen:
        for reason, counts in (version.metrics.get("rejected_still_fire") or {}).items():
            data.setdefault(_label(version), {})[labels.get(reason, reason)] = counts["rate"]
    return pd.DataFrame(data)


def jobs_history(ws: Workspace) -> None:
    with ws.session() as session:
        recent = job_rows.latest_jobs(session, limit=10)
    if not recent:
        return
    st.header("Jobs")
    rows = []
    for job in recent:
        took = None
        if job.started_at and job.finished_at:
            took = jobs.format_seconds((job.finished_at - job.started_at).total_seconds())
        rows.append(
            {
                "job": job.id,
                "state": job.state,
                "stages": ", ".join((job.options or {}).get("stages", [])),
                "by": job.created_by,
                "created": job.created_at.strftime("%Y-%m-%d %H:%M"),
                "took": took,
                "error": job.error,
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _both(metrics: dict[str, Any], other: ModelVersion, key: str) -> bool:
    return metrics.get(key) is not None and (other.metrics or {}).get(key) is not None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
