"""Run metrics, written by process 0 only: one JSON object per line in <run_dir>/metrics.jsonl, and
the same scalars as TensorBoard events in <run_dir>/tensorboard (train/* and eval/* tags).

On an object store (gs://) nothing can be appended: metrics.jsonl is rewritten whole from the lines
kept here, and tensorboardX re-uploads its event file whole at each flush.

Both are written synchronously from the training thread and flushed per group of records, so a
failing disk (ENOSPC) stops the run at once with one line instead of a background writer thread
dying and the next write blocking for ever.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _import_tensorboardx() -> None:
    """Imports tensorboardX without the torch import its package runs when torch is installed
    (1.1 s of every `jaxlm train` start, for a feature jaxlm never uses); a torch imported
    before stays, and one imported later is imported normally."""
    if "torch" in sys.modules:
        import tensorboardX  # noqa: F401
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


_import_tensorboardx()
from tensorboardX.event_file_writer import EventsWriter  # noqa: E402
from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: E402
from tensorboardX.summary import scalar  # noqa: E402

from jaxlm import storage
from jaxlm.errors import TrainingStopped
from jaxlm.storage import Path


class MetricsLog:
    def __init__(self, path: Path, *, enabled: bool, resume_step: int,
                 tensorboard_dir: Path | None = None):
        """Opens the log of a run restored at `resume_step` (0: a fresh start). Records past it
        (written after that checkpoint) are dropped so curves never hold the same step twice;
        TensorBoard hides its own past that step (purge)."""
        self.path, self.enabled = path, enabled
        self._board: EventsWriter | None = None
        self._lines: list[str] | None = None  # the whole log, where it cannot be appended to
        if not enabled:
            return
        try:
            kept = []
            if path.exists():
                kept = [f"{line}\n" for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                storage.write_whole(path, "".join(kept).encode())
            if storage.is_remote(path):
                self._lines = kept
            if tensorboard_dir is not None:
                tensorboard_dir.mkdir(parents=True, exist_ok=True)
                self._board = EventsWriter(str(tensorboard_dir / "events"))
                if resume_step:
                    self._board.write_event(Event(step=resume_step + 1,
                                                  session_log=SessionLog(status=SessionLog.START)))
        except OSError as err:
            raise TrainingStopped(f"opening the metrics of {path.parent} failed ({err.strerror}); "
                                  "free space or fix permissions, then run the same command") from None

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        try:
            lines = [json.dumps(r) + "\n" for r in records]
            if self._lines is None:
                with self.path.open("a") as f:
                    f.writelines(lines)
            else:
                self._lines += lines
                storage.write_whole(self.path, "".join(self._lines).encode())
            if self._board is not None:
                for record in records:
                    self._add_scalars(record)
                self._board.flush()
        except OSError as err:
            raise TrainingStopped(
                f"writing metrics of step {records[-1].get('step')} to {self.path.parent} failed "
                f"({err.strerror}); the run stopped, its checkpoints are untouched"
            ) from None

    def _add_scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._board.write_event(Event(wall_time=time.time(), step=record["step"],
                                              summary=scalar(_tag(key), value)))

    def close(self) -> None:
        if self._board is not None:
            board, self._board = self._board, None
            try:
                board.close()
            except OSError:
                pass  # the write that failed already stopped the run with its message


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
