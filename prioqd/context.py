"""What a task can know and say about the job it runs: ``current_job()`` and
``set_progress()``.

The worker process sets the context around each call (a ``ContextVar``, so an
``async def`` task sees it too). Progress goes to the daemon over the worker's result
pipe and from there to the job hash's ``progress`` field, at most twice a second a
job: a call within half a second of the last one sent only keeps its value (not even
encoded: a throttled call costs next to nothing), which is sent by the next call
after that, or when the job ends, so the last value always arrives.
"""

from __future__ import annotations

import json
import math
import sys
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


_NOTHING: Any = object()


@dataclass
class _Progress:
    send: Callable[[str], None]
    sent_at: float = -math.inf
    #: The last value given and not sent yet, as given (encoded when it is sent).
    pending: Any = _NOTHING

    def flush(self) -> None:
        """Send the value waiting, if any; ``ValueError`` if it is no progress value."""
        if self.pending is not _NOTHING:
            value, self.pending = self.pending, _NOTHING
            self.send(encode_progress(value))
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
    the client), at most twice a second; the last value when the job ends. A value
    is encoded when it is sent, so a dict changed after the call is sent as it then
    is, and a bad one (not JSON, over 4 KiB) raises ``ValueError`` from the call that
    sends it; one still waiting when the job ends is dropped, with a warning on
    stderr. A call that only keeps its value costs well under a microsecond.
    """
    running = _current.get()
    if running is None:
        raise NotInTaskError("set_progress() is only available inside a running prioqd task")
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise TypeError("progress must be a number or a JSON object (a dict)")
    progress = running.progress
    progress.pending = value
    if time.monotonic() - progress.sent_at >= PROGRESS_EVERY_S:
        progress.flush()


def encode_progress(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("progress must be a finite number")
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"progress must be JSON: {exc}") from exc
    if len(text) > MAX_PROGRESS_BYTES:
        raise ValueError(f"progress is {len(text)} bytes of JSON, over {MAX_PROGRESS_BYTES}")
    return text


def enter(job: JobContext, send: Callable[[str], None]) -> object:
    """Set the context for one job (the worker calls this); returns a token."""
    return _current.set(_Running(job, _Progress(send)))


def leave(token: object) -> None:
    """Clear the context after a job, sending its last progress if any is waiting.
    (The job has ended: a value that cannot be sent is dropped with a warning, not
    turned into the job's failure.)"""
    running = _current.get()
    _current.reset(token)  # type: ignore[arg-type]
    if running is None:
        return
    try:
        running.progress.flush()
    except ValueError as exc:
        print(f"prioqd: last progress of job {running.job.id} dropped: {exc}", file=sys.stderr)
