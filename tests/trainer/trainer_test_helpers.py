"""What the trainer tests share besides fixtures (a module with a unique name: several test areas have a
``conftest``, so ``from conftest import ...`` would be ambiguous in a whole-suite run)."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one ``type`` (``train`` or ``validation``) in a run's ``metrics.jsonl``, in file order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]
