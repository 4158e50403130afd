"""SIGINT/SIGTERM during training: finish the current step, checkpoint, then stop.

Inside :func:`deferred` the first SIGINT or SIGTERM only sets a flag that the training loop polls
at its next stop; it then writes a checkpoint and raises :class:`~deepufm.errors.Interrupted`
(exit status 128 + the signal number). A second signal stops at once, as without the block.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred(active: bool = True) -> Iterator[Callable[[], int | None]]:
    """Yield ``pending() -> signal number or None``; no-op off the main thread or if not active."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, frame):
        if pending:  # the second signal: stop now
            for s, h in old.items():
                signal.signal(s, h)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        pending.append(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield lambda: pending[0] if pending else None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
