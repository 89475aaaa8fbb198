"""The TOML configuration: one frozen dataclass per table, strict validation.

Every problem is reported as ``ConfigError(file, dotted.key, problem)``; unknown keys
are rejected rather than ignored, because a misspelt ``timeout_s`` that silently falls
back to its default is worse than a daemon that refuses to start.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prioqd.errors import ConfigError
from prioqd.metrics import parse_listen as metrics_listen

DEFAULT_CONFIG_PATH = "/etc/prioqd/config.toml"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVELS = ("debug", "info", "warning", "error", "critical")


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or greater"


#: ``every_s`` bounds: a shorter period is a busy loop, not a schedule; a longer one
#: overflows the dates its ticks are named by (use cron, e.g. @yearly).
MIN_EVERY_S = 1.0
MAX_EVERY_S = 10 * 366 * 86400.0


def _every(v: float) -> str | None:
    if v == 0 or MIN_EVERY_S <= v <= MAX_EVERY_S:
        return None
    return (
        f"must be at least {MIN_EVERY_S:g} (seconds) and at most {MAX_EVERY_S:g} "
        "(ten years): a schedule ticks at most once a second"
    )


_DAY_S = 86400
_YEAR_S = 365 * _DAY_S


def _up_to(
    max_s: int, lower: Callable[[float], str | None] = _positive
) -> Callable[[float], str | None]:
    """A duration's check: ``lower``'s, and at most ``max_s`` (a timer set for 1e300 s
    would overflow the event loop's clock: a finite number is not enough)."""

    def check(v: float) -> str | None:
        if problem := lower(v):
            return problem
        if v > max_s:
            return f"must be at most {max_s} ({max_s / _DAY_S:g} days)"
        return None

    return check


def _name(v: str) -> str | None:
    if _NAME_RE.match(v):
        return None
    return "may only contain letters, digits, '_', '-' and '.'"


def check_redis_url(v: str) -> str | None:
    """The problem with a Redis URL, or None."""
    parts = urllib.parse.urlsplit(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"scheme must be redis://, rediss:// or unix://, got {parts.scheme or 'none'!r}"
    if parts.password or "password=" in parts.query:
        # A secret in a world-readable file ends up in backups and bug reports.
        return (
            "must not contain a password: put it in the redis-password credential "
            "(LoadCredential=) or PRIOQD_REDIS_PASSWORD"
        )
    return None


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _priorities(v: list[str]) -> str | None:
    if not v:
        return "must list at least one priority"
    for name in v:
        if problem := _name(name):
            return f"{name!r} {problem}"
    if len(set(v)) != len(v):
        return "must not repeat a priority"
    return None


def _slots(v: int | str) -> str | None:
    if v == "auto" or (isinstance(v, int) and v >= 1):
        return None
    return 'must be "auto" or a whole number of at least 1'


def parse_listen(v: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ValueError if not one."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8080")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:8080")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:8080")
    if any(c.isspace() for c in host):
        raise ValueError("the host must not contain spaces")
    return host, int(port)


def _web_listen(v: str) -> str | None:
    try:
        parse_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def _hosts(v: list[str]) -> str | None:
    for host in v:
        if host == "*":
            continue
        name = host[2:] if host.startswith("*.") else host
        if not name or "*" in name or any(c.isspace() or c in "/:@" for c in name.strip("[]")):
            return (
                f"{host!r} is not a host name: give names as a browser sends them in the "
                'Host header, without port ("prioqd.example.com", "*.example.com", or "*" '
                "for any)"
            )
    return None


_ROOT_PATH_RE = re.compile(r"^(/[A-Za-z0-9_.~-]+)*$")


def _root_path(v: str) -> str | None:
    if _ROOT_PATH_RE.match(v):
        return None
    return 'must be empty or a path like "/prioqd" (no trailing slash)'


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _check(fn: Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=_check(check_redis_url))
    # Commands other than the blocking fetch fail after this long; the fetch has its
    # own connections without a read timeout (it may block for hours by design).
    socket_timeout_s: float = field(default=5.0, metadata=_check(_up_to(_DAY_S)))
    connect_timeout_s: float = field(default=5.0, metadata=_check(_up_to(_DAY_S)))


@dataclass(frozen=True)
class QueuesConfig:
    prefix: str = field(default="prioqd", metadata=_check(_name))
    priorities: list[str] = field(
        default_factory=lambda: ["high", "normal", "low"], metadata=_check(_priorities)
    )


@dataclass(frozen=True)
class WorkersConfig:
    slots: int | str = field(default="auto", metadata=_check(_slots))
    # Restart a worker process after this many jobs (0: never), a guard against
    # task code that leaks memory.
    max_jobs_per_worker: int = field(default=0, metadata=_check(_non_negative))

    @property
    def slot_count(self) -> int:
        if isinstance(self.slots, int):
            return self.slots
        return os.cpu_count() or 1


@dataclass(frozen=True)
class JobsConfig:
    timeout_s: float = field(default=300.0, metadata=_check(_up_to(_YEAR_S)))
    # A job's own timeout_s is capped to this: a producer cannot hold a worker for ever.
    max_timeout_s: float = field(default=86400.0, metadata=_check(_up_to(_YEAR_S)))
    max_retries: int = field(default=3, metadata=_check(_non_negative))
    retry_backoff_s: float = field(default=1.0, metadata=_check(_up_to(_YEAR_S)))
    retry_backoff_max_s: float = field(default=300.0, metadata=_check(_up_to(_YEAR_S)))
    result_ttl_s: int = field(default=86400, metadata=_check(_up_to(10 * _YEAR_S)))
    max_payload_bytes: int = field(default=1024 * 1024, metadata=_check(_positive))
    # A result larger than this fails its job (it would be copied into the job hash,
    # the done list and the events channel).
    max_result_bytes: int = field(default=1024 * 1024, metadata=_check(_positive))
    # A payload whose daemon died this many times while holding it is poison: the next
    # recovery sends it to the dead letters instead of back to the head of its queue.
    max_recoveries: int = field(default=3, metadata=_check(_non_negative))
    # The dead-letter list keeps at most this many, dropping the oldest (0: no bound).
    dead_letters_max: int = field(default=10_000, metadata=_check(_non_negative))


@dataclass(frozen=True)
class DaemonConfig:
    # A daemon that stops heartbeating for this long has its in-flight jobs put back.
    lease_s: float = field(default=30.0, metadata=_check(_up_to(_DAY_S)))
    shutdown_grace_s: float = field(default=30.0, metadata=_check(_up_to(_DAY_S, _non_negative)))


@dataclass(frozen=True)
class TasksConfig:
    modules: list[str] = field(default_factory=lambda: ["prioqd.examples"])


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=_check(_one_of(*_LEVELS)))
    format: str = field(
        default="auto", metadata=_check(_one_of("auto", "json", "console", "journal"))
    )


