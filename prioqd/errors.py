"""One error hierarchy for everything prioqd raises on purpose."""

from __future__ import annotations


class PrioqdError(Exception):
    """Base class of every error prioqd raises deliberately."""


class ConfigError(PrioqdError):
    """The configuration file is missing, unreadable or invalid.

    The message names the file, the dotted key and the problem, so an operator can
    fix it without reading code. The CLI maps it to exit status 2.
    """

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class TaskRegistryError(PrioqdError):
    """Task modules could not be imported, or two tasks share a name."""


class BrokerError(PrioqdError):
    """Redis could not be reached or answered with an error.

    redis-py's exceptions are wrapped where they enter prioqd (``prioqd.broker``) so
    that callers handle one type and the original stays available as ``__cause__``.
    """


class ConnectionSetupError(PrioqdError):
    """A Redis connection could not even be built from the configured URL (an
    unknown URL option, a bad value): a configuration problem, not an outage, so the
    CLI maps it to exit status 2 and the daemon does not retry it.
    """


class WorkerStartError(PrioqdError):
    """A worker process could not start (bad task modules, missing interpreter)."""


class ScriptError(BrokerError):
    """Redis refused a script call for good (not "busy" or "out of memory"): an
    argument it cannot take, or a bug. Repeating the same call would fail again."""
