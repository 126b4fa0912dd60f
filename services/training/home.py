"""What the training service tells the rest of the stack about the home it trains in.

Only this service mounts `data/` and `artifacts/`: the gateway learns whether a corpus is
there, and what a version holds, from here. Everything is read from folders and JSON files,
without loading a model or hashing a corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from shiftable_lib import versions
from shiftable_lib.errors import NotFound


@dataclass(frozen=True)
class VersionRecord:
    """A complete model version on disk. `corpus_digests` are those of the corpora its experts
    were trained on (the generalist's included when recorded); `created_at` is None for a
    version that did not record it."""

    id: str
    specialists: list[str]
    artifact_dir: Path
    metrics_json: str
    profile: str
    created_at: datetime | None = None
    corpus_digests: dict[str, str] = field(default_factory=dict)
    parent: str = ""  # the version it was trained from


def no_generalist(models_dir: Path) -> bool:
    return versions.current_version(models_dir) is None


def describe_version(models_dir: Path, version_id: str = "") -> VersionRecord:
    """Version `version_id`, or the current one (CURRENT, else the newest complete version)
    when it is empty; NotFound when there is none, VersionInvalid when a file it recorded is
    missing or of another size."""
    version = version_id or versions.current_version(models_dir)
    if version is None:
        raise NotFound("no model version yet: the first training has not finished")
    config = versions.version_config(models_dir, version)
    versions.check_sizes(models_dir, version, config)
    metrics = models_dir / version / "metrics.json"
    created = config.get("created")
    return VersionRecord(
        id=version,
        specialists=list(config["model"].get("specialists", [])),
        artifact_dir=models_dir / version,
        metrics_json=metrics.read_text() if metrics.is_file() else "{}",
        profile=config.get("profile", {}).get("name", ""),
        created_at=datetime.fromisoformat(created) if created else None,
        corpus_digests=dict(config.get("corpus_digests", {})),
        parent=str(config.get("parent") or ""),
    )
