"""The exceptions sparse-zmq raises.

Every error the library raises on purpose derives from one base, so a caller
can catch them all with ``except SparseError``::

    SparseError
    ├── ProtocolError        a message broke the wire format (bad frame count,
    │                        header, dtype, shape or buffer size)
    ├── RemoteError          a peer answered a task with an error message
    ├── TaskTimeout          no result came back within the task's deadline
    ├── ConfigError          a command-line option or config value is invalid
    └── DataError            a data set is missing or not in the expected layout

Messages name the value received and what was allowed, so a log line is
enough to reproduce the fault.
"""

from __future__ import annotations

__all__ = [
    "SparseError",
    "ProtocolError",
    "RemoteError",
    "TaskTimeout",
    "ConfigError",
    "DataError",
]


class SparseError(Exception):
    """Base of every error sparse-zmq raises on purpose."""


class ProtocolError(SparseError, ValueError):
    """A message does not follow the wire format."""


class RemoteError(SparseError):
    """A peer answered a task with an error.

    Attributes:
        task_id: The task the error answers.
        reason: The peer's own description of what went wrong.
    """

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(f"task {task_id} failed remotely: {reason}")
        self.task_id = task_id
        self.reason = reason


class TaskTimeout(SparseError, TimeoutError):
    """No result arrived for a task within its deadline."""


class ConfigError(SparseError, ValueError):
    """An option or configuration value is invalid."""


class DataError(SparseError, ValueError):
    """A data set is missing or not in the layout the loader expects."""
