"""`pyrolabel retrain [options]`: curated set -> teacher -> student -> evaluation, as a job.

It creates the same job the app's Retrain button creates and starts its worker process; by
default it then follows the job row with a progress bar (Ctrl-C cancels the job, which keeps
its checkpoints; `--resume ID` continues it). `--detach` returns at once.
"""

from __future__ import annotations

import argparse
import sys
import time

from db.workspace import Workspace

EXIT_FAILED, EXIT_CANCELLED = 1, 3


def add_parser(subparsers) -> argparse.ArgumentParser:
    from app.jobs import DEFAULT_STAGES, DISTILL_MODES, STAGES, RetrainOptions

    defaults = RetrainOptions()
    parser = subparsers.add_parser(
        "retrain",
        help="train the teacher and the distilled student on the curated set, then evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated, any of {','.join(STAGES)} or all (default: %(default)s)",
    )
    what.add_argument(
        "--teacher",
        default=defaults.teacher,
        help="teacher detector: server or tiny-teacher (default: %(default)s)",
    )
    what.add_argument(
        "--student",
        default=defaults.student,
        help="student detector: edge or tiny-student (default: %(default)s)",
    )
    what.add_argument("--epochs", type=int, help="epochs per training stage (default: its own)")
    what.add_argument("--image-size", type=int, help="longer image side in pixels")
    what.add_argument("--batch-size", type=int, help="images per step")
    what.add_argument(
        "--distill",
        choices=DISTILL_MODES,
        default=defaults.distill,
        help="how the student learns from the teacher (default: %(default)s)",
    )
    what.add_argument(
        "--distill-tau",
        type=float,
        help="distillation temperature (default: 1 for CWD, 2 for KD)",
    )
    what.add_argument(
        "--distill-feature-weight",
        type=float,
        help="weight of CWD's term on each FPN level's features (default: 2; 0 leaves it out)",
    )
    what.add_argument(
        "--distill-logit-weight",
        type=float,
        help="weight of the term on each level's class logits (default: 2; 0 leaves it out)",
    )
    what.add_argument(
        "--eval-split",
        action="append",
        metavar="NAME",
        help="split held out for evaluation, never trained on; repeat for several "
        f"(default: {','.join(defaults.eval_splits)})",
    )
    what.add_argument(
        "--train-on-reference",
        action="store_true",
        help="also train on reference labels (ingest --tags-only) of training splits; off by "
        "default, since reference labels are held-out truth",
    )
    what.add_argument(
        "--score-threshold",
        type=float,
        default=defaults.score_threshold,
        help="a detection at or above it fires, for false-alarm rates (default: %(default)s)",
    )
    what.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU when present)")
    what.add_argument("--seed", type=int, default=defaults.seed)

    how = parser.add_argument_group("running the job")
    follow = how.add_mutually_exclusive_group()
    follow.add_argument(
        "--wait",
        dest="wait",
        action="store_true",
        default=True,
        help="follow the job with a progress bar until it ends (default)",
    )
    follow.add_argument(
        "--detach", dest="wait", action="store_false", help="start the job and return at once"
    )
    follow.add_argument(
        "--no-worker",
        action="store_true",
        help="only queue the job, for `pyrolabel worker JOB_ID` to run (e.g. under a batch "
        "scheduler on the GPU machine)",
    )
    actions = how.add_mutually_exclusive_group()
    actions.add_argument("--resume", type=int, metavar="JOB_ID", help="continue a stopped job")
    actions.add_argument("--cancel", type=int, metavar="JOB_ID", help="stop a running job")
    actions.add_argument("--follow", type=int, metavar="JOB_ID", help="follow a running job")
    actions.add_argument("--list", action="store_true", help="list recent jobs")
    return parser


