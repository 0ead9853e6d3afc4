"""Params blocks that put every path and store of a test under its own temporary root."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def paths_under(root: Path) -> dict[str, str]:
    """`paths`: the project layout of params.yaml, rooted at `root`."""
    return {
        "raw_logs": str(root / "data/raw_logs"),
        "ingested": str(root / "data/ingested/batches"),
        "quarantine": str(root / "data/ingested/quarantine"),
        "ingest_state": str(root / "data/state/watermark.json"),
        "ingest_index": str(root / "data/state/ingest_index.sqlite"),
        "curated_dir": str(root / "data/curated"),
        "reports": str(root / "reports"),
        "metrics": str(root / "metrics"),
        "models": str(root / "models"),
    }


def tracking_under(root: Path, **extra: Any) -> dict[str, Any]:
    """`tracking`: a SQLite MLflow store and its artifacts under `root` (`extra` on top)."""
    return {
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_location": str(root / "mlartifacts"),
    } | extra
