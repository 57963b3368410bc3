"""The dataset page: what the workspace holds and how far review has come, as charts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import common
from db import review, stats


@st.cache_data(ttl=15, show_spinner="Counting...")
def _overview(db_url: str) -> stats.Overview:
    # One GROUP BY per table: a second at 300 000 boxes, so several reruns share one count.
    with common.workspace().session() as session:
        return stats.overview(session)


@st.cache_data(ttl=60, show_spinner=False)
def _reason_labels(db_url: str) -> dict[str, str]:
    with common.workspace().session() as session:
        labels = {r.key: r.label for r in review.false_positive_reasons(session, active_only=False)}
    labels[""] = "nothing here (no reason)"
    return labels


def dataset_page() -> None:
    ws = common.workspace()
    reviewer = common.reviewer_ui()
    common.reviewer_sidebar(reviewer)
    st.title("Dataset")
    if st.button("Refresh counts", icon=":material/refresh:"):
        _overview.clear()
    overview = _overview(ws.db_url)

    cols = st.columns(5)
    cols[0].metric("Images", f"{overview.images:,}")
    cols[1].metric("With proposals", f"{overview.proposed_images:,}")
    cols[2].metric("Reviewed", f"{overview.reviewed_images:,}")
    cols[3].metric("With pending boxes", f"{overview.pending_images:,}")
    cols[4].metric("Points", f"{overview.points:,}")
    if overview.proposed_images:
        done = min(overview.reviewed_images / overview.proposed_images, 1.0)
        st.progress(done, text=f"Review progress: {done:.0%} of proposed images touched")

    boxes = pd.DataFrame(overview.boxes, columns=["class", "status", "origin", "count"])
    left, right = st.columns(2)
    with left:
        st.subheader("Boxes by class and status")
        if boxes.empty:
            st.caption("No boxes yet.")
        else:
            by_status = boxes.pivot_table(
                index="class", columns="status", values="count", aggfunc="sum", fill_value=0
            )
            st.bar_chart(by_status, horizontal=True)
    with right:
        st.subheader("Boxes by origin")
        if not boxes.empty:
            by_origin = boxes.pivot_table(
                index="origin", columns="class", values="count", aggfunc="sum", fill_value=0
            )
            st.bar_chart(by_origin, horizontal=True)

    left, right = st.columns(2)
    with left:
        st.subheader("Images by split")
        splits = pd.DataFrame(
            {"images": list(overview.images_by_split.values())},
            index=list(overview.images_by_split),
        )
        if splits.empty:
            st.caption("No images yet.")
        else:
            st.bar_chart(splits)
    with right:
        st.subheader("False positives by reason")
        labels = _reason_labels(ws.db_url)
        if not overview.fp_by_reason:
            st.caption("No box rejected yet.")
        else:
            reasons = pd.DataFrame(
                {"boxes": list(overview.fp_by_reason.values())},
                index=[labels.get(k, k) for k in overview.fp_by_reason],
            )
            st.bar_chart(reasons, horizontal=True)

    st.subheader("Reviewer throughput (decisions per day, last 30 days)")
    throughput = pd.DataFrame(overview.throughput, columns=["reviewer", "day", "decisions"])
    if throughput.empty:
        st.caption("No decisions yet.")
    else:
        per_day = throughput.pivot_table(
            index="day", columns="reviewer", values="decisions", aggfunc="sum", fill_value=0
        )
        st.bar_chart(per_day)
        totals = throughput.groupby("reviewer")["decisions"].sum().sort_values(ascending=False)
        st.dataframe(totals.rename("decisions"), width="content")

    st.subheader("Images by class (tags)")
    tags = pd.DataFrame(overview.tags, columns=["class", "origin", "present", "count"])
    if tags.empty:
        st.caption("No tags yet.")
    else:
        # Given tags come with the data, model tags from the classifier, reviewer tags win.
        # (No colon in the names: the chart library reads "a:b" as a field and its type.)
        present = tags["present"].map({True: "present", False: "absent"})
        tags["tag"] = present + " (" + tags["origin"] + ")"
        by_class = tags.pivot_table(
            index="class", columns="tag", values="count", aggfunc="sum", fill_value=0
        )
        st.bar_chart(by_class, horizontal=True, stack=False)
        with st.expander("Tag counts"):
            st.dataframe(tags.drop(columns="tag"), hide_index=True, width="content")
