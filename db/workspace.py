"""The workspace: one folder holding the database, masks, CAMs, models and job logs.

    pyrolabel.db   SQLite (WAL), unless a database URL points at PostgreSQL
    masks/ cams/   PNG files written by `propose`
    models/        checkpoints
    runs/          logs of commands and jobs

Images stay where they are; the database stores their path and content hash.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, cached_property
from pathlib import Path

from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import DEFAULT_FALSE_POSITIVE_REASONS, FalsePositiveReason, LabelClass
from db.session import make_engine, make_session_factory

DEFAULT_CLASSES = ("fire", "smoke")
WORKSPACE_ENV = "PYROLABEL_WORKSPACE"
DB_URL_ENV = "PYROLABEL_DB_URL"
SUBDIRS = ("masks", "cams", "models", "runs")
MIGRATION_SCRIPTS = Path(__file__).resolve().parent / "migrations" / "versions"
# Alembic's default, which db/migrations/env.py keeps.
VERSION_TABLE = "alembic_version"

log = logging.getLogger(__name__)


class WorkspaceError(RuntimeError):
    """A workspace that cannot be used as it is; the message says what to run."""


class Workspace:
    """Paths and the database of one workspace.

    Args:
        root: the workspace folder.
        db_url: a SQLAlchemy URL; None means `root/pyrolabel.db` (SQLite).
    """

    def __init__(self, root: str | Path, db_url: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.db_url = db_url or f"sqlite:///{self.root / 'pyrolabel.db'}"

    @classmethod
    def resolve(cls, root: str | Path | None = None, db_url: str | None = None) -> Workspace:
        """The workspace named by the option, else $PYROLABEL_WORKSPACE, else ./workspace."""
        root = root or os.environ.get(WORKSPACE_ENV) or "workspace"
        return cls(root, db_url or os.environ.get(DB_URL_ENV) or None)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def cams_dir(self) -> Path:
        return self.root / "cams"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def relative(self, path: str | Path) -> str:
        """A path inside the workspace as stored in the database (relative, POSIX)."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def absolute(self, stored: str | Path) -> Path:
        """The file a stored path points at (stored paths may be relative to the root)."""
        stored = Path(stored)
        return stored if stored.is_absolute() else self.root / stored

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.db_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    def session(self) -> Session:
        return self.sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits at the end of the block and rolls back on an error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()

    def init(self, classes: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """Create the workspace or upgrade it to the current schema; returns its classes.

        New classes are appended to an existing workspace; removing or reordering classes
        would silently change what trained models mean, so it is refused.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for name in SUBDIRS:
            (self.root / name).mkdir(exist_ok=True)
        from db import migrate  # Alembic: only init needs it (see expected_revision)

        migrate.upgrade(self.engine)
        with self.transaction() as session:
            existing = list(session.scalars(select(LabelClass).order_by(LabelClass.index)))
            names = [c.name for c in existing]
            wanted = list(classes) if classes else (names or list(DEFAULT_CLASSES))
            if names and wanted[: len(names)] != names:
                raise WorkspaceError(
                    f"{self.root} has classes {','.join(names)}; --classes may only append new "
                    f"ones (e.g. --classes {','.join(names)},<new>)"
                )
            for index, name in enumerate(wanted[len(names) :], start=len(names)):
                session.add(LabelClass(name=name, index=index))
            if session.scalar(select(FalsePositiveReason.id).limit(1)) is None:
                for ordinal, (key, label) in enumerate(DEFAULT_FALSE_POSITIVE_REASONS):
                    session.add(FalsePositiveReason(key=key, label=label, ordinal=ordinal))
        return wanted

    def check_ready(self) -> None:
        """Raise WorkspaceError unless the database exists and is at the current schema.

        The review app calls this on every rerun, so it costs one small query: the expected
        revision is read once per process (expected_revision).
        """
        if self.is_sqlite and not (self.root / "pyrolabel.db").exists():
            raise WorkspaceError(f"no workspace at {self.root}; run `pyrolabel init` first")
        current = schema_revision(self.engine)
        expected = expected_revision()
        if current != expected:
            raise WorkspaceError(
                f"workspace {self.root} is at schema {current}, the code expects "
                f"{expected}; run `pyrolabel init` to upgrade it"
            )

    def classes(self, session: Session | None = None) -> list[str]:
        """The workspace's class names in model order."""
        if session is not None:
            return list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
        with self.session() as own:
            return self.classes(own)


def schema_revision(engine: Engine) -> str | None:
    """The migration revision the database is at (Alembic's version table); None before init."""
    with engine.connect() as connection:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        revisions = list(connection.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")))
    if len(revisions) > 1:
        raise WorkspaceError(
            f"the database holds several schema revisions ({', '.join(sorted(revisions))}); "
            "run `pyrolabel init` to upgrade it"
        )
    return revisions[0] if revisions else None


@cache
def expected_revision() -> str:
    """The head revision of db/migrations: the schema this code expects; read once a process.

    Read from the `revision` / `down_revision` assignments of the migration scripts rather
    than through Alembic, whose import takes about 0.25 s on a 2-core machine and would be
    paid by the first page of the review app. Scripts this reading does not understand
    (several heads, a revision that is not a plain string) are left to Alembic.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in sorted(MIGRATION_SCRIPTS.glob("*.py")):
        found = _script_revisions(script)
        if found is None:
            return _alembic_head()
        revision, down = found
        revisions.add(revision)
        parents.update(down)
    heads = revisions - parents
    if len(heads) != 1:
        return _alembic_head()
    return heads.pop()


def _script_revisions(script: Path) -> tuple[str, tuple[str, ...]] | None:
    """(revision, down revisions) assigned at the top of a migration script, else None."""
    values = {}
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                return None
    revision, down = values.get("revision"), values.get("down_revision")
    if not isinstance(revision, str):
        return None
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
        return revision, tuple(down)
    return None


def _alembic_head() -> str:
    from db import migrate

    log.warning("reading the expected schema revision through Alembic")
    return migrate.head_revision()
