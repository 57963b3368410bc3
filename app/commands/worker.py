"""`pyrolabel worker JOB_ID`: run a queued job in the foreground (what the detached worker
process does), logging to the terminal and to runs/job-<id>.log.

`pyrolabel retrain` and the app start a worker themselves. This command runs a job queued with
`pyrolabel retrain --no-worker`: under a debugger, or from a batch scheduler on the machine with
the GPU (the workspace must be reachable there, or --db-url point at a shared PostgreSQL).
"""

from __future__ import annotations

import argparse
import sys

from db.workspace import Workspace


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "worker", help="run a queued job in the foreground (the app and retrain start their own)"
    )
    parser.add_argument("job_id", type=int, metavar="JOB_ID")
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    from app.commands.retrain import summary
    from app.worker import run_worker
    from db.jobs import JobError, get_job

    try:
        code = run_worker(workspace, args.job_id, log_to_stderr=False, log_to_file=True)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with workspace.session() as session:
        print(summary(get_job(session, args.job_id)))
    return code
