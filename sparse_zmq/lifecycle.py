"""Process lifecycle shared by every role: logging set-up and stop signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StopEvent", "configure_logging", "stop_on_signals", "atomic_write_text"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log records to stderr in one fixed format."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT)


class StopEvent(threading.Event):
    """An event set by a stop signal, remembering which one (None until then)."""

    signal_name: str | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopEvent]:
    """Yield an event that SIGINT or SIGTERM sets; restore the old handlers after.

    Must be entered in the main thread (only it may install signal handlers).
    The handler only sets the event: it may interrupt any call, a logging call
    included, so it does nothing that takes a lock. Loops poll with a short
    timeout and check the event, so a process stops within one poll interval
    plus its sockets' linger.
    """
    stop = StopEvent()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        stop.signal_name = signal.Signals(signum).name
        stop.set()

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def atomic_write_text(path: os.PathLike[str] | str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
