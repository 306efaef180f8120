"""Run metrics, written by process 0 only: one JSON object per line in <run_dir>/metrics.jsonl, and
the same scalars as TensorBoard events in <run_dir>/tensorboard (train/* and eval/* tags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, path: Path, *, enabled: bool, resume_step: int,
                 tensorboard_dir: Path | None = None):
        """Opens the log; records past `resume_step` (written after the checkpoint that is being
        resumed) are dropped so curves never hold the same step twice (TensorBoard purges them)."""
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self._board = None
        if enabled and tensorboard_dir is not None:
            self._board = SummaryWriter(
                str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None
            )

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if self._board is not None:
            for record in records:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._board.add_scalar(_tag(key), value, record["step"])

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def _tag(key: str) -> str:
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def _step_of(line: str) -> float:
    """Step of a record; a torn last line (killed mid-write) or a blank one counts as 'after'."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
