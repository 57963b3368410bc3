"""The export page: the formats of `pyrolabel export`, as zip downloads."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from app.ui import common

FORMAT_LABELS = {
    "coco": "COCO JSON",
    "yolo": "YOLO txt",
    "voc": "Pascal VOC XML",
    "masks": "Mask PNGs",
}


def _zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def export_page() -> None:
    ws = common.workspace()
    reviewer = common.reviewer_ui()
    common.reviewer_sidebar(reviewer)
    st.title("Export")
    try:
        from db.export import FORMATS, export_annotations
    except ImportError:
        st.error("This build has no exporter (db/export.py); use `pyrolabel export` instead.")
        return

    st.write(
        "What reviewers accepted or made, plus boxes given with the data. Images are not "
        "copied: COCO records their folder, YOLO lists them in images.txt."
    )
    with st.form("export"):
        fmt = st.selectbox("Format", list(FORMATS), format_func=lambda f: FORMAT_LABELS.get(f, f))
        split = st.text_input("Split", placeholder="every split")
        include_reference = st.checkbox("Include reference labels (held-out truth)")
        include_pending = st.checkbox("Include pending proposals, with their scores")
        submitted = st.form_submit_button("Prepare download", type="primary")
    if submitted:
        with st.spinner("Exporting..."), tempfile.TemporaryDirectory() as tmp:
            report = export_annotations(
                ws,
                fmt,
                Path(tmp) / fmt,
                split=split.strip() or None,
                include_reference=include_reference,
                include_pending=include_pending,
            )
            out = Path(tmp) / fmt
            data = _zip_folder(out) if out.exists() else b""
        st.session_state["export_result"] = (fmt, report.summary(), report.problems, data)

    result = st.session_state.get("export_result")
    if result:
        fmt, summary, problems, data = result
        st.success(summary)
        for problem in problems[:20]:
            st.warning(problem)
        st.download_button(
            f"Download {FORMAT_LABELS.get(fmt, fmt)} (.zip)",
            data=data,
            file_name=f"pyrolabel-{fmt}.zip",
            mime="application/zip",
            icon=":material/download:",
            disabled=not data,
        )