def _metrics_listen(v: str) -> str | None:
    if not v:
        return None
    try:
        metrics_listen(v)
    except ValueError:
        return 'must be empty (off) or "host:port", e.g. "127.0.0.1:9464"'
    return None


@dataclass(frozen=True)
class MetricsConfig:
    # Where /metrics is served for Prometheus; empty: no metrics at all.
    listen: str = field(default="", metadata=_check(_metrics_listen))


@dataclass(frozen=True)
class WebConfig:
    # The dashboard (`prioqd web`): host:port to listen on. Keep it on localhost and
    # put a reverse proxy with TLS and authentication in front for remote access.
    listen: str = field(default="127.0.0.1:8080", metadata=_check(_web_listen))
    # The file holding the token that actions (cancel, pause, requeue...) need. Empty:
    # $CREDENTIALS_DIRECTORY/web-token (the unit's LoadCredential=). No token: the
    # dashboard only starts with --read-only.
    token_file: str = ""
    # The path prefix the reverse proxy serves the dashboard under ("" or "/prioqd").
    root_path: str = field(default="", metadata=_check(_root_path))
    # Host header values answered besides localhost, 127.0.0.1, ::1 and the listen
    # host (any other is refused with 400, against DNS rebinding): the name a reverse
    # proxy passes on, e.g. ["prioqd.example.com"]; "*.example.com"; "*" for any.
    allowed_hosts: list[str] = field(default_factory=list, metadata=_check(_hosts))
    # How often an open page refreshes itself.
    refresh_s: float = field(default=2.0, metadata=_check(_up_to(_DAY_S)))
    # How often pages look for queues of priorities not configured (a SCAN of the
    # whole keyspace: on a Redis of millions of keys, thousands of round trips).
    queues_scan_s: float = field(default=30.0, metadata=_check(_up_to(_DAY_S)))
    # How long a sign-in lasts.
    session_max_age_s: int = field(default=43200, metadata=_check(_up_to(_YEAR_S)))


@dataclass(frozen=True)
class ScheduleConfig:
    """One ``[[schedule]]`` table: a job enqueued on every tick, exactly once."""

    name: str = field(default="", metadata=_check(_name))
    # Exactly one of: a cron expression (5 fields, or @hourly and the like) ...
    cron: str = ""
    # ... or a period: ticks fall on multiples of it since the Unix epoch.
    every_s: float = field(default=0.0, metadata=_check(_every))
    task: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Empty: the middle configured priority, as for `prioqd submit`.
    priority: str = ""
    timezone: str = "UTC"
    # After an outage: "last" enqueues the most recent missed tick once; "none" none.
    catch_up: str = field(default="last", metadata=_check(_one_of("none", "last")))


@dataclass(frozen=True)
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    schedule: tuple[ScheduleConfig, ...] = ()
    path: str = "<defaults>"

    def replace(self, **sections: Any) -> Config:
        """A copy with some tables replaced, for tests and CLI overrides."""
        return dataclasses.replace(self, **sections)


_SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[str(f.type)]
    for f in dataclasses.fields(Config)
    if f.name not in ("path", "schedule")
}


