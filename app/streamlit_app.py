"""The pyrolabel review app: `pyrolabel serve` runs `streamlit run` on this file.

Each page is a function `<name>_page()` in app/ui/<name>.py. To add one (say a Models page),
write `models_page()` in app/ui/models.py and add `st.Page(_page("models"), title="Models",
icon=":material/model_training:", url_path="models")` to PAGES below; the page gets the
workspace from app.ui.common.workspace() and the reviewer from app.ui.common.reviewer_ui().

A page's module is imported when the page first runs, not here: the dataset, models and
settings pages need pandas (about half a second to import on a 2-core machine), which the
review page, the first one every reviewer sees, does without.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import streamlit as st


def _page(name: str) -> Callable[[], None]:
    """The page function `<name>_page` of app/ui/<name>.py, imported on its first run."""

    def run() -> None:
        getattr(importlib.import_module(f"app.ui.{name}"), f"{name}_page")()

    run.__name__ = f"{name}_page"
    return run


PAGES = [
    st.Page(
        _page("review"),
        title="Review",
        icon=":material/rate_review:",
        url_path="review",
        default=True,
    ),
    st.Page(_page("dataset"), title="Dataset", icon=":material/bar_chart:", url_path="dataset"),
    st.Page(_page("export"), title="Export", icon=":material/download:", url_path="export"),
    st.Page(_page("models"), title="Models", icon=":material/model_training:", url_path="models"),
    st.Page(_page("settings"), title="Settings", icon=":material/settings:", url_path="settings"),
]


def main() -> None:
    st.set_page_config(
        page_title="pyrolabel", page_icon=":material/local_fire_department:", layout="wide"
    )
    st.navigation(PAGES).run()


main()
