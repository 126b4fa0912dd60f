"""What the service tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where a registry keeps its SQLite file, in a fresh home."""
    return tmp_path / "state" / "registry.db"
