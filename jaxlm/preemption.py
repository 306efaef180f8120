"""Graceful stop on SIGTERM/SIGINT: finish the step, checkpoint, exit 0; a second signal aborts.
During setup (before the first step) there is nothing to save: the first signal stops at once.

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

from jaxlm.errors import TrainingStopped

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager; `requested` turns True at the first signal."""

    def __init__(self) -> None:
        self.requested = False
        self._in_setup = True
        self._setup_stop: str | None = None  # the signal that arrived during setup, if any
        self._previous: dict[int, object] = {}

    def setup_done(self) -> None:
        """From now on a signal asks for a checkpoint at the end of the step under way. A signal
        that arrived during setup stops here even if library code swallowed its exception (tfds
        logs and drops exceptions raised inside its logger calls)."""
        if self._setup_stop is not None:
            raise TrainingStopped(self._setup_stop)
        self._in_setup = False

    def __enter__(self) -> "StopRequest":
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._in_setup:
            self._setup_stop = (f"{signal.Signals(signum).name} during setup: stopped before the "
                                "first step; nothing was lost, run the same command to start")
            raise TrainingStopped(self._setup_stop)
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