def _options(args: argparse.Namespace):
    from app.jobs import RetrainOptions, selected

    eval_splits = None
    if args.eval_split:
        eval_splits = [s.strip() for value in args.eval_split for s in value.split(",") if s]
    options = RetrainOptions(
        stages=selected(args.stages.split(",")),
        teacher=args.teacher,
        student=args.student,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        distill=args.distill,
        distill_tau=args.distill_tau,
        distill_feature_weight=args.distill_feature_weight,
        distill_logit_weight=args.distill_logit_weight,
        train_on_reference=args.train_on_reference,
        score_threshold=args.score_threshold,
        device=args.device,
        seed=args.seed,
    )
    if eval_splits:
        options.eval_splits = eval_splits
    from core.detectors import VARIANTS

    for role, variant in (("--teacher", options.teacher), ("--student", options.student)):
        if variant not in VARIANTS:
            raise ValueError(f"{role} {variant!r} is not one of {', '.join(VARIANTS)}")
    return options


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    from app import jobs
    from db import jobs as job_rows

    try:
        if args.list:
            return _list(workspace)
        if args.cancel is not None:
            job = jobs.cancel_job(workspace, args.cancel)
            print(f"job {job.id}: cancel requested ({job.state})")
            return 0
        if args.follow is not None:
            job_id = args.follow
        elif args.resume is not None:
            job = jobs.resume_retrain(workspace, args.resume)
            job_id = job.id
        else:
            job = jobs.submit_retrain(
                workspace, _options(args), created_by="cli", start=not args.no_worker
            )
            job_id = job.id
            if args.no_worker:
                print(f"job {job_id} queued; run it with `pyrolabel worker {job_id}`")
                return 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (job_rows.JobAlreadyRunning, job_rows.JobError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    if not args.wait and args.follow is None:
        print(
            f"job {job_id} started; log {jobs.job_log_path(workspace, job_id)}; "
            f"follow it with `pyrolabel retrain --follow {job_id}`"
        )
        return 0
    return _follow(workspace, job_id)


def _follow(workspace: Workspace, job_id: int) -> int:
    """Show a progress bar until the job ends; Ctrl-C asks the worker to stop."""
    from tqdm import tqdm

    from app import jobs

    started = time.monotonic()
    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}{postfix}]")

    def on_update(job) -> None:
        bar.set_description(f"job {job.id} {job.stage or job.state}")
        bar.update(round(job.progress * 100) - bar.n)
        postfix = []
        if job.epoch:
            postfix.append(f"epoch {job.epoch}")
        if job.step:
            postfix.append(f"step {job.step}")
        if job.losses:
            postfix.append(f"loss {job.losses.get('total', next(iter(job.losses.values()))):.3f}")
        if job.eta_s is not None:
            postfix.append(f"stage ETA {jobs.format_seconds(job.eta_s)}")
        bar.set_postfix_str(", ".join(postfix), refresh=True)

    try:
        try:
            job = jobs.follow_job(workspace, job_id, on_update=on_update)
        except KeyboardInterrupt:
            bar.write(f"stopping job {job_id} (it keeps its checkpoints; Ctrl-C again to leave)")
            jobs.cancel_job(workspace, job_id)
            job = jobs.follow_job(workspace, job_id, on_update=on_update)
    finally:
        bar.close()
    print(summary(job, time.monotonic() - started))
    if job.state == "succeeded":
        return 0
    return EXIT_CANCELLED if job.state == "cancelled" else EXIT_FAILED


def summary(job, seconds: float | None = None) -> str:
    """The one-line summary of a finished job."""
    from app.jobs import format_seconds

    took = f" in {format_seconds(seconds)}" if seconds is not None else ""
    if job.state == "cancelled":
        return f"job {job.id} cancelled{took}; `pyrolabel retrain --resume {job.id}` continues it"
    if job.state == "failed":
        return (
            f"job {job.id} failed{took}: {job.error}; fix it, then "
            f"`pyrolabel retrain --resume {job.id}` (log: {job.log_path})"
        )
    parts = [f"job {job.id} {job.state}{took}"]
    results = job.results or {}
    models = [
        f"{kind} {results[kind]['model_version_id']}"
        for kind in ("teacher", "student")
        if kind in results and "model_version_id" in results[kind]
    ]
    if models:
        parts.append("models " + ", ".join(models))
    for kind, metrics in (job.metrics or {}).items():
        if not isinstance(metrics, dict) or metrics.get("AP50") is None:
            continue
        text = f"{kind} AP50 {metrics['AP50']:.3f}"
        if metrics.get("AP") is not None:
            text += f" AP {metrics['AP']:.3f}"
        alarm = (metrics.get("false_alarm") or {}).get("any", {}).get("rate")
        if alarm is not None:
            text += f" false alarms {alarm:.1%}"
        parts.append(text)
    return "; ".join(parts)


def _list(workspace: Workspace) -> int:
    from app.jobs import describe
    from db.jobs import latest_jobs

    with workspace.session() as session:
        rows = latest_jobs(session)
    for job in reversed(rows):
        when = job.created_at.strftime("%Y-%m-%d %H:%M")
        stages = ",".join((job.options or {}).get("stages", []))
        print(f"{when}  {describe(job)}  [{stages}]")
    print(f"{len(rows)} jobs")
    return 0
