"""Metrics for Prometheus, served by ``prometheus_client`` at ``/metrics``.

The HTTP server runs in ``prometheus_client``'s own thread, so a scrape never
blocks the event loop. Counters and histograms are fed from the loop as jobs end.
Gauges that describe Redis (queue depths, paused priorities, the schedule, the dead
letters, live daemons) are read by the scrape thread itself, with a redis-py client
of its own, and cached for a second: a burst of scrapes costs Redis one round trip.
With ``[metrics] listen`` empty (the default) nothing is created, nor imported:
``NO_METRICS`` does nothing, at no cost to the job path (``prioqd.prometheus`` holds
the real thing).
"""

from __future__ import annotations

#: The ``task`` label of a job whose task is not one the daemon has.
UNKNOWN_TASK = "(unknown)"


class Metrics:
    """What the daemon counts. This base class counts nothing (metrics are off)."""

    def job_ended(self, task: str, priority: str, outcome: str, duration_s: float | None) -> None:
        pass

    def job_started(self, priority: str, wait_s: float) -> None:
        pass

    def worker_restarted(self, reason: str) -> None:
        pass

    def redis_error(self) -> None:
        pass

    def dead_letters_dropped(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


NO_METRICS = Metrics()


def parse_listen(listen: str) -> tuple[str, int]:
    """ "127.0.0.1:9464" or "[::1]:9464" -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:9464"')
    return host.strip("[]"), int(port)
