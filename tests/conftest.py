"""Shared fixtures for every test.

shared_data   Path of ../shared/data (the real development sets); skips when absent.
pg_server_url The PostgreSQL server of $PYROLABEL_TEST_PG_URL; skips when unset.
pg_database_url  A fresh empty database on that server, dropped after the test.
pg_workspace_url A database holding an empty, migrated workspace schema (emptied per test).
db_url        None (SQLite in the workspace). tests/db/conftest.py parametrises it over
              SQLite and PostgreSQL, so database tests run on both backends.
workspace     A fresh, initialised Workspace (classes fire, smoke) in tmp_path.
make_image    Factory: make_image(path, size=(w, h), color=None, ...) writes a small image.
tiny_dataset  Six generated images with YOLO labels, a classes file and a tags CSV.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PG_URL_ENV = "PYROLABEL_TEST_PG_URL"
TEST_CLASSES = ("fire", "smoke")
# Set by .ci/run: a skipped test fails the run there, since CI has chromium, PostgreSQL and
# ../shared/data, and a skip would hide a missing install step.
STRICT_ENV = "PYROLABEL_TEST_NO_SKIPS"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(STRICT_ENV) != "1" or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reasons = sorted({str(report.longrepr[-1]) for report in skipped})
        reporter.write_line(
            f"{STRICT_ENV}=1: {len(skipped)} test(s) skipped, which fails this run: "
            + "; ".join(reasons),
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread: small models run faster so, and results do not depend on the core
    count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real development data (fire-boxes, fire-masks, fire-tags) next to the repository."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (a sibling `shared/data` folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """A PostgreSQL server URL with rights to create databases, e.g.
    postgresql://postgres@127.0.0.1:5432/postgres."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.skip(f"{PG_URL_ENV} is not set (no PostgreSQL server for the database tests)")
    return url


@pytest.fixture
def db_url() -> str | None:
    """The database URL the `workspace` fixture uses; None means the workspace's SQLite file."""
    return None


@pytest.fixture
def workspace(tmp_path: Path, db_url: str | None, _sqlite_template: Path) -> Iterator[Workspace]:
    """A new workspace in tmp_path/workspace with the classes fire, smoke."""
    ws = Workspace(tmp_path / "workspace", db_url=db_url)
    if db_url is None:
        # A copy of a database initialised once per session: migrating a fresh file costs
        # ~0.3 s a test, the copy ~1 ms. init() below then only checks it is at the head.
        ws.root.mkdir(parents=True)
        shutil.copyfile(_sqlite_template, ws.root / "pyrolabel.db")
    ws.init(list(TEST_CLASSES))
    yield ws
    ws.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    template = Workspace(tmp_path_factory.mktemp("template") / "workspace")
    template.init(list(TEST_CLASSES))
    template.dispose()  # the last connection closing folds the WAL into the file
    return template.root / "pyrolabel.db"


@pytest.fixture
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """A new empty database on the PostgreSQL server, dropped after the test."""
    yield from _pg_database(pg_server_url)


@pytest.fixture
def pg_workspace_url(_pg_session_database: str) -> str:
    """The URL of a PostgreSQL database holding an empty, migrated workspace schema.

    One database serves the whole session and is emptied before each test (TRUNCATE ...
    RESTART IDENTITY): about 0.5 s a test, against 1.5-2 s to create and migrate a new
    database (measured on the 2-core development machine). The `workspace` fixture's init()
    then adds the classes back.
    """
    from sqlalchemy import text

    from db.models import Base
    from db.session import make_engine

    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    engine = make_engine(_pg_session_database)
    with engine.begin() as connection:
        # Connections a failing test left open would block TRUNCATE's lock.
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return _pg_session_database


