"""Database tests run on every backend: SQLite always, PostgreSQL when $PYROLABEL_TEST_PG_URL
names a server. Either way each test's `workspace` starts empty (classes fire, smoke)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_workspace_url")
