"""Browser tests: `pyrolabel serve` on a free loopback port, driven by Playwright and chromium.

Debian's chromium at /usr/bin/chromium (`.ci/run` installs it); `playwright install` is never
needed. A failing test leaves a screenshot and the server log under test-artifacts/.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.commands import serve
from db.synthetic import SyntheticConfig, build_proposals
from db.workspace import Workspace

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Streamlit starts in a few seconds, far longer on a loaded 2-core machine.
SERVER_START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ReviewServer:
    url: str
    workspace: Workspace
    log_path: Path
    process: subprocess.Popen


def start_server(workspace: Workspace, log_path: Path) -> ReviewServer:
    """`pyrolabel serve` on a free port; returns once Streamlit answers its health check."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - the child process writes it until stopped
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--workspace", str(workspace.root), "serve"]
        + ["--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        serve.wait_until_ready(url, process, SERVER_START_TIMEOUT_S)
    except RuntimeError as err:
        process.terminate()
        raise RuntimeError(f"{err}:\n{log_path.read_text()}") from err
    return ReviewServer(url, workspace, log_path, process)


def stop_server(server: ReviewServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def review_server(tmp_path_factory) -> Iterator[ReviewServer]:
    """A workspace with 6 synthetic proposed images (2 pending boxes each) and its server."""
    root = tmp_path_factory.mktemp("e2e") / "workspace"
    workspace = Workspace(root)
    workspace.init(["fire", "smoke"])
    build_proposals(workspace, SyntheticConfig(n_images=6, boxes_per_image=2, seed=5))
    ARTIFACTS.mkdir(exist_ok=True)
    server = start_server(workspace, root.parent / "serve.log")
    yield server
    stop_server(server)
    workspace.dispose()


@pytest.fixture
def page(browser, review_server, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        name = request.node.name.replace("/", "_")
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        shutil.copyfile(review_server.log_path, ARTIFACTS / f"{name}-serve.log")
    context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
