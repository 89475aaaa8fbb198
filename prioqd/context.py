"""What a task can know and say about the job it runs: ``current_job()`` and
``set_progress()``.

The worker process sets the context around each call (a ``ContextVar``, so an
``async def`` task sees it too). Progress goes to the daemon over the worker's result
pipe and from there to the job hash's ``progress`` field, at most twice a second a
job: a call within half a second of the last one only keeps its value, which is sent
by the next call after that, or when the job ends.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prioqd.errors import PrioqdError

#: Progress a job sends at most this often.
PROGRESS_EVERY_S = 0.5
#: A progress value (as JSON) may be this long at most.
MAX_PROGRESS_BYTES = 4096


class NotInTaskError(PrioqdError):
    """``current_job()`` or ``set_progress()`` was called outside a running task."""


@dataclass(frozen=True)
class JobContext:
    """The job a task is running."""

    id: str
    task: str
    priority: str
    #: 1 for the first run, 2 for the first retry...
    attempt: int
    #: Retries allowed after the first attempt.
    max_retries: int
    meta: dict[str, Any]
    #: When the producer pushed it (Unix time), if it said so.
    enqueued_at: float | None
    #: Unix time at which the job's timeout kills it.
    deadline: float


@dataclass
class _Progress:
    send: Callable[[str], None]
    sent_at: float = -math.inf
    pending: str | None = None

    def flush(self) -> None:
        if self.pending is not None:
            self.send(self.pending)
            self.pending = None
            self.sent_at = time.monotonic()


@dataclass
class _Running:
    job: JobContext
    progress: _Progress = field(repr=False)


_current: ContextVar[_Running | None] = ContextVar("prioqd_job", default=None)


def current_job() -> JobContext:
    """The job the calling task runs; ``NotInTaskError`` outside a task."""
    running = _current.get()
    if running is None:
        raise NotInTaskError("current_job() is only available inside a running prioqd task")
    return running.job


def set_progress(value: float | dict[str, Any]) -> None:
    """Report progress: a number, or a small JSON object (at most 4 KiB as JSON).

    Written to the job hash's ``progress`` field (visible in ``prioqd inspect`` and
    the client), at most twice a second; it costs the task a few microseconds.
    """
    running = _current.get()
    if running is None:
        raise NotInTaskError("set_progress() is only available inside a running prioqd task")
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise TypeError("progress must be a number or a JSON object (a dict)")
    progress = running.progress
    progress.pending = encode_progress(value)
    if time.monotonic() - progress.sent_at >= PROGRESS_EVERY_S:
        progress.flush()


def encode_progress(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("progress must be a finite number")
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_PROGRESS_BYTES:
        raise ValueError(f"progress is {len(text)} bytes of JSON, over {MAX_PROGRESS_BYTES}")
    return text


def enter(job: JobContext, send: Callable[[str], None]) -> object:
    """Set the context for one job (the worker calls this); returns a token."""
    return _current.set(_Running(job, _Progress(send)))


def leave(token: object) -> None:
    """Clear the context after a job, sending its last progress if any is waiting."""
    running = _current.get()
    if running is not None:
        running.progress.flush()
    _current.reset(token)  # type: ignore[arg-type]
