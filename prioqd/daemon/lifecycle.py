"""The daemon's lifecycle: start up, serve, drain, close; and the wiring of its parts.

    Slots      slot tokens (slots.py)
    Lease      identity, register, heartbeat, recover the dead (lease.py)
    Dispatcher claims -> batches -> the pool -> outcome ops (dispatch.py)
    Cycle      ops out, claims in: one Lua call a round trip (cycle.py)
    Watch      the blocking waits: every queue while idle, the higher ones while
               busy (watch.py)
    Scheduler  retries and delayed jobs, promoted when due (scheduler.py)
    Remote     operators' pause, resume and cancel, heard on a channel (remote.py)
    Ticks      periodic jobs ([[schedule]]), each tick enqueued once (ticks.py)
    Control    watchdog, STATUS, reload (control.py)

Signal handlers only set events; ``run`` takes a ``shutdown_trigger`` so tests stop
a daemon without signals. An internal failure (a bug, a part that cannot go on) is
logged at critical and makes ``run`` return 1, so systemd restarts the daemon; the
jobs it held come back by the lease.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prioqd import __version__, log
from prioqd.broker import Broker, mask_url
from prioqd.config import Config
from prioqd.daemon.control import Control
from prioqd.daemon.cycle import Cycle
from prioqd.daemon.dispatch import Dispatcher
from prioqd.daemon.lease import Lease, default_daemon_id
from prioqd.daemon.remote import Remote
from prioqd.daemon.scheduler import Scheduler
from prioqd.daemon.slots import Slots
from prioqd.daemon.ticks import Ticks
from prioqd.daemon.watch import Watch
from prioqd.errors import BrokerError, MetricsListenError, WorkerStartError
from prioqd.log import get_logger
from prioqd.metrics import NO_METRICS, Metrics
from prioqd.pool import Pool
from prioqd.systemd import Notifier, watchdog_interval_s
from prioqd.timing import Backoff, wait_event, wait_settled

T = TypeVar("T")

EXIT_OK = 0
EXIT_INTERNAL = 1


class Daemon:
    def __init__(self, config: Config, *, daemon_id: str | None = None) -> None:
        self.config = config
        self.priorities = list(config.queues.priorities)
        #: Priorities an operator paused, as last heard (the parts share this set).
        self.paused: set[str] = set()
        self.broker = Broker.from_config(config)
        self.keys = self.broker.keys
        self.notifier = Notifier()
        self.slots = Slots(config.workers.slot_count)
        self.pool = Pool(
            self.slots.total,
            config.tasks.modules,
            default_timeout_s=config.jobs.timeout_s,
            max_jobs_per_worker=config.workers.max_jobs_per_worker,
            max_result_bytes=config.jobs.max_result_bytes,
            default_max_retries=config.jobs.max_retries,
            on_event=self._pool_event,
        )
        self.id = daemon_id or default_daemon_id()
        self.log = get_logger(daemon_id=self.id)
        self._force = asyncio.Event()
        self.scheduler = Scheduler(
            self.broker, config, log=self.log, on_redis_down=self._redis_down
        )
        self.lease = Lease(
            self.broker,
            config,
            self.id,
            slots=self.slots,
            log=self.log,
            on_redis_down=self._redis_down,
            on_due_in_ms=self.scheduler.due_in,
        )
        self.lease.last_error = self._last_error
        self.dispatch = Dispatcher(
            config,
            daemon_id=self.id,
            pool=self.pool,
            slots=self.slots,
            redis_time=self.lease.redis_time,
            due_in_ms=self.scheduler.due_in,
            wake=self._wake_cycle,
            log=self.log,
        )
        self.cycle = Cycle(
            self.broker,
            config,
            slots=self.slots,
            dispatch=self.dispatch,
            lease=self.lease,
            log=self.log,
            on_redis_down=self._redis_down,
            on_idle=self._idle,
            on_unlanded=self._unlanded,
            force=self._force,
            paused=self.paused,
        )
        self.watch = Watch(
            self.broker,
            self.id,
            self.priorities,
            cycle=self.cycle,
            dispatch=self.dispatch,
            slots=self.slots,
            log=self.log,
            on_redis_down=self._redis_down,
            on_failure=self._internal_failure,
            paused=self.paused,
        )
        self.cycle.is_idle = lambda: self.watch.idle
        self.dispatch.on_change = self.watch.changed
        self.dispatch.on_outcome = self._outcome
        self.cycle.on_claimed = self.watch.claimed
        self.pool.may_start = self.watch.may_start
        self.pool.on_failure = self._internal_failure
        self.pool.joinable = self.dispatch.joinable
        self.pool.on_progress = self.dispatch.progress
        self.remote = Remote(
            self.broker,
            log=self.log,
            on_paused=self._set_paused,
            on_cancel=self.dispatch.cancel,
            on_redis_down=self._redis_down,
            on_problems=self._problems,
            paused=self.paused,
        )
        self.cycle.on_paused = self._set_paused
        for part in (self.cycle, self.lease, self.scheduler):
            part.on_trimmed = self._trimmed
        self.cycle.on_problems = self._problems
        self.lease.on_problem = self._set_last_error
        self.lease.on_renewed = self.cycle.wake
        self.ticks = Ticks(
            self.broker,
            config,
            redis_time=self.lease.redis_time,
            log=self.log,
            on_redis_down=self._redis_down,
        )
        self.control = Control(
            self.notifier,
            status_text=self._status_text,
            apply=self._apply_config,
            current=lambda: self.config,
            log=lambda: self.log,
        )
        # The STATUS line carries the last error, known only once the outcome is written.
        self.dispatch.on_error = self.control.status_changed
        self.metrics: Metrics = NO_METRICS
        self.last_error = ""
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._heartbeat: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.Task[None] | None = None

    # --- public ---------------------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Begin a graceful stop; ``force`` skips the grace for running jobs."""
        if self._stop.is_set() and not force:
            force = True  # a second request means "now"
        self._stop.set()
        if force:
            self._force.set()

    def request_reload(self) -> None:
        """Re-read the configuration file soon (the SIGHUP handler calls this)."""
        self.control.request_reload()

    async def run(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> int:
        """Serve until ``shutdown_trigger`` completes (or ``stop`` is called).

        Returns 0 after a clean stop, 1 after an internal failure."""
        cfg = self.config
        self.log.info(
            "daemon starting",
            version=__version__,
            redis=mask_url(cfg.redis.url),
            priorities=self.priorities,
            slots=self.slots.total,
            config=cfg.path,
        )
        registered = False
        try:
            self._start_metrics()
            registered = await self._start_up(shutdown_trigger)
            if registered:
                await self._serve()
                await self._drain()
            await self._close(registered)
        finally:
            await self.watch.close()
            await self.pool.close()
            await self.broker.close()
            self.metrics.close()
            if self._watchdog is not None:
                self._watchdog.cancel()  # last: systemd's watchdog covers the drain too
        self.log.info("daemon stopped", jobs_done=self.dispatch.jobs_done, exit_code=self.exit_code)
        return self.exit_code

    # --- phases ----------------------------------------------------------------------

    def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if not listen:
            return
        cfg = self.config
        from prioqd.prometheus import PrometheusMetrics, scrape_client

        try:
            self.metrics = PrometheusMetrics(
                listen,
                client_factory=lambda: scrape_client(cfg),
                keys=self.keys,
                priorities=self.priorities,
                slots=lambda: (self.slots.busy, self.slots.total),
            )
        except OSError as exc:
            raise MetricsListenError(
                f"cannot serve metrics on [metrics] listen = {listen!r} ({cfg.path}): {exc}"
            ) from exc
        self.dispatch.metrics = self.metrics
        self.log.info("metrics served", url=f"http://{listen}/metrics")

    async def _start_up(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None) -> bool:
        """Workers up, Redis answering, lease taken, READY=1. False if stopped first."""
        if shutdown_trigger is not None:
            self._spawn(self._trigger(shutdown_trigger))
        watchdog = watchdog_interval_s()
        if watchdog is not None:
            self._watchdog = self._spawn(self.control.watchdog_loop(watchdog))
        self.notifier.send(STATUS="starting worker processes")
        try:
            await self.pool.start()
        except WorkerStartError as exc:
            self.notifier.send(STATUS=f"failed: {exc}")
            raise
        except OSError as exc:  # no fds or processes left: a restart may find some
            self.notifier.send(STATUS=f"failed: cannot start worker processes: {exc}")
            self._internal_failure(exc)
            return False
        await self._until_redis_answers()
        if self._stop.is_set() or not await self.lease.register(self._stop):
            return False
        try:
            await self.remote.refresh()  # paused before we claim anything
        except BrokerError as exc:
            self.log.warning("could not read the paused priorities", error=str(exc))
        await self._report_unserved_queues()
        self.log.info(
            "daemon ready", tasks=sorted(self.pool.task_names), worker_pids=self.pool.pids
        )
        # Start-up objects live as long as the daemon: keep them out of every future
        # collection, which shortens the GC pauses in the job path.
        gc.collect()
        gc.freeze()
        # Only now: Redis answers and the workers are up (Type=notify waits for it).
        self.notifier.ready(self._status_text())
        return True

    async def _serve(self) -> None:
        """Claim, run and record jobs until a stop is requested."""
        self._heartbeat = [self._spawn(self.lease.run())]
        self._loops = [
            self._spawn(self.cycle.run()),
            self._spawn(self.scheduler.run()),
            self._spawn(self.control.reload_loop()),
            self._spawn(self.remote.run()),
            self._spawn(self.ticks.run()),
        ]
        if self.notifier.enabled:
            self._loops.append(self._spawn(self.control.status_loop()))
        self.cycle.wake()
        await self._stop.wait()

    async def _drain(self) -> None:
        """Take nothing more, let running jobs finish (up to the grace), write every
        outcome. The heartbeat goes on meanwhile: our jobs are still ours."""
        grace = self.config.daemon.shutdown_grace_s
        running = self.pool.busy_count
        self.notifier.stopping(f"stopping: draining {running} running job(s)")
        self.log.info(
            "stopping: no new jobs; waiting for running ones",
            running=running,
            grace_s=grace,
            force=self._force.is_set(),
        )
        self.cycle.fetching = False
        await self.watch.close()
        if self.pool.busy_count and not self._force.is_set():
            idle = asyncio.ensure_future(self.pool.wait_idle())
            force = asyncio.ensure_future(self._force.wait())
            await asyncio.wait([idle, force], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            force.cancel()
        killed = self.pool.kill_busy("shutdown")
        if killed:
            self.log.warning(
                "grace over: killed running jobs; they go back to the head of their queues",
                jobs=killed,
            )
        await self.pool.wait_idle()
        # Write every outcome; with Redis gone for good, give up after a bound: the
        # jobs are still recorded as ours in Redis and come back by lease recovery.
        self.cycle.wake()
        cycle = self.cycle
        if not await wait_settled(cycle.drained, lambda: cycle.settled, max(5.0, grace)):
            self.log.error("outcomes not written; the jobs stay in flight and will run again")

    async def _close(self, registered: bool) -> None:
        """End the loops (they finish what they are doing: on Python 3.11 a cancellation
        that lands as a redis-py read completes can be lost), then deregister."""
        self.cycle.close()
        self.scheduler.close()
        self.control.close()
        self.remote.close()
        self.ticks.close()
        await self._end(self._loops)
        self.lease.close()
        await self._end(self._heartbeat)
        if not registered:
            return
        try:
            put_back = await self.lease.deregister()
            if put_back:
                self.log.info("put back jobs held at stop", jobs=put_back)
        except BrokerError as exc:
            self.log.error(
                "could not deregister; other daemons recover our jobs when the lease ends",
                error=str(exc),
            )

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            self.log.error("a background task did not stop; cancelling it", task=repr(task))
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    # --- wiring -----------------------------------------------------------------------

    def _wake_cycle(self) -> None:
        self.cycle.wake()
        self.control.status_changed()

    def _outcome(self) -> None:
        self.cycle.outcome()
        self.control.status_changed()

    def _idle(self) -> None:
        self.watch.go_idle()

    def _set_paused(self, paused: set[str]) -> None:
        """Operators paused or resumed priorities (heard on the channel, or seen by a
        claim when a note was missed)."""
        if paused == self.paused:
            return
        self.log.info("paused priorities", paused=sorted(paused))
        # One set, shared by the parts that read it (Remote, Cycle, Watch).
        self.paused.clear()
        self.paused.update(paused)
        self.watch.paused_changed()
        self.cycle.wake()  # a resumed priority may have jobs to claim

    def _trimmed(self, n: int, during: str) -> None:
        """A script call dropped the oldest dead letters to keep within the bound."""
        self.log.warning(
            "dead letters dropped, oldest first, to keep within dead_letters_max",
            dropped=n,
            dead_letters_max=self.config.jobs.dead_letters_max,
            during=during,
        )
        self.metrics.dead_letters_dropped(n)

    def _problems(self, problems: list[str]) -> None:
        """Keys of the wrong type read as empty (a claim's, the operators' commands'),
        said when they change, not every time they are read."""
        if problems:
            self.log.error(
                "a key prioqd reads has the wrong type; read as empty until it is fixed",
                problems=problems,
            )
            self._set_last_error(problems[0])
        else:
            self.log.info("the keys of the wrong type reported before are fixed")

    def _set_last_error(self, text: str) -> None:
        self.last_error = text
        self.control.status_changed()

    def _unlanded(self, priority: str) -> None:
        self.watch.unlanded(priority)

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._internal_failure(task.exception())  # type: ignore[arg-type]

    def _internal_failure(self, exc: BaseException) -> None:
        self.log.critical("internal failure; stopping", error=repr(exc), exc_info=exc)
        self.exit_code = EXIT_INTERNAL
        self.stop(force=True)

    async def _trigger(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> None:
        await shutdown_trigger()
        self.stop()

    def _redis_down(self, what: str, exc: BrokerError, backoff: Backoff) -> float:
        delay = backoff.next_delay()
        self.metrics.redis_error()
        self.last_error = str(exc)
        self.log.warning(
            "redis unavailable",
            during=what,
            error=str(exc),
            retry_in_s=round(delay, 3),
            failures=backoff.failures,
        )
        self.control.status_changed()
        return delay

    async def _until_redis_answers(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                await self.broker.ping()
                return
            except BrokerError as exc:
                delay = self._redis_down("start-up", exc, backoff)
                self.notifier.send(
                    STATUS=f"waiting for Redis at {mask_url(self.config.redis.url)}: {exc}"
                )
                await wait_event(self._stop, delay)

    async def _report_unserved_queues(self) -> None:
        """Warn of jobs in queues of priorities that no daemon here serves."""
        try:
            unserved = await self.broker.unserved_queues(self.priorities)
        except BrokerError as exc:
            self.log.warning("could not list the queues", error=str(exc))
            return
        for priority, depth in unserved.items():
            if depth:
                self.log.warning(
                    "jobs wait in a queue this daemon does not serve (not in [queues] priorities)",
                    queue=priority,
                    depth=depth,
                )

    def _pool_event(self, event: str, **fields: Any) -> None:
        if event == "worker_died":
            self.log.error("worker process died", **fields)
        elif event == "worker_start_failed":
            self.last_error = str(fields.get("error", ""))
            self.log.error("worker process failed to start", **fields)
            self.control.status_changed()
        elif event == "worker_restart":
            self.metrics.worker_restarted(str(fields.get("reason", "")))
        elif event == "tasks_changed":
            self.log.error("a new worker process has a different set of tasks", **fields)
        else:
            self.log.debug(event.replace("_", " "), **fields)

    def _last_error(self) -> str:
        return self.dispatch.last_error or self.last_error

    def _status_text(self) -> str:
        text = (
            f"{self.slots.busy}/{self.slots.total} slots busy, {self.dispatch.jobs_done} jobs done"
        )
        last_error = self._last_error()
        if last_error:
            text += f", last error: {last_error[:150]}"
        if self.control.reload_error:
            text += f"; {self.control.reload_error[:150]}"
        if self.control.needs_restart:
            text += f"; restart needed for {', '.join(self.control.needs_restart)}"
        return text

    async def _apply_config(
        self, new: Config, applied: list[str], pending: list[str]
    ) -> str | None:
        """Apply a reloaded configuration's live keys; a problem if it cannot be."""
        slots = new.workers.slot_count
        if slots != self.slots.total:
            try:
                await self.pool.resize(slots)
            except Exception as exc:  # bad task modules, or no fds/processes left
                text = str(exc) if isinstance(exc, WorkerStartError) else repr(exc)
                return f"worker processes cannot start: {text}"
            self.slots.resize(slots)
            try:  # the next registration rewrites it anyway
                await self.broker.update_daemon_info(self.id, {"slots": str(slots)})
            except BrokerError as exc:
                self.log.warning("could not update the daemon's info", error=str(exc))
        if new.log != self.config.log:
            log.configure(new.log.level, new.log.format)
        self.pool.default_timeout_s = new.jobs.timeout_s
        self.pool.max_jobs_per_worker = new.workers.max_jobs_per_worker
        self.pool.max_result_bytes = new.jobs.max_result_bytes
        self.pool.default_max_retries = new.jobs.max_retries
        self.config = new
        for part in (self.dispatch, self.cycle, self.lease, self.scheduler, self.ticks):
            part.config = new
        self.ticks.reconfigured()
        return None


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    daemon_id: str | None = None,
) -> int:
    """The entry point: run a daemon until a signal (or ``shutdown_trigger``)."""
    daemon = Daemon(config, daemon_id=daemon_id)
    loop = asyncio.get_running_loop()
    installed = []
    if shutdown_trigger is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Only set an event: the first signal drains, a second one skips the grace.
            loop.add_signal_handler(sig, daemon.stop)
            installed.append(sig)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    installed.append(signal.SIGHUP)
    try:
        return await daemon.run(shutdown_trigger)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
