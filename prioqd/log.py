"""structlog set-up: journald fields under systemd, JSON lines or a console otherwise.

Every event carries its context as flat keys (``job_id``, ``task``, ``queue``,
``daemon_id``...). Under systemd they become native journal fields (``JOB_ID=``,
``TASK=``, ``QUEUE=``, ``DAEMON_ID=``), so ``journalctl -u prioqd JOB_ID=<id>``
finds one job's lines and ``journalctl -p err`` its failures.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import re
import sys
import time
import traceback
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from prioqd.systemd import journal_stream_attached

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# syslog priorities, which journald filters on with -p.
_SYSLOG = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD_RE = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD = 64 * 1024


def journal_fields(event_dict: MutableMapping[str, Any]) -> dict[str, str]:
    """A structlog event as journal fields: MESSAGE, PRIORITY and one field per key."""
    ev = dict(event_dict)
    level = str(ev.pop("level", "info"))
    message = str(ev.pop("event", ""))
    ev.pop("timestamp", None)  # journald stamps every entry itself
    fields = {"PRIORITY": str(_SYSLOG.get(level, 6)), "SYSLOG_IDENTIFIER": "prioqd"}
    exc = ev.pop("exc_info", None)
    if exc:
        if exc is True:
            exc = sys.exc_info()
        if isinstance(exc, BaseException):
            exc = (type(exc), exc, exc.__traceback__)
        if isinstance(exc, tuple) and exc[0] is not None:
            ev.setdefault("traceback", "".join(traceback.format_exception(*exc)))
    parts = [message]
    for key, value in ev.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        name = _FIELD_RE.sub("_", key.upper()).lstrip("_") or "FIELD"
        fields[name] = text[:_MAX_FIELD]
        if name != "TRACEBACK":
            parts.append(f"{key}={text}")
    fields["MESSAGE"] = " ".join(parts)[:_MAX_FIELD]
    return fields


class JournalRenderer:
    """Final processor: send the event to journald, print nothing."""

    def __init__(self, send: Callable[..., Any] | None = None) -> None:
        if send is None:
            from cysystemd import journal

            send = journal.send
        self._send = send

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        try:
            self._send(**journal_fields(event_dict))
        except Exception as exc:  # a log line must never take the daemon down
            print(f"prioqd: journal send failed: {exc}: {event_dict!r}", file=sys.stderr)
        raise structlog.DropEvent


#: Log lines are written in a burst at most this long after they were logged.
FLUSH_AFTER_S = 0.01


class LineWriter:
    """A structlog logger that writes rendered lines in bursts (one ``write`` every
    FLUSH_AFTER_S) instead of one per line.

    At thousands of jobs a second the daemon logs two lines a job; a system call for
    each was a tenth of its CPU. Lines logged outside a running loop are written at
    once, and ``flush`` runs at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._buffer: list[bytes] = []
        self._scheduled = False

    def msg(self, message: str | bytes) -> None:
        self._buffer.append((message if isinstance(message, bytes) else message.encode()) + b"\n")
        if len(self._buffer) >= 512:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            loop.call_later(FLUSH_AFTER_S, self.flush)
            self._scheduled = True

    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        try:
            out = self._stream.buffer if hasattr(self._stream, "buffer") else None
            if out is not None:
                self._stream.flush()
                out.write(data)
                out.flush()
            else:
                self._stream.write(data.decode())
                self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or full: logs must never take the daemon down


class IsoUtcStamper:
    """``structlog.processors.TimeStamper(fmt="iso", utc=True)``'s text
    ("2026-11-30T01:02:51.398781Z") at under half its cost: the date and time to the
    second are formatted once a second. The daemon logs two lines a job, and the
    stamp was a tenth of what a line cost."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        micros = int((now - second) * 1e6)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        event_dict["timestamp"] = f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"
        return event_dict


def _orjson_dumps(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=str)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """(Re)configure logging; safe to call again, e.g. on a reload. Returns the format used."""
    out = stream or sys.stdout
    if fmt == "auto" and journal_stream_attached():
        fmt = "journal"
    elif fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if fmt == "journal":
        processors.append(JournalRenderer())
    elif fmt == "console":
        processors += [
            IsoUtcStamper(),
            structlog.dev.ConsoleRenderer(),
        ]
    else:
        processors += [
            IsoUtcStamper(),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    global _writer, _generation, _level
    if _writer is not None:
        _writer.flush()
    if fmt == "json":
        _writer = LineWriter(out)
        factory: Any = lambda *args: _writer  # noqa: E731
    else:
        _writer = None
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # Only now: a method looked up meanwhile (another thread) is the new one's.
    _generation += 1
    _level = LEVELS[level]
    for logger in list(_loggers):
        logger._forget()
    return fmt


_writer: LineWriter | None = None
_generation = 0
#: Until ``configure``: structlog's default, which writes every level.
_level = logging.NOTSET


@atexit.register
def _flush_at_exit() -> None:
    if _writer is not None:
        _writer.flush()


class Logger:
    """A bound logger that follows ``configure``: a reload may change the format, and
    the parts of the daemon keep the logger they were given.

    Its methods are looked up once per configuration and kept on the instance (the
    daemon logs two lines a job); ``configure`` forgets them.
    """

    def __init__(self, **context: Any) -> None:
        self._context = context
        self._generation = -1
        self._bound: Any = None
        _loggers.add(self)

    def __getattr__(self, name: str) -> Any:
        # Only for what the instance does not hold yet: a method not used since the
        # last ``configure``.
        if self._generation != _generation:
            self._bound = structlog.get_logger().bind(**self._context)
            self._generation = _generation
        attr = getattr(self._bound, name)
        if not name.startswith("_"):
            self.__dict__[name] = attr
        return attr

    def _forget(self) -> None:
        for name in [k for k in self.__dict__ if not k.startswith("_")]:
            del self.__dict__[name]

    @property
    def debug_enabled(self) -> bool:
        """Whether ``debug`` lines are written (a caller may skip building them)."""
        return _level <= logging.DEBUG


_loggers: weakref.WeakSet[Logger] = weakref.WeakSet()


def get_logger(**context: Any) -> Any:
    return Logger(**context)
