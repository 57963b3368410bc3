"""bench/ is not an installed package (only app, core and db are): put the repository root on
the path so its modules import as `bench.<name>`."""

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
