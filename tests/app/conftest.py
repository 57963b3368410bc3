"""Fixtures for the Streamlit pages: a workspace with synthetic proposals and AppTest runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from db.synthetic import SyntheticConfig, SyntheticResult, build_proposals
from db.workspace import DB_URL_ENV, WORKSPACE_ENV

APP_SCRIPT = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
# A script run is well under a second; a loaded 2-core machine may take many times that.
RUN_TIMEOUT_S = 60


@pytest.fixture
def proposals(workspace, monkeypatch) -> SyntheticResult:
    """Five proposed images with two pending boxes each; the app reads this workspace."""
    monkeypatch.setenv(WORKSPACE_ENV, str(workspace.root))
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    return build_proposals(workspace, SyntheticConfig(n_images=5, boxes_per_image=2, seed=11))


def _run_page(name: str) -> None:
    import importlib

    module = importlib.import_module(f"app.ui.{name}")
    getattr(module, f"{name}_page")()


@pytest.fixture
def app_for(proposals) -> Callable:
    """app_for("alice"): the app as that reviewer (name given in the URL), run once.

    page="dataset" runs that page alone (app/ui/dataset.py: dataset_page).
    """
    from streamlit.testing.v1 import AppTest

    def make(reviewer: str | None = "alice", page: str | None = None) -> AppTest:
        if page is None:
            at = AppTest.from_file(str(APP_SCRIPT), default_timeout=RUN_TIMEOUT_S)
        else:
            # AppTest switches between file pages only; ours are functions, so run one alone.
            at = AppTest.from_function(_run_page, args=(page,), default_timeout=RUN_TIMEOUT_S)
        if reviewer:
            at.query_params["reviewer"] = reviewer
        return at.run()

    return make
