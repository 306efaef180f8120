"""Graceful stop on SIGTERM/SIGINT: finish the step, checkpoint, exit 0; a second signal aborts.

With several processes JAX's own preemption notifier owns SIGTERM and Orbax's
`reached_preemption(step)` makes every process agree on the step to save at, so the local handlers
are installed only for a single process.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager; `requested` turns True at the first signal."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # second signal: die the way the signal would have killed us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to abort now)",
            file=sys.stderr,
            flush=True,
        )
