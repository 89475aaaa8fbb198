"""The Prometheus side of ``prioqd.metrics``, imported only when metrics are on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from prioqd import __version__
from prioqd.keys import Keys
from prioqd.metrics import Metrics, parse_listen

#: Job durations and waits span milliseconds to hours.
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, float("inf"))
CACHE_S = 1.0


class _RedisState(Collector):
    """Gauges read from Redis at scrape time (in the scrape thread), cached."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        keys: Keys,
        priorities: list[str],
        slots: Callable[[], tuple[int, int]],
    ) -> None:
        self._factory = client_factory
        self._client: Any = None
        self._keys = keys
        self._priorities = priorities
        self._slots = slots
        self._lock = threading.Lock()
        self._cached: list[Any] = []
        self._at = 0.0

    def collect(self) -> Iterator[Any]:
        busy, total = self._slots()
        slots = GaugeMetricFamily("prioqd_slots", "Slot tokens of this daemon", labels=["state"])
        slots.add_metric(["busy"], max(0, busy))
        slots.add_metric(["free"], max(0, total - busy))
        yield slots
        info = InfoMetricFamily("prioqd_build", "The prioqd version")
        info.add_metric([], {"version": __version__})
        yield info
        with self._lock:
            if time.monotonic() - self._at > CACHE_S:
                self._cached = self._read()
                self._at = time.monotonic()
            yield from self._cached

    def _read(self) -> list[Any]:
        keys = self._keys
        errors = GaugeMetricFamily(
            "prioqd_redis_readable", "1 if the last scrape could read Redis, else 0"
        )
        try:
            if self._client is None:
                self._client = self._factory()
            r = self._client
            pipe = r.pipeline(transaction=False)
            for p in self._priorities:
                pipe.llen(keys.queue(p))
            pipe.smembers(keys.paused)
            pipe.zcard(keys.scheduled)
            pipe.llen(keys.dead)
            pipe.time()
            replies = pipe.execute()
            now_s, now_us = replies[-1]
            alive = r.zcount(keys.daemons, now_s * 1000 + now_us // 1000, "+inf")
        except Exception:  # a scrape must answer even when Redis does not
            self._client = None
            errors.add_metric([], 0)
            return [errors]
        n = len(self._priorities)
        depth = GaugeMetricFamily("prioqd_queue_depth", "Jobs waiting", labels=["priority"])
        paused = GaugeMetricFamily(
            "prioqd_queue_paused", "1 if the priority is paused", labels=["priority"]
        )
        paused_set = {p.decode(errors="replace") for p in replies[n]}
        for p, d in zip(self._priorities, replies[:n], strict=True):
            depth.add_metric([p], d)
            paused.add_metric([p], 1 if p in paused_set else 0)
        errors.add_metric([], 1)
        return [
            depth,
            paused,
            GaugeMetricFamily("prioqd_scheduled_jobs", "Retries and delayed jobs", replies[n + 1]),
            GaugeMetricFamily("prioqd_dead_letters", "Dead letters kept", replies[n + 2]),
            GaugeMetricFamily("prioqd_daemons_alive", "Daemons whose lease is held", alive),
            errors,
        ]


class PrometheusMetrics(Metrics):
    def __init__(
        self,
        listen: str,
        *,
        client_factory: Callable[[], Any],
        keys: Keys,
        priorities: list[str],
        slots: Callable[[], tuple[int, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        self._jobs = Counter(
            "prioqd_jobs",
            "Attempts ended, by outcome: succeeded, failed (will retry), dead, cancelled, "
            "requeued (put back unrun)",
            ["task", "priority", "outcome"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "prioqd_job_duration_seconds",
            "How long a job ran",
            ["task"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._wait = Histogram(
            "prioqd_job_wait_seconds",
            "From enqueued_at (set by the producer) to the start",
            ["priority"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._restarts = Counter(
            "prioqd_worker_restarts",
            "Worker processes replaced, by reason (crashed, timeout, cancelled, retired...)",
            ["reason"],
            registry=self.registry,
        )
        self._redis_errors = Counter(
            "prioqd_redis_errors", "Failed Redis calls of the daemon", registry=self.registry
        )
        self._dropped = Counter(
            "prioqd_dead_letters_dropped",
            "Dead letters dropped, oldest first, to keep within dead_letters_max",
            registry=self.registry,
        )
        self.registry.register(_RedisState(client_factory, keys, priorities, slots))
        # Children by labels: .labels() takes a lock and builds a key each call.
        self._children: dict[tuple[str, ...], Any] = {}
        host, port = parse_listen(listen)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def job_ended(self, task: str, priority: str, outcome: str, duration_s: float | None) -> None:
        self._child(self._jobs, task, priority, outcome).inc()
        if duration_s is not None:
            self._child(self._duration, task).observe(duration_s)

    def job_started(self, priority: str, wait_s: float) -> None:
        self._child(self._wait, priority).observe(max(0.0, wait_s))

    def worker_restarted(self, reason: str) -> None:
        self._child(self._restarts, reason).inc()

    def redis_error(self) -> None:
        self._redis_errors.inc()

    def dead_letters_dropped(self, n: int) -> None:
        self._dropped.inc(n)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
