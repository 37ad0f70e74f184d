"""Tracking-store URIs as paths, without MLflow: what the Optuna bridge (`affseg.sweep.pruning`) and the
MLflow side (`affseg.sweep.tracking`) both need."""

from __future__ import annotations

from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def absolute_uri(uri: str) -> str:
    """`sqlite:///relative.db` → `sqlite:////abs/relative.db` (trials run in other working directories);
    creates the database's folder. Other URIs are returned unchanged."""
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    path = Path(uri[len(SQLITE_PREFIX):]).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{path}"
