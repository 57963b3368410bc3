"""`pyrolabel serve [--port N] [--host 127.0.0.1]`: the review app, in a browser on this machine.

Runs `streamlit run app/streamlit_app.py` in a child process, headless, without usage
statistics or a file watcher, with the workspace passed through $PYROLABEL_WORKSPACE and
$PYROLABEL_DB_URL. When the workspace has an "oidc" setting, Streamlit gets an [auth] secrets
file (readable only by this user, removed on exit) and reviewers sign in with st.login.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from db.workspace import DB_URL_ENV, WORKSPACE_ENV, Workspace

APP_SCRIPT = Path(__file__).resolve().parent.parent / "streamlit_app.py"
OIDC_SETTING = "oidc"
_OIDC_REQUIRED = ("client_id", "client_secret", "server_metadata_url")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="start the review app on 127.0.0.1",
        description="Start the review app (Streamlit) for this workspace. Stop it with Ctrl+C.",
    )
    parser.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens the "
        "app to the network, so configure OIDC sign-in first)",
    )
    return parser


def streamlit_command(host: str, port: int, secrets_file: Path | None = None) -> list[str]:
    """The `streamlit run` command line for the app."""
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
    if secrets_file is not None:
        command += ["--secrets.files", str(secrets_file)]
    return command


def app_environment(workspace: Workspace) -> dict[str, str]:
    env = dict(os.environ)
    env[WORKSPACE_ENV] = str(workspace.root)
    if workspace.db_url != Workspace(workspace.root).db_url:
        env[DB_URL_ENV] = workspace.db_url
    else:
        env.pop(DB_URL_ENV, None)
    return env


def _oidc_settings(workspace: Workspace, port: int) -> dict[str, str] | None:
    """The workspace's OIDC provider with the defaults Streamlit needs filled in, or None."""
    from db.models import Setting

    with workspace.transaction() as session:
        setting = session.get(Setting, OIDC_SETTING)
        if setting is None or not setting.value:
            return None
        value = dict(setting.value)
        missing = [key for key in _OIDC_REQUIRED if not value.get(key)]
        if missing:
            raise SystemExit(
                f"error: the workspace's oidc setting lacks {', '.join(missing)}; "
                "see the Settings page of the app"
            )
        value.setdefault("redirect_uri", f"http://localhost:{port}/oauth2callback")
        if not value.get("cookie_secret"):
            # Kept in the workspace so a restart does not sign every reviewer out.
            value["cookie_secret"] = secrets.token_urlsafe(32)
            setting.value = value
    return {key: str(v) for key, v in value.items()}


def _write_secrets(folder: Path, auth: dict[str, str]) -> Path:
    path = folder / "secrets.toml"
    # JSON string literals are valid TOML basic strings.
    lines = ["[auth]"] + [f"{key} = {json.dumps(value)}" for key, value in sorted(auth.items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def launch(
    workspace: Workspace,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    secrets_file: Path | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """Start the app for `workspace` in a child process (tests and benches use this too)."""
    command = streamlit_command(host, port, secrets_file)
    return subprocess.Popen(command, env=app_environment(workspace), **popen_kwargs)


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Return once Streamlit answers its health check at `url`; raise if it exits or stalls."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the review app exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"the review app did not answer at {url} within {timeout_s:.0f} s")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    if not _port_free(args.host, args.port):
        print(
            f"error: port {args.port} on {args.host} is in use; pass another with --port",
            file=sys.stderr,
        )
        return 2
    auth = _oidc_settings(workspace, args.port)
    with tempfile.TemporaryDirectory(prefix="pyrolabel-serve-") as private:
        secrets_file = _write_secrets(Path(private), auth) if auth else None
        print(
            f"review app for {workspace.root} on http://{args.host}:{args.port} "
            f"({'OIDC sign-in' if auth else 'reviewers give their name'}); Ctrl+C stops it",
            flush=True,
        )
        process = launch(workspace, host=args.host, port=args.port, secrets_file=secrets_file)
        # A service manager stops us with SIGTERM: take the app down with us, as on Ctrl+C,
        # instead of leaving it orphaned on the port.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            print("review app stopped")
            return 0
    print(f"review app exited with code {code}")
    return code
