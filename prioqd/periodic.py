"""Periodic jobs (``[[schedule]]``): when each tick falls, and the job it enqueues.

Pure functions, shared by the config check, the daemon's ``Ticks`` part and
``prioqd schedule list``. Cron expressions are croniter's (5 fields, or ``@hourly``
and the like), evaluated in the entry's time zone; ``every_s`` ticks fall on
multiples of the period since the Unix epoch, so every daemon agrees on them.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import zoneinfo
from typing import TYPE_CHECKING, Any

from prioqd.errors import PrioqdError

if TYPE_CHECKING:
    from prioqd.config import ScheduleConfig


class ScheduleError(PrioqdError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def _zone(entry: ScheduleConfig) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(entry.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError("timezone", f"unknown time zone {entry.timezone!r}") from exc


def _croniter() -> Any:
    # Imported when a schedule is used: daemons without one need not carry it.
    from croniter import croniter

    return croniter


def check_entry(entry: ScheduleConfig, now_s: float | None = None) -> None:
    """Raise ``ScheduleError`` (naming the key) if the entry cannot tick: its next and
    last ticks around ``now_s`` (default: now) are computed, as the daemon will."""
    _zone(entry)
    if entry.cron:
        if not _croniter().is_valid(entry.cron):
            raise ScheduleError("cron", f"not a cron expression: {entry.cron!r}")
        if len(entry.cron.split()) not in (1, 5):
            raise ScheduleError(
                "cron", f"expected 5 fields or @hourly and the like: {entry.cron!r}"
            )
    now = time.time() if now_s is None else now_s
    try:
        next_tick(entry, now)
        last_tick(entry, now)
    except Exception as exc:  # croniter's CroniterBadDateError, an overflow...
        key = "cron" if entry.cron else "every_s"
        what = repr(entry.cron) if entry.cron else f"{entry.every_s:g} s"
        raise ScheduleError(key, f"{what} never fires ({exc})") from exc
    try:
        json.dumps([entry.args, entry.kwargs])
    except (TypeError, ValueError) as exc:
        raise ScheduleError("args", f"arguments must be JSON: {exc}") from exc


def next_tick(entry: ScheduleConfig, after_s: float) -> float:
    """The first tick strictly after ``after_s`` (Unix seconds)."""
    if entry.every_s:
        return (math.floor(after_s / entry.every_s) + 1) * entry.every_s
    start = datetime.datetime.fromtimestamp(after_s, _zone(entry))
    return float(_croniter()(entry.cron, start).get_next(float))


def last_tick(entry: ScheduleConfig, at_s: float) -> float:
    """The latest tick at or before ``at_s``."""
    if entry.every_s:
        return math.floor(at_s / entry.every_s) * entry.every_s
    start = datetime.datetime.fromtimestamp(at_s + 0.001, _zone(entry))
    return float(_croniter()(entry.cron, start).get_prev(float))


def iso(tick_s: float) -> str:
    """A tick as ISO 8601 in UTC: 2026-11-29T03:00:00Z (with milliseconds when the
    tick is not on a whole second: every_s = 0.5)."""
    ms = round(tick_s * 1000)
    when = datetime.datetime.fromtimestamp(ms // 1000, datetime.UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{ms % 1000:03d}Z" if ms % 1000 else f"{text}Z"


def job_id(entry: ScheduleConfig, tick_s: float) -> str:
    return f"{entry.name}@{iso(tick_s)}"


def payload(entry: ScheduleConfig, tick_s: float) -> str:
    """The job a tick enqueues: the documented JSON, its id naming the tick."""
    job = {
        "id": job_id(entry, tick_s),
        "task": entry.task,
        "args": entry.args,
        "kwargs": entry.kwargs,
        "enqueued_at": tick_s,
    }
    return json.dumps(job, separators=(",", ":"))


def describe(entry: ScheduleConfig) -> str:
    tz = "" if entry.timezone == "UTC" else f" ({entry.timezone})"
    return f"cron {entry.cron}{tz}" if entry.cron else f"every {entry.every_s:g} s"
