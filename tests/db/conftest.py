"""Database tests run on every backend: SQLite always, PostgreSQL when
$PYROLABEL_TEST_PG_URL names a server (each test gets a fresh database, dropped afterwards)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_database_url")
