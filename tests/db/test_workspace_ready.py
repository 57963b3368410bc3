"""Workspace.check_ready: the schema check the review app runs on every rerun."""

from __future__ import annotations

import pytest

from db import migrate
from db.workspace import Workspace, WorkspaceError, expected_revision, schema_revision


def test_expected_revision_is_alembics_head():
    assert expected_revision() == migrate.head_revision()


def test_ready_workspace_passes(workspace):
    workspace.check_ready()
    assert schema_revision(workspace.engine) == expected_revision()


def test_missing_workspace_names_init(tmp_path):
    with pytest.raises(WorkspaceError, match="run `pyrolabel init` first"):
        Workspace(tmp_path / "nowhere").check_ready()


def test_empty_database_names_init(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    with ws.engine.connect():
        pass  # creates an empty pyrolabel.db
    assert schema_revision(ws.engine) is None
    with pytest.raises(WorkspaceError, match="at schema None.*run `pyrolabel init` to upgrade"):
        ws.check_ready()
    ws.dispose()


def test_old_schema_fails_until_upgraded(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    migrate.upgrade(ws.engine, "0001")
    # The expected revision is cached for the process; a workspace behind it still fails.
    expected_revision()
    with pytest.raises(WorkspaceError, match="at schema 0001, the code expects"):
        ws.check_ready()
    ws.init()
    ws.check_ready()
    ws.dispose()
