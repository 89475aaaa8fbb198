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


class MetricsListenError(PrioqdError):
    """``[metrics] listen`` could not be served (the port is taken, the address is not
    ours). Not a configuration error: the port may be free again after a restart (an
    old process still holding it), so the daemon exits 1 and systemd retries."""


class WorkerStartError(PrioqdError):
    """A worker process could not start (bad task modules, missing interpreter)."""


class ScriptError(BrokerError):
    """Redis refused a script call for good (not "busy" or "out of memory"): an
    argument it cannot take, or a bug. Repeating the same call would fail again."""


class JobFailed(PrioqdError):
    """A job ended without a result: ``status`` is ``"dead"`` (it failed for good:
    retries used up, or it could never run) or ``"cancelled"``.

    ``error`` is the daemon's one-line reason, ``traceback`` the task's traceback when
    there is one (it is also attached as a note, so an uncaught ``JobFailed`` prints
    it), ``outcome`` the outcome JSON as the daemon wrote it.
    """

    def __init__(
        self,
        job_id: str,
        status: str,
        error: str | None,
        traceback: str | None = None,
        outcome: dict[str, object] | None = None,
    ) -> None:
        self.job_id = job_id
        self.status = status
        self.error = error
        self.traceback = traceback
        self.outcome = outcome or {}
        super().__init__(f"job {job_id} {status}: {error or 'no reason given'}")
        if traceback:
            self.add_note(f"The job's traceback (in its worker process):\n{traceback.rstrip()}")

    def __reduce__(self) -> tuple[type[JobFailed], tuple[object, ...]]:
        # Pickled across processes with its fields, not just the message.
        return (type(self), (self.job_id, self.status, self.error, self.traceback, self.outcome))
