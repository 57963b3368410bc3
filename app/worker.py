"""The worker process: `python -m app.worker --workspace DIR JOB_ID` runs one queued job.

app.jobs.start_worker starts it detached, with stdout and stderr appended to the job's log
(`--detached`); `pyrolabel worker JOB_ID` runs the same thing in the foreground, logging to the
terminal and to the job's log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from app.jobs import job_log_path, load_stage_functions, run_job
from db.jobs import JobError
from db.models import JobState
from db.workspace import Workspace, WorkspaceError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_worker(
    workspace: Workspace,
    job_id: int,
    *,
    log_to_stderr: bool,
    log_to_file: bool,
    stages_from: str | None = None,
) -> int:
    """Run the job; returns 0 when it succeeded, 1 when it failed, 3 when it was cancelled.

    log_to_stderr: add a stderr handler (not needed when the caller configured logging).
    log_to_file: append to runs/job-<id>.log (not needed when stderr already goes there).
    """
    # A job is one process: its stages write the job row, freeze the dataset version and
    # register models, so several torchrun ranks would each do all of that. Multi-GPU training
    # goes through `pyrolabel train classifier` and `propose` under torchrun, and
    # core.train_detector (DistributedDataParallel), until the stages learn to leave the
    # database to rank 0.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise JobError(
            f"job {job_id} runs in one process on one device (retrain --device); start "
            f"`pyrolabel worker {job_id}` without torchrun"
        )
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers: list[logging.Handler] = []
    if log_to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_to_file:
        path = job_log_path(workspace, job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    for noisy in ("alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        state = run_job(workspace, job_id, stage_functions=load_stage_functions(stages_from))
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    return {JobState.SUCCEEDED: 0, JobState.CANCELLED: 3}.get(state, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.worker", description=__doc__)
    parser.add_argument("--workspace", required=True, metavar="DIR")
    parser.add_argument("--db-url", metavar="URL", help="default: $PYROLABEL_DB_URL")
    parser.add_argument(
        "--detached", action="store_true", help="stdout and stderr already go to the job's log"
    )
    parser.add_argument("--stages-from", help=argparse.SUPPRESS)  # tests inject fake stages
    parser.add_argument("job_id", type=int)
    args = parser.parse_args(argv)

    workspace = Workspace.resolve(args.workspace, args.db_url)
    try:
        workspace.check_ready()
        return run_worker(
            workspace,
            args.job_id,
            log_to_stderr=True,
            log_to_file=not args.detached,
            stages_from=args.stages_from,
        )
    except (WorkspaceError, JobError) as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        workspace.dispose()


if __name__ == "__main__":
    sys.exit(main())
