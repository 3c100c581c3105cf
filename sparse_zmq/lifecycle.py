"""Process lifecycle shared by every role: logging set-up and stop signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

__all__ = ["configure_logging", "stop_on_signals", "atomic_write_text"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log records to stderr in one fixed format."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT)


def stop_on_signals() -> threading.Event:
    """Return an event that SIGINT or SIGTERM sets (main thread only).

    Loops poll with a short timeout and check the event, so a process stops
    within one poll interval plus its sockets' linger.
    """
    stop = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info(
            "pid %d: %s received, stopping", os.getpid(), signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop


def atomic_write_text(path: os.PathLike[str] | str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
