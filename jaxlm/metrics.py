"""Run metrics: one JSON object per line in <run_dir>/metrics.jsonl, written by process 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, *, enabled: bool, resume_step: int):
        """Opens the log; records past `resume_step` (written after the checkpoint that is being
        resumed) are dropped so curves never hold the same step twice."""
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def _step_of(line: str) -> float:
    """Step of a record; a torn last line (killed mid-write) or a blank one counts as 'after'."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
