"""prioqd: a priority job daemon on Redis.

Producers push JSON onto ``<prefix>:queue:<priority>`` (or use :class:`Client` /
:class:`AsyncClient`); the daemon runs the task functions registered with
:func:`task` in worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prioqd.context import JobContext, NotInTaskError, current_job, set_progress
from prioqd.errors import JobFailed
from prioqd.registry import Task, task

if TYPE_CHECKING:
    from prioqd.client import AsyncClient, AsyncJobHandle, Client, JobHandle

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Client",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "NotInTaskError",
    "Task",
    "current_job",
    "set_progress",
    "task",
]
__version__ = "0.1.0"

# The client (and redis-py with it) is imported on first use: worker processes import
# this package before anything else, and their start-up time is every respawn's latency.
_CLIENT_NAMES = frozenset(("AsyncClient", "AsyncJobHandle", "Client", "JobHandle"))


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from prioqd import client

        return getattr(client, name)
    raise AttributeError(f"module 'prioqd' has no attribute {name!r}")
