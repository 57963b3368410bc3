"""The workspace: one folder holding the database, masks, CAMs, models and job logs.

    pyrolabel.db   SQLite (WAL), unless a database URL points at PostgreSQL
    masks/ cams/   PNG files written by `propose`
    models/        checkpoints
    runs/          logs of commands and jobs

Images stay where they are; the database stores their path and content hash.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db import migrate
from db.models import DEFAULT_FALSE_POSITIVE_REASONS, FalsePositiveReason, LabelClass
from db.session import make_engine, make_session_factory

DEFAULT_CLASSES = ("fire", "smoke")
WORKSPACE_ENV = "PYROLABEL_WORKSPACE"
DB_URL_ENV = "PYROLABEL_DB_URL"
SUBDIRS = ("masks", "cams", "models", "runs")


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
        """Raise WorkspaceError unless the database exists and is at the current schema."""
        if self.is_sqlite and not (self.root / "pyrolabel.db").exists():
            raise WorkspaceError(f"no workspace at {self.root}; run `pyrolabel init` first")
        current = migrate.current_revision(self.engine)
        if current != migrate.head_revision():
            raise WorkspaceError(
                f"workspace {self.root} is at schema {current}, the code expects "
                f"{migrate.head_revision()}; run `pyrolabel init` to upgrade it"
            )

    def classes(self, session: Session | None = None) -> list[str]:
        """The workspace's class names in model order."""
        if session is not None:
            return list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
        with self.session() as own:
            return self.classes(own)