def _type_name(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _coerce(path: str, key: str, annotation: str, value: Any) -> Any:
    """Check ``value`` against the field's annotation (a string, as annotations are lazy)."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(path, key, f"expected {expected}, got {_type_name(value)} {value!r}")

    # bool is a subclass of int: reject it explicitly, `slots = true` is a mistake.
    if annotation == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if abs(value) > 2**53:
            raise bad("an integer of a sensible size")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            number = float(value)
        except OverflowError:
            raise bad("a number of a sensible size") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if annotation == "int | str":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("an integer or a string")
        return value
    if annotation == "list[str]":
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad("an array of strings")
        return list(value)
    if annotation == "list[Any]":
        if not isinstance(value, list):
            raise bad("an array")
        return list(value)
    if annotation == "dict[str, Any]":
        if not isinstance(value, dict):
            raise bad("a table")
        return dict(value)
    raise AssertionError(f"unhandled annotation {annotation}")  # pragma: no cover


def _build_section(path: str, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(path, name, f"expected a table, got {_type_name(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(path, f"{name}.{key}", f"unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields[key]
        dotted = f"{name}.{key}"
        value = _coerce(path, dotted, str(f.type), value)
        check = f.metadata.get("check")
        if check is not None and (problem := check(value)):
            shown = mask_url(value) if dotted == "redis.url" else value
            raise ConfigError(path, dotted, f"{problem}, got {shown!r}")
        values[key] = value
    return cls(**values)


def _schedules(path: str, raw: Any, priorities: list[str]) -> tuple[ScheduleConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(path, "schedule", "expected an array of tables: [[schedule]]")
    out = []
    names: set[str] = set()
    for k, table in enumerate(raw):
        where = f"schedule[{k}]"
        entry = _build_section(path, where, ScheduleConfig, table)
        if not entry.name:
            raise ConfigError(path, f"{where}.name", "missing: every [[schedule]] needs a name")
        if entry.name in names:
            raise ConfigError(path, f"{where}.name", f"{entry.name!r} is used twice")
        names.add(entry.name)
        if not entry.task:
            raise ConfigError(path, f"{where}.task", "missing")
        if bool(entry.cron) == bool(entry.every_s):
            raise ConfigError(path, where, "give exactly one of cron and every_s")
        priority = entry.priority or priorities[len(priorities) // 2]
        if priority not in priorities:
            raise ConfigError(
                path, f"{where}.priority", f"{priority!r} is not in queues.priorities"
            )
        entry = dataclasses.replace(entry, priority=priority)
        from prioqd.periodic import ScheduleError, check_entry

        try:
            check_entry(entry)
        except ScheduleError as exc:
            raise ConfigError(path, f"{where}.{exc.key}", str(exc)) from None
        out.append(entry)
    return tuple(out)


def from_mapping(data: Mapping[str, Any], path: str = "<defaults>") -> Config:
    for name in data:
        if name not in _SECTIONS and name != "schedule":
            known = ", ".join([*_SECTIONS, "schedule"])
            raise ConfigError(path, name, f"unknown table (known tables: {known})")
    sections = {
        name: _build_section(path, name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()
    }
    schedule = _schedules(path, data.get("schedule", []), sections["queues"].priorities)
    cfg = Config(path=path, schedule=schedule, **sections)
    if cfg.jobs.retry_backoff_max_s < cfg.jobs.retry_backoff_s:
        raise ConfigError(
            path, "jobs.retry_backoff_max_s", "must not be smaller than jobs.retry_backoff_s"
        )
    return cfg


#: What a reload (SIGHUP) applies to a running daemon; the rest needs a restart.
LIVE_KEYS = (
    "log.",
    "workers.slots",
    "workers.max_jobs_per_worker",
    "jobs.",
    "daemon.",
    "schedule",
)


#: Tables the daemon does not read.
DAEMON_IGNORES = ("web.",)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    out = []
    for name in _SECTIONS:
        a, b = getattr(old, name), getattr(new, name)
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                out.append(f"{name}.{f.name}")
    if old.schedule != new.schedule:
        out.append("schedule")
    return out


def reloadable(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The configuration to run after a reload: ``new``'s live keys on top of ``old``.

    Returns (config, keys applied, keys that need a restart to take effect).
    """
    # [web] is the dashboard's (a process of its own): nothing for a daemon to apply.
    changed = [k for k in changed_keys(old, new) if not k.startswith(DAEMON_IGNORES)]
    applied = [k for k in changed if k.startswith(LIVE_KEYS)]
    pending = [k for k in changed if k not in applied]
    merged: dict[str, Any] = {name: getattr(new, name) for name in ("log", "jobs", "daemon")}
    merged["schedule"] = new.schedule
    merged["workers"] = dataclasses.replace(
        old.workers, slots=new.workers.slots, max_jobs_per_worker=new.workers.max_jobs_per_worker
    )
    return dataclasses.replace(old, path=new.path, **merged), applied, pending


def load(path: str) -> Config:
    """Read and validate a TOML file; every failure is a ``ConfigError`` naming ``path``."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except PermissionError:
        raise ConfigError(path, None, "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text") from None
    return from_mapping(data, path)
