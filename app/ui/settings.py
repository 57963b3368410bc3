"""The settings page: the workspace's false-positive reasons, and how to sign reviewers in."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import common
from db import review
from db.review import ReviewError

OIDC_HELP = """
**Signing reviewers in with OIDC.** Store the provider in the workspace's settings (key
`oidc`), for example from Python:

```python
from db.models import Setting
from db.workspace import Workspace

with Workspace("workspace").transaction() as session:
    session.merge(Setting(key="oidc", value={
        "client_id": "...",
        "client_secret": "...",
        "server_metadata_url": "https://id.example.com/.well-known/openid-configuration",
        "redirect_uri": "http://localhost:8501/oauth2callback",
    }))
```

`pyrolabel serve` then hands Streamlit an `[auth]` secrets file readable only by the server,
reviewers log in with the provider, and every decision records their e-mail. Streamlit's
login needs the Authlib package (`pip install "Authlib>=1.3.2"`). An `[auth]` section in
`.streamlit/secrets.toml` of the folder the server starts in works as well.
"""


def settings_page() -> None:
    ws = common.workspace()
    reviewer = common.reviewer_ui()
    common.reviewer_sidebar(reviewer)
    st.title("Settings")

    st.subheader("False-positive reasons")
    st.caption(
        "The order sets the digit shortcuts on the review page (1 = first). Reasons already "
        "used by rejected boxes cannot be removed; untick Active to hide them instead. "
        "The key `other` asks reviewers for a note."
    )
    with ws.session() as session:
        rows = [
            {"key": r.key, "label": r.label, "active": r.active}
            for r in review.false_positive_reasons(session, active_only=False)
        ]
    edited = st.data_editor(
        pd.DataFrame(rows, columns=["key", "label", "active"]),
        num_rows="dynamic",
        hide_index=True,
        key="settings_reasons",
        column_config={
            "key": st.column_config.TextColumn("Key", max_chars=32, required=True),
            "label": st.column_config.TextColumn("Label", max_chars=128, required=True),
            "active": st.column_config.CheckboxColumn("Active", default=True),
        },
    )
    if st.button("Save reasons", type="primary"):
        wanted = [
            (str(r.key).strip(), str(r.label).strip(), bool(r.active))
            for r in edited.itertuples()
            if isinstance(r.key, str) and r.key.strip()
        ]
        try:
            with ws.transaction() as session:
                review.save_false_positive_reasons(session, reasons=wanted)
        except ReviewError as err:
            st.error(str(err))
        else:
            st.cache_data.clear()
            st.success(f"Saved {len(wanted)} reasons.")

    st.subheader("Reviewer sign-in")
    st.markdown(OIDC_HELP)
