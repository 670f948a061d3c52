"""Preemption: a signal (SIGTERM, SIGUSR1, ...) on any rank asks the whole job to checkpoint and stop.

The handler only raises a flag; the ranks agree on it at the next step boundary (it travels in the step's one
all-reduce), commit a checkpoint of the step reached and exit with code 75. A rank that cannot finish within
checkpoint.preempt_grace_s of the first signal exits anyway (code 77), so the scheduler's notice is never
overrun.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable


class PreemptionFlag:
    """Set by any of `signals`; `deadline_exit(code)` runs if the job has not stopped `grace_s` after the first."""

    def __init__(self, signals: list[str], grace_s: float, on_deadline: Callable[[str], None]) -> None:
        self.signal_name = ""
        self.received_at = 0.0
        self.grace_s = grace_s
        self.on_deadline = on_deadline
        self._deadline: threading.Timer | None = None
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Raise the flag (a signal here, or a peer rank's request agreed at a step boundary) and start the grace
        period; a second request (a process-group delivery, a forward) changes nothing."""
        if self.signal_name:
            return
        self.signal_name = reason
        self.received_at = time.monotonic()
        self._deadline = threading.Timer(self.grace_s, self.on_deadline, args=(reason,))
        self._deadline.daemon = True
        self._deadline.start()

    def cancel(self) -> None:
        """The job stopped in time: no deadline exit."""
        if self._deadline is not None:
            self._deadline.cancel()


def exit_now(code: int) -> None:
    """Leave at once (no clean-up that could wait on a peer)."""
    os._exit(code)
