"""prioqd: a priority job daemon on Redis.

Producers push JSON onto ``<prefix>:queue:<priority>``; the daemon runs the task
functions registered with :func:`task` in worker processes.
"""

from prioqd.context import JobContext, NotInTaskError, current_job, set_progress
from prioqd.registry import task

__all__ = ["JobContext", "NotInTaskError", "current_job", "set_progress", "task"]
__version__ = "0.1.0"