@pytest.fixture(scope="session")
def _pg_session_database(
    pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    for url in _pg_database(pg_server_url):
        migrated = Workspace(tmp_path_factory.mktemp("pg-workspace"), db_url=url)
        migrated.init(list(TEST_CLASSES))
        migrated.dispose()
        yield url


def _pg_database(server_url: str) -> Iterator[str]:
    """Create an empty database, yield its URL, then drop it."""
    from sqlalchemy import make_url, text

    from db.session import make_engine

    name = f"pyrolabel_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            # FORCE closes connections a failing test left open (PostgreSQL 13+).
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def write_image(
    path: str | Path,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, ...] | int | None = None,
    *,
    mode: str = "RGB",
    format: str | None = None,
    exif_orientation: int | None = None,
    seed: int | None = None,
) -> Path:
    """Write a small image and return its path.

    Args:
        path: where to write; parent folders are created; the suffix picks the format.
        size: (width, height) of the stored pixels (before any EXIF orientation).
        color: a solid fill; None fills with noise seeded by `seed` (default: the path), so
            two generated files never share a content hash by accident.
        mode: PIL mode ("RGB", "L", "RGBA", "P", "CMYK", "I;16", ...).
        format: PIL format name when the suffix does not say it.
        exif_orientation: write this EXIF Orientation tag (JPEG only; 6 = rotate 90 clockwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if color is None:
        rng = np.random.default_rng(seed if seed is not None else zlib.crc32(str(path).encode()))
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if mode != "RGB":
            img = img.convert(mode) if mode != "I;16" else _to_16bit(img)
    else:
        img = Image.new(mode, (width, height), color)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(path, format=format, **kwargs)
    return path


def _to_16bit(img: Image.Image) -> Image.Image:
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey.astype("<u2"))  # uint16 -> mode I;16


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """The `write_image` factory: make_image(tmp_path / "a.jpg", (32, 24), (255, 0, 0))."""
    return write_image


@dataclass(frozen=True)
class TinyDataset:
    """Files of `tiny_dataset`. Boxes are (class name, x1, y1, x2, y2) in pixels."""

    root: Path
    images: Path  # images/<name>.jpg, 64x48
    labels: Path  # YOLO txt per image
    classes: Path  # classes.txt: fire, smoke
    tags_csv: Path  # image,fire,smoke
    boxes: dict[str, list[tuple[str, float, float, float, float]]]
    tags: dict[str, dict[str, bool]]


# name -> boxes (class, x1, y1, x2, y2) in pixels; an empty list is a negative image.
_TINY_BOXES: dict[str, list[tuple[str, float, float, float, float]]] = {
    "fire_a.jpg": [("fire", 8, 8, 24, 24)],
    "fire_b.jpg": [("fire", 0, 16, 32, 48), ("fire", 40, 4, 60, 20)],
    "smoke_a.jpg": [("smoke", 16, 0, 64, 32)],
    "both_a.jpg": [("fire", 4, 20, 20, 44), ("smoke", 24, 4, 56, 28)],
    "none_a.jpg": [],
    "none_b.jpg": [],
}


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> TinyDataset:
    """Six 64x48 JPEGs: 2 fire, 1 smoke, 1 both, 2 neither; YOLO labels and a tags CSV."""
    root = tmp_path / "tiny"
    images, labels = root / "images", root / "labels"
    labels.mkdir(parents=True)
    width, height = 64, 48
    tags = {}
    for name, boxes in _TINY_BOXES.items():
        write_image(images / name, (width, height))
        lines = []
        for cls, x1, y1, x2, y2 in boxes:
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            w, h = (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{TEST_CLASSES.index(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (labels / name).with_suffix(".txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        tags[name] = {cls: any(b[0] == cls for b in boxes) for cls in TEST_CLASSES}
    classes = root / "classes.txt"
    classes.write_text("\n".join(TEST_CLASSES) + "\n")
    tags_csv = root / "tags.csv"
    rows = ["image," + ",".join(TEST_CLASSES)]
    rows += [f"{name},{','.join(str(int(t[c])) for c in TEST_CLASSES)}" for name, t in tags.items()]
    tags_csv.write_text("\n".join(rows) + "\n")
    return TinyDataset(
        root=root,
        images=images,
        labels=labels,
        classes=classes,
        tags_csv=tags_csv,
        boxes=dict(_TINY_BOXES),
        tags=tags,
    )
