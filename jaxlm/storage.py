"""Local and object-store (`gs://`) paths behind one type, `etils.epath.Path` (Orbax's own), and the
few operations whose semantics differ, since object stores have no rename, no append and no flock:

- `write_whole`: local files are written to a temporary and renamed over the target; an object is
  one upload, which appears whole or not at all.
- `move`: a local rename; on an object store every object is copied, then the sources deleted (a
  crash in between leaves both copies: nothing is lost, the move is redone by the next start).
- appending (metrics.jsonl): local files are appended to; an object is rewritten whole from the
  lines the writer keeps (`MetricsLog`), so the cost of a write grows with the log.
- `ObjectLock`: a lock object created only if absent (`ifGenerationMatch=0`), released by deleting
  it. A killed job's lock is taken over when its holder ran on this host and is gone; a job killed
  on another host leaves it to be deleted by hand (the error names it).

`gs://` needs the `gcs` extra (gcsfs for epath, google-cloud-storage for the lock and for
tensorboardX's event files).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

from etils import epath

from jaxlm.errors import UserError

Path = epath.Path
GCS_EXTRA = 'pip install -e ".[gcs]"'
# gcsfs logs every request that ran out of retries with its traceback, then raises the same error,
# which jaxlm reports in one line (e.g. "run directory gs://... is not writable (...)").
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def path(text: str | os.PathLike) -> Path:
    """A local path (with ~ expanded) or an object-store URL such as gs://bucket/run."""
    text = os.fspath(text)
    return Path(text if is_remote(text) else os.path.expanduser(text))


def is_remote(p: str | os.PathLike) -> bool:
    return "://" in os.fspath(p)


def write_whole(target: Path, data: bytes) -> None:
    """Writes `target` so that readers see the old content or the new, never a part."""
    if is_remote(target):
        target.write_bytes(data)
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(target)


def move(source: Path, target: Path) -> None:
    """Moves a file or a directory tree (see the module docstring for object stores)."""
    if not is_remote(source):
        source.rename(target)
        return
    if source.is_file():
        source.copy(target)
        source.unlink()
        return
    for file in files(source):
        file.copy(target / file.relative_to(source))
    source.rmtree()


def size(p: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return sum(file.stat().length for file in ([p] if p.is_file() else files(p)))


def files(directory: Path) -> list[Path]:
    """Every file under `directory` (epath's walk and rglob do not serve gs:// as paths)."""
    found = []
    for child in directory.iterdir():
        found += files(child) if child.is_dir() else [child]
    return found


class ObjectLock:
    """A lock object on GCS: created if absent, deleted on release (see the module docstring)."""

    def __init__(self, lock: Path):
        try:
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError:
            raise UserError(f"a gs:// run directory needs the gcs extra: {GCS_EXTRA}") from None
        self.exceptions = exceptions
        bucket, _, name = os.fspath(lock).split("://", 1)[1].partition("/")
        self.blob = storage.Client().bucket(bucket).blob(name)
        self.url, self.generation = os.fspath(lock), None

    def acquire(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """None once held here, else the holder's info."""
        try:
            self.blob.upload_from_string(json.dumps(info), if_generation_match=0)
        except self.exceptions.PreconditionFailed:
            holder = self._holder()
            if holder.get("host") != socket.gethostname() or pid_alive(holder.get("pid")):
                return holder
            try:  # its holder died on this host: take it over, unless another job just did
                self.blob.upload_from_string(json.dumps(info), if_generation_match=holder["generation"])
            except self.exceptions.PreconditionFailed:
                return self._holder()
        self.generation = self.blob.generation
        return None

    def _holder(self) -> dict[str, Any]:
        self.blob.reload()
        try:
            holder = json.loads(self.blob.download_as_text())
        except (json.JSONDecodeError, self.exceptions.NotFound):
            holder = {}
        return {**holder, "generation": self.blob.generation, "lock": self.url}

    def release(self) -> None:
        if self.generation is not None:
            try:
                self.blob.delete(if_generation_match=self.generation)
            except (self.exceptions.NotFound, self.exceptions.PreconditionFailed):
                pass
            self.generation = None


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` of this host still runs (an unreadable pid: no)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # someone else's process
    except (OSError, TypeError, ValueError):
        return False
    return True
