"""Which model versions exist under `<home>/artifacts/models`, read without loading a model.

Torch-free on purpose: the gateway reads version records here, `checkpoint` writes and loads
the versions themselves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from shiftable_lib.durable import replace_file
from shiftable_lib.errors import NotFound, VersionInvalid

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
CURRENT = "CURRENT"


def version_ids(models_dir: Path) -> list[str]:
    """Complete versions, oldest first."""
    if not models_dir.is_dir():
        return []
    found = [p.name for p in models_dir.iterdir() if VERSION_PATTERN.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda v: int(v[1:]))


def current_version(models_dir: Path) -> str | None:
    """The version the CLI serves: the CURRENT pointer, else the newest complete version."""
    pointer = models_dir / CURRENT
    if pointer.is_file():
        version = pointer.read_text().strip()
        if VERSION_PATTERN.match(version) and (models_dir / version).is_dir():
            return version
    ids = version_ids(models_dir)
    return ids[-1] if ids else None


def set_current(models_dir: Path, version: str) -> None:
    """Point CURRENT at `version` (atomically): what the next job builds on."""
    if not (models_dir / version).is_dir():
        raise NotFound(f"no model version {version!r}")
    replace_file(models_dir / CURRENT, (version + "\n").encode())


def version_config(models_dir: Path, version: str) -> dict:
    """The config.json of a complete version (model shape, specialists, profile, meta)."""
    path = models_dir / version / "config.json"
    if not VERSION_PATTERN.match(version) or not path.is_file():
        raise NotFound(f"no model version {version!r} in {models_dir}")
    return json.loads(path.read_text())


def check_sizes(models_dir: Path, version: str, config: dict) -> None:
    """VersionInvalid when a file config.json records is missing or not of its recorded size:
    the quick half of the check a load makes (which also compares digests)."""
    files = [(version, name, recorded) for name, recorded in config.get("files", {}).items()]
    if base := config.get("delta_of"):  # a delta: its base's weights are part of it
        files.append((str(base.get("version", "")), "model.safetensors", base))
    for owner, name, recorded in files:
        if not VERSION_PATTERN.match(owner):
            raise VersionInvalid(f"{version}: config.json names no version in {owner!r}")
        path = models_dir / owner / name
        shown = name if owner == version else f"{owner}/{name}, which it grew from,"
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            raise VersionInvalid(f"{version}: {shown} is missing")
        if size != recorded.get("bytes"):
            raise VersionInvalid(
                f"{version}: {shown} is {size} bytes, not the {recorded.get('bytes')} it was "
                "written with"
            )
