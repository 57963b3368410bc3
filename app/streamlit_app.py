"""The pyrolabel review app: `pyrolabel serve` runs `streamlit run` on this file.

Each page is a function in app/ui/<name>.py. To add one (say a Models page), write
`models_page()` in app/ui/models.py and add `st.Page(models_page, title="Models",
icon=":material/model_training:", url_path="models")` to PAGES below; the page gets the
workspace from app.ui.common.workspace() and the reviewer from app.ui.common.reviewer_ui().
"""

from __future__ import annotations

import streamlit as st

from app.ui.dataset import dataset_page
from app.ui.export import export_page
from app.ui.models import models_page
from app.ui.review import review_page
from app.ui.settings import settings_page

PAGES = [
    st.Page(
        review_page, title="Review", icon=":material/rate_review:", url_path="review", default=True
    ),
    st.Page(dataset_page, title="Dataset", icon=":material/bar_chart:", url_path="dataset"),
    st.Page(export_page, title="Export", icon=":material/download:", url_path="export"),
    st.Page(models_page, title="Models", icon=":material/model_training:", url_path="models"),
    st.Page(settings_page, title="Settings", icon=":material/settings:", url_path="settings"),
]


def main() -> None:
    st.set_page_config(
        page_title="pyrolabel", page_icon=":material/local_fire_department:", layout="wide"
    )
    st.navigation(PAGES).run()


main()
