"""What every page shares: the workspace, the reviewer's name, and the overlay cache.

The workspace comes from $PYROLABEL_WORKSPACE / $PYROLABEL_DB_URL, which `pyrolabel serve`
sets for the Streamlit process.

Who is reviewing:
- With OIDC configured (an [auth] section in Streamlit's secrets; `pyrolabel serve` writes one
  from the workspace Setting "oidc"), the reviewer logs in with st.login and is known by the
  e-mail (else name) the provider returns.
- Otherwise the reviewer types a name on entry. It is kept in the URL (?reviewer=NAME), so a
  reload or a bookmark skips the question. This is attribution, not access control; a team
  that needs the latter configures OIDC.
"""

from __future__ import annotations

import logging
import os

import streamlit as st

from app.ui.overlays import OverlayCache
from db.workspace import DB_URL_ENV, WORKSPACE_ENV, Workspace, WorkspaceError

log = logging.getLogger(__name__)

REVIEWER_KEY = "reviewer"


@st.cache_resource(show_spinner=False)
def _workspace(root: str | None, db_url: str | None) -> Workspace:
    return Workspace.resolve(root, db_url)


def workspace() -> Workspace:
    """The workspace this server was started for; stops the page with the fix when not ready."""
    ws = _workspace(os.environ.get(WORKSPACE_ENV), os.environ.get(DB_URL_ENV))
    try:
        ws.check_ready()
    except WorkspaceError as err:
        st.error(str(err))
        st.stop()
    return ws


@st.cache_resource(show_spinner=False)
def overlay_cache() -> OverlayCache:
    """One cache of rendered base layers for all sessions of this server."""
    return OverlayCache()


def auth_configured() -> bool:
    """Whether Streamlit's secrets hold an [auth] section (OIDC login)."""
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, st.errors.StreamlitSecretNotFoundError):
        return False


def reviewer_ui() -> str:
    """The reviewer's name; asks for it (or for an OIDC login) first and stops until given."""
    if st.session_state.get(REVIEWER_KEY):
        return st.session_state[REVIEWER_KEY]

    if auth_configured():
        if not st.user.is_logged_in:
            st.title("pyrolabel")
            st.write("This workspace signs reviewers in through its identity provider.")
            st.button("Log in", on_click=_login, type="primary")
            st.stop()
        name = st.user.get("email") or st.user.get("name") or st.user.get("sub")
        st.session_state[REVIEWER_KEY] = str(name)
        return st.session_state[REVIEWER_KEY]

    name = (st.query_params.get(REVIEWER_KEY) or "").strip()
    if not name:
        st.title("pyrolabel")
        with st.form("reviewer_form"):
            typed = st.text_input("Your name", help="Recorded with every decision you make.")
            submitted = st.form_submit_button("Start reviewing", type="primary")
        if not (submitted and typed.strip()):
            st.stop()
        name = typed.strip()
    st.session_state[REVIEWER_KEY] = name
    st.query_params[REVIEWER_KEY] = name
    return name


def _login() -> None:
    try:
        st.login()
    except st.errors.StreamlitAPIException as err:
        # Most often Authlib is missing; Streamlit's message names the package to install.
        st.session_state["login_error"] = str(err)


def reviewer_sidebar(name: str) -> None:
    """Who is signed in, and the way out."""
    with st.sidebar:
        st.caption(f"Reviewer: **{name}**")
        if auth_configured() and st.user.is_logged_in:
            st.button("Log out", on_click=st.logout)
        elif st.button("Change name", key="change_reviewer"):
            st.session_state.pop(REVIEWER_KEY, None)
            st.query_params.pop(REVIEWER_KEY, None)
            st.rerun()
        if st.session_state.get("login_error"):
            st.error(st.session_state["login_error"])
