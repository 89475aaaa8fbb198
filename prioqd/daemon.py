"""The daemon's lifecycle: fetch under slot tokens, run in the pool, record outcomes.

Four tasks share one event loop:

- fetch: holds a free slot token, claims the next job (highest priority first) into
  this daemon's claim list, records it as started, hands it to the pool. With every
  queue empty it blocks in Redis (``BlockingFetch``) and costs nothing.
- recorder: writes outcomes (and retries, dead letters, put-backs) in batches, in
  order, retrying through Redis outages; nothing is dropped while the daemon lives.
- heartbeat: extends this daemon's lease and recovers the jobs of daemons whose
  lease ran out.
- scheduler: sleeps until the next retry or delayed job is due, then promotes it.

Signal handlers only set events; ``run`` takes a ``shutdown_trigger`` so tests stop
a daemon without signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import random
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prioqd import __version__, jobs, log
from prioqd import config as configuration
from prioqd.broker import BlockingFetch, Broker, mask_url
from prioqd.config import Config
from prioqd.errors import BrokerError, ConfigError, WorkerStartError
from prioqd.keys import Keys
from prioqd.log import get_logger
from prioqd.pool import Pool
from prioqd.systemd import Notifier, redis_password, watchdog_interval_s

T = TypeVar("T")

#: A worker is handed a run of short jobs expected to take about this long in all.
BATCH_BUDGET_S = 0.002
#: ...and never more jobs than this at once.
MAX_BATCH = 64
#: A lone job expected to take this long is prefetched for: its successor is claimed
#: just before it ends, so the worker does not wait a round trip for it. Not for
#: shorter jobs (a higher-priority job arriving then waits behind the prefetched one,
#: and two short jobs' wait is the tighter guarantee), nor for long ones (where the
#: round trip is noise and the wait would be a whole long job).
PREFETCH_MIN_S = 0.003
PREFETCH_MAX_S = 0.05
PREFETCH_MARGIN_S = 0.0005
#: Outcomes wait at most this long for a claim to ride along with.
COALESCE_S = 0.005
#: A job still running this long after dispatch has its start ("running") written;
#: one that ends sooner is recorded in one step, which halves its Redis work.
START_RECORD_AFTER_S = 0.02


class Slots:
    """Slot tokens: a job is taken off Redis only while a token is held.

    Unlike ``asyncio.Semaphore`` it can hand out several free tokens at once and be
    resized on a reload. ``release`` never raises: it runs in done-callbacks.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> int:
        return self.total - self._free

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # woken and cancelled at once: pass the token on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def try_acquire(self, n: int) -> int:
        got = max(0, min(n, self._free))
        self._free -= got
        return got

    def release(self, n: int = 1) -> None:
        self._free += n
        while self._free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._free -= 1
                fut.set_result(None)

    def resize(self, total: int) -> None:
        self._free += total - self.total
        self.total = total
        self.release(0)


class _BatchSlot:
    """The slot token one batch holds, given back exactly once.

    A batch of several gives it back halfway, so the next batch is claimed while the
    worker runs the rest (and then waits in the pool's queue, not the worker for
    Redis); a lone job when it ends, or earlier by a timer (see ``_take``).
    """

    __slots__ = ("_left", "_release_at", "_released", "_slots")

    def __init__(self, slots: Slots, jobs_in_batch: int) -> None:
        self._slots = slots
        self._left = jobs_in_batch
        self._release_at = jobs_in_batch // 2
        self._released = False

    def job_done(self) -> None:
        self._left -= 1
        if self._left <= self._release_at:
            self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots.release()


class Backoff:
    """Capped exponential backoff with jitter, for reconnecting to Redis."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        step = min(self.cap_s, self.base_s * 2.0 ** (self.failures - 1))
        return step / 2 + random.uniform(0, step / 2)

    def reset(self) -> None:
        self.failures = 0


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Daemon:
    def __init__(self, config: Config, *, daemon_id: str | None = None) -> None:
        self.config = config
        self.keys = Keys(config.queues.prefix)
        self.priorities = list(config.queues.priorities)
        self._rank = {p: i for i, p in enumerate(self.priorities)}
        self.host = socket.gethostname()
        self.id = daemon_id or f"{self.host}-{os.getpid()}-{os.urandom(3).hex()}"
        self.log = get_logger(daemon_id=self.id)
        self.broker = Broker(
            config.redis.url,
            self.keys,
            socket_timeout_s=config.redis.socket_timeout_s,
            connect_timeout_s=config.redis.connect_timeout_s,
            password=redis_password(),
        )
        self.notifier = Notifier()
        self.slots = Slots(config.workers.slot_count)
        self.pool = Pool(
            self.slots.total,
            config.tasks.modules,
            default_timeout_s=config.jobs.timeout_s,
            max_jobs_per_worker=config.workers.max_jobs_per_worker,
            on_event=self._pool_event,
        )
        self.fetcher = BlockingFetch(self.broker, self.id, self.priorities)
        self.jobs_done = 0
        self.last_error = ""
        self._rng = random.Random()
        self._token = 0
        self._running: dict[str, jobs.Job] = {}
        # Written by the next cycle, in order, with a note on what each op is about.
        self._ops: list[jobs.Op] = []
        self._op_notes: list[tuple[str, Any]] = []
        self._finished: deque[tuple[jobs.Job, jobs.RunResult]] = deque()
        # Dispatched, start not yet written (see START_RECORD_AFTER_S).
        self._unstarted: dict[str, jobs.Job] = {}
        self._ops_since = 0.0  # when the oldest op waiting to be written was queued
        self._flush_timer: asyncio.TimerHandle | None = None
        self._start_timer: asyncio.TimerHandle | None = None
        self._cycle_wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._fetching = True
        # Set at the end of a stop: the loops finish what they are doing and return.
        # (They are not cancelled mid-I/O: on Python 3.11 a cancellation that lands as
        # a redis-py read completes can be lost, leaving a task that never ends.)
        self._closing = False
        self._closed = asyncio.Event()
        self._waiting: asyncio.Task[None] | None = None
        self._wait_backoff = Backoff()
        self._ewma_s: float | None = None  # average job duration, all tasks
        self._rtt_s = 0.0005  # average cycle round trip
        self._task_ewma_s: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._claims_dirty = False
        self._wake_scheduler = asyncio.Event()
        self._next_promote: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_dirty = asyncio.Event()
        self._reload = asyncio.Event()
        self._needs_restart: list[str] = []

    # --- public lifecycle --------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Begin a graceful stop; ``force`` skips the grace for running jobs."""
        if self._stop.is_set() and not force:
            force = True  # a second request means "now"
        self._stop.set()
        if force:
            self._force.set()

    def request_reload(self) -> None:
        """Re-read the configuration file soon (the SIGHUP handler calls this)."""
        self._reload.set()

    async def run(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> int:
        """Serve until ``shutdown_trigger`` completes (or ``stop`` is called); returns 0."""
        cfg = self.config
        self.log.info(
            "daemon starting",
            version=__version__,
            redis=mask_url(cfg.redis.url),
            priorities=self.priorities,
            slots=self.slots.total,
            config=cfg.path,
        )
        if shutdown_trigger is not None:
            self._spawn(self._trigger(shutdown_trigger))
        watchdog = watchdog_interval_s()
        if watchdog is not None:
            self._spawn(self._watchdog_loop(watchdog))
        self.notifier.send(STATUS="starting worker processes")
        try:
            await self.pool.start()
        except WorkerStartError as exc:
            self.notifier.send(STATUS=f"failed: {exc}")
            raise
        try:
            await self._until_redis_answers()
            if self._stop.is_set():
                return 0
            await self._register()
            self.log.info(
                "daemon ready", tasks=sorted(self.pool.task_names), worker_pids=self.pool.pids
            )
            # Start-up objects live as long as the daemon: keep them out of every
            # future collection, which shortens the GC pauses in the job path.
            gc.collect()
            gc.freeze()
            # Only now: Redis answers and the workers are up (Type=notify waits for it).
            self.notifier.ready(self._status_text())
            cycle = self._spawn(self._cycle_loop())
            self._cycle_wake.set()
            background = [
                self._spawn(self._heartbeat_loop()),
                self._spawn(self._scheduler_loop()),
                self._spawn(self._reload_loop()),
            ]
            if self.notifier.enabled:
                background.append(self._spawn(self._status_loop()))
            await self._stop.wait()
            self.notifier.stopping(f"stopping: draining {len(self._running)} running job(s)")
            await self._shutdown(cycle, background)
        finally:
            await self.pool.close()
            await self.fetcher.close()
            await self.broker.close()
        self.log.info("daemon stopped", jobs_done=self.jobs_done)
        return 0

    # --- helpers -----------------------------------------------------------------

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.critical("internal task failed", error=repr(exc), exc_info=exc)
            self.stop(force=True)

    async def _trigger(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> None:
        await shutdown_trigger()
        self.stop()

    async def _sleep_unless_stopped(self, delay_s: float) -> bool:
        """Sleep; True if the daemon was asked to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay_s)
        return self._stop.is_set()

    def _redis_down(self, what: str, exc: BrokerError, backoff: Backoff) -> float:
        delay = backoff.next_delay()
        self.last_error = str(exc)
        self.log.warning(
            "redis unavailable",
            during=what,
            error=str(exc),
            retry_in_s=round(delay, 3),
            failures=backoff.failures,
        )
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
                if await self._sleep_unless_stopped(delay):
                    return

    def _daemon_info(self) -> dict[str, str]:
        return {
            "host": self.host,
            "pid": str(os.getpid()),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pidns(),
            "priorities": ",".join(self.priorities),
            "slots": str(self.slots.total),
            "started_at": f"{time.time():.6f}",
            "version": __version__,
        }

    @property
    def _heartbeat_interval_s(self) -> float:
        return self.config.daemon.lease_s / 3

    @property
    def _lease_ms(self) -> int:
        """How long past a heartbeat this daemon counts as alive.

        Two intervals: one missed beat is tolerated, and since every live daemon
        checks for expired leases once an interval, a dead daemon's jobs are put
        back within lease_s of its last beat (2/3 + 1/3), as documented.
        """
        return int(self._heartbeat_interval_s * 2 * 1000)

    async def _register(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                await self._recover_local_predecessors()
                beat = await self.broker.heartbeat(self.id, self._lease_ms, self._daemon_info())
                self._after_heartbeat(beat)
                return
            except BrokerError as exc:
                await self._sleep_unless_stopped(self._redis_down("register", exc, backoff))

    async def _recover_local_predecessors(self) -> None:
        """Recover daemons that ran on this host and whose process is gone.

        After a SIGKILL and a restart (systemd's Restart=on-failure) the new process
        puts its predecessor's jobs back at once instead of waiting out the lease.
        Same host, same boot and same pid namespace are all required: a pid means
        nothing elsewhere, and a live daemon must never be robbed.
        """
        me = self._daemon_info()
        for other, info, _ in await self.broker.daemons():
            if other == self.id or not info.get("pid", "").isdigit():
                continue
            same_place = all(info.get(k) == me[k] and me[k] for k in ("host", "boot_id", "pidns"))
            if same_place and not _pid_alive(int(info["pid"])):
                n = await self.broker.recover(other, self.priorities)
                self.log.warning("recovered a dead daemon's jobs", dead_daemon=other, jobs=n)

    def _after_heartbeat(self, beat: Any) -> None:
        if beat.recovered_daemons:
            self.log.warning(
                "recovered jobs of daemons whose lease expired",
                dead_daemons=beat.recovered_daemons,
                jobs=beat.recovered_jobs,
            )
        if beat.next_due_ms is not None:
            self._schedule_wakeup(beat.next_due_ms)

    def _pool_event(self, event: str, **fields: Any) -> None:
        if event == "worker_died":
            self.log.error("worker process died", **fields)
        elif event == "worker_start_failed":
            self.last_error = fields.get("error", "")
            self.log.error("worker process failed to start", **fields)
        else:
            self.log.debug(event.replace("_", " "), **fields)

    # --- the cycle: one round trip writes what happened and claims what is next -----

    def _add_op(self, op: jobs.Op, note: tuple[str, Any]) -> None:
        self._queue_op(op, note)
        self._cycle_wake.set()

    def _queue_op(self, op: jobs.Op, note: tuple[str, Any]) -> None:
        if not self._ops:
            self._ops_since = time.monotonic()
        self._ops.append(op)
        self._op_notes.append(note)
        self._drained.clear()

    def _flush_due(self) -> bool:
        """Whether waiting ops must go now rather than with the next claim."""
        return (
            not self._fetching
            or len(self._ops) >= 256
            or time.monotonic() - self._ops_since >= COALESCE_S
        )

    def _arm_timer(self, name: str, at_monotonic: float) -> None:
        """Wake the cycle loop at ``at_monotonic`` unless that timer is already set."""
        if getattr(self, name) is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, at_monotonic - time.monotonic())

        def fire() -> None:
            setattr(self, name, None)
            self._cycle_wake.set()

        setattr(self, name, loop.call_later(delay, fire))

    def _batch_size(self, task: str | None = None) -> int:
        """How many jobs one worker gets at once: as many as fit in BATCH_BUDGET_S.

        Long or unknown jobs go one at a time; only runs of short ones are batched,
        so a batch delays a higher-priority job by about one short job at most.
        """
        ewma = self._ewma_s if task is None else self._task_ewma_s.get(task)
        if ewma is None:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_BUDGET_S / max(ewma, 1e-6))))

    def _plan_claim(self) -> tuple[int, int]:
        """(slot tokens taken, payloads to claim) for the next cycle."""
        if not self._fetching or self._waiting is not None:
            return 0, 0
        tokens = self.slots.try_acquire(self.slots.total)
        return tokens, tokens * self._batch_size()

    async def _cycle_loop(self) -> None:
        backoff = Backoff()
        while not self._closing:
            await self._cycle_wake.wait()
            self._cycle_wake.clear()
            restore = self._claims_dirty and self._waiting is None
            # Before a restore, every claim we know of must be settled in the same
            # cycle: a dispatched job whose start is not written yet is still in the
            # claim list, and a restore would put it back while it runs.
            self._build_ops(settle_all=restore)
            tokens, want = self._plan_claim()
            if want == 0 and self._ops and not restore and not self._flush_due():
                # Nothing to claim: outcomes wait (a few ms at most) to ride along with
                # the next claim, one round trip instead of two.
                self._arm_timer("_flush_timer", self._ops_since + COALESCE_S)
                continue
            ops, notes = self._ops, self._op_notes
            self._ops, self._op_notes = [], []
            self._ops_since = 0.0
            if restore:
                # A claim whose reply was lost moved payloads we do not know about.
                # After the ops (which settle every claim we do know), put the rest back.
                ops = ops + [jobs.restore_op(p) for p in self.priorities]
                notes = notes + [("restore", p) for p in self.priorities]
            if not ops and want == 0:
                if not self._finished:
                    self._drained.set()
                continue
            sent = time.monotonic()
            try:
                results, claimed = await self.broker.cycle(self.id, ops, want, self.priorities)
                self._rtt_s += 0.2 * (time.monotonic() - sent - self._rtt_s)
            except BrokerError as exc:
                # Nothing is known to have applied: every op is repeated as it was (they
                # are idempotent), and a claim that may have moved payloads is restored.
                self._ops[:0] = [
                    op for op, note in zip(ops, notes, strict=True) if note[0] != "restore"
                ]
                self._op_notes[:0] = [n for n in notes if n[0] != "restore"]
                if want:
                    self._claims_dirty = True
                self.slots.release(tokens)
                delay = self._redis_down("cycle", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._force.wait(), delay)
                if self._force.is_set():
                    self._ops.clear()
                    self._op_notes.clear()
                    self._drained.set()
                    return
                self._cycle_wake.set()
                continue
            backoff.reset()
            if restore:
                self._claims_dirty = False
            self._apply(notes, results)
            if want:
                if claimed:
                    self._take(claimed, tokens)
                else:
                    self._start_waiting(tokens)
            if self._ops or self._finished:
                self._cycle_wake.set()
            else:
                self._drained.set()

    def _apply(self, notes: list[tuple[str, Any]], results: list[int]) -> None:
        for (kind, obj), result in zip(notes, results, strict=True):
            if kind == "start":
                job: jobs.Job = obj
                if result < 0:
                    job.attempt = -1
                    self.log.warning(
                        "claim lost to lease recovery; this run may be repeated elsewhere",
                        job_id=job.id, task=job.task, queue=job.priority,
                    )  # fmt: skip
                else:
                    job.attempt = result
                    self.log.info(
                        "job started", job_id=job.id, task=job.task, queue=job.priority,
                        attempt=job.attempt,
                    )  # fmt: skip
            elif kind == "end":
                job, run, ending = obj
                self._log_ending(job, run, ending, bool(result))
                if ending.retry_in_s:
                    self._schedule_wakeup(int(ending.retry_in_s * 1000))
            elif kind == "finish":
                job, run = obj
                if result < 0:
                    self.log.warning(
                        "job finished but its claim was lost; not recorded here",
                        job_id=job.id, task=job.task, queue=job.priority,
                    )  # fmt: skip
                    continue
                job.attempt = result
                self.log.info(
                    "job started", job_id=job.id, task=job.task, queue=job.priority,
                    attempt=result,
                )  # fmt: skip
                self._log_ending(job, run, jobs.Ending("succeeded", []), True)
            elif kind == "unrun":
                job, run = obj
                self._log_ending(job, run, jobs.Ending("requeued", []), bool(result))
            elif kind == "reject":
                rej: jobs.Rejected = obj
                self.log.warning(
                    "job rejected", job_id=rej.id or None, task=rej.task or None,
                    queue=rej.priority, reason=rej.reason,
                )  # fmt: skip
            elif kind == "schedule":
                self.log.info(
                    "job scheduled", job_id=obj.id, task=obj.task, queue=obj.priority,
                    delay_s=obj.delay_ms / 1000,
                )  # fmt: skip
                self._schedule_wakeup(obj.delay_ms)
            elif kind == "restore" and result:
                self.log.info("put back payloads of a lost claim", queue=obj, jobs=result)

    def _take(self, claimed: list[tuple[str, bytes]], tokens: int) -> None:
        """Parse claimed payloads, hand the runnable ones to workers in batches (one slot
        token each), and queue their start records for the next cycle."""
        now = time.time()
        runnable: list[jobs.Job] = []
        for priority, raw in claimed:
            item = jobs.parse(
                raw,
                priority,
                known_tasks=self.pool.task_names,
                max_payload_bytes=self.config.jobs.max_payload_bytes,
                now=now,
            )
            ttl = self.config.jobs.result_ttl_s
            if isinstance(item, jobs.Rejected):
                self._add_op(
                    jobs.reject_op(item, daemon_id=self.id, ttl_s=ttl, now=now), ("reject", item)
                )
            elif item.delay_ms > 0:
                self._add_op(jobs.schedule_op(item, ttl_s=ttl, now=now), ("schedule", item))
            else:
                runnable.append(item)
        batches, spill = self._batches(runnable, tokens)
        # More than fits (the claim was sized before we knew which tasks came): back to
        # the head of their queues, latest first so the order there is kept.
        for job in reversed(spill):
            self._add_op(jobs.putback_op(job.priority, job.raw), ("putback", None))
        self.slots.release(tokens - len(batches))
        loop = asyncio.get_running_loop()
        for batch in batches:
            slot = _BatchSlot(self.slots, len(batch))
            on_start = None
            expected = self._task_ewma_s.get(batch[0].task)
            if (
                len(batch) == 1
                and expected is not None
                and PREFETCH_MIN_S <= expected <= PREFETCH_MAX_S
            ):
                # A lone job of known length gives its token back just before it is
                # expected to end (counted from when a worker starts it, not from
                # now: it may wait in the pool), so its successor is claimed in time.
                lead = 2 * self._rtt_s + PREFETCH_MARGIN_S
                on_start = functools.partial(
                    loop.call_later, max(0.0, expected - lead), self._release_early, slot
                )
            for job in batch:
                self._token += 1
                job.token = str(self._token)
                job.started_at = now
                job.dispatched_at = time.monotonic()
                self._running[job.token] = job
                self._unstarted[job.token] = job
            rank = self._rank[batch[0].priority]
            for job, future in zip(batch, self.pool.submit(batch, on_start, rank), strict=True):
                future.add_done_callback(functools.partial(self._on_job_done, job, slot))
        if batches:
            # Start records wait a moment: a job that is done by then is recorded in
            # one step (claim -> succeeded); one still running gets its "running".
            self._arm_timer("_start_timer", time.monotonic() + START_RECORD_AFTER_S)
        self._status_dirty.set()

    def _batches(
        self, runnable: list[jobs.Job], tokens: int
    ) -> tuple[list[list[jobs.Job]], list[jobs.Job]]:
        """Split runnable jobs into at most ``tokens`` batches, keeping claim order.

        Each free worker gets a job first (parallelism before batching); the rest join
        the smallest batch that still has room, where room is the batch size of its
        slowest task, so a task not known to be short always runs alone.
        """
        batches: list[list[jobs.Job]] = []
        limits: list[int] = []
        spill: list[jobs.Job] = []
        sizes: dict[str, int] = {}
        for job in runnable:
            size = sizes.get(job.task)
            if size is None:
                size = sizes[job.task] = self._batch_size(job.task)
            if len(batches) < tokens:
                batches.append([job])
                limits.append(size)
                continue
            room = [i for i, b in enumerate(batches) if len(b) < min(limits[i], size)]
            if not room:
                spill.append(job)
                continue
            i = min(room, key=lambda k: len(batches[k]))
            batches[i].append(job)
            limits[i] = min(limits[i], size)
        return batches, spill

    def _release_early(self, slot: _BatchSlot) -> None:
        slot.release()
        self._cycle_wake.set()  # a free token: time to claim

    def _on_job_done(
        self, job: jobs.Job, slot: _BatchSlot, future: asyncio.Future[jobs.RunResult]
    ) -> None:
        # A done-callback: small, synchronous, never raises.
        slot.job_done()
        self._running.pop(job.token, None)
        if future.cancelled() or future.exception() is not None:
            result = jobs.RunResult("not_run", error="pool future failed")
        else:
            result = future.result()
        if result.status in ("ok", "error"):
            took = max(0.0, result.finished_at - result.started_at)
            # The first run of a task sets its average outright: batching starts
            # after one round instead of ramping up over dozens.
            self._ewma_s = (
                took if self._ewma_s is None else self._ewma_s + 0.2 * (took - self._ewma_s)
            )
            prev = self._task_ewma_s.get(job.task, took)
            self._task_ewma_s[job.task] = prev + 0.2 * (took - prev)
        self._finished.append((job, result))
        self._drained.clear()
        self._cycle_wake.set()
        self._status_dirty.set()

    def _build_ops(self, settle_all: bool = False) -> None:
        """Turn finished runs into ops, and write the start of jobs still running.

        A success whose start was never written is one ``finish`` op. Any other
        ending needs its start on record first: the policy (retry or dead) needs the
        attempt number that the start record returns.
        """
        cfg = self.config.jobs
        ttl = cfg.result_ttl_s
        waiting: deque[tuple[jobs.Job, jobs.RunResult]] = deque()
        for job, run in self._finished:
            if job.attempt == 0:
                if self._unstarted.pop(job.token, None) is None:
                    waiting.append((job, run))  # its start op is on its way
                elif run.status == "ok":
                    op = jobs.finish_op(job, run, daemon_id=self.id, ttl_s=ttl)
                    self._queue_op(op, ("finish", (job, run)))
                elif run.status == "not_run":
                    # Never recorded as started: it goes back as it came, uncharged.
                    op = jobs.putback_op(job.priority, job.raw)
                    self._queue_op(op, ("unrun", (job, run)))
                else:
                    op = jobs.start_op(job, daemon_id=self.id, ttl_s=ttl, now=job.started_at)
                    self._queue_op(op, ("start", job))
                    waiting.append((job, run))
                continue
            if job.attempt < 0:
                continue  # the claim was lost: another daemon owns this job now
            ending = jobs.end_op(
                job,
                run,
                daemon_id=self.id,
                ttl_s=cfg.result_ttl_s,
                max_retries=cfg.max_retries,
                backoff_base_s=cfg.retry_backoff_s,
                backoff_max_s=cfg.retry_backoff_max_s,
                rng=self._rng,
            )
            self._queue_op(ending.op, ("end", (job, run, ending)))
        self._finished = waiting
        # Insertion order is dispatch order: stop at the first job not yet due.
        due = time.monotonic() - START_RECORD_AFTER_S
        while self._unstarted:
            token, job = next(iter(self._unstarted.items()))
            if job.dispatched_at > due and not settle_all:
                self._arm_timer("_start_timer", job.dispatched_at + START_RECORD_AFTER_S)
                break
            del self._unstarted[token]
            op = jobs.start_op(job, daemon_id=self.id, ttl_s=ttl, now=job.started_at)
            self._queue_op(op, ("start", job))

    # --- the blocking wait ---------------------------------------------------------

    def _start_waiting(self, tokens: int) -> None:
        # Keep one token while blocked: the job that wakes us has a slot.
        self.slots.release(tokens - 1)
        self._waiting = self._spawn(self._wait_for_jobs())

    async def _wait_for_jobs(self) -> None:
        try:
            claimed = await self.fetcher.wait()
        except BrokerError as exc:
            self._claims_dirty = True
            self.slots.release()
            self._waiting = None
            delay = self._redis_down("blocking fetch", exc, self._wait_backoff)
            await self._sleep_unless_stopped(delay)
            self._cycle_wake.set()
            return
        except asyncio.CancelledError:
            self._claims_dirty = True  # a BLMOVE may have moved a payload meanwhile
            self.slots.release()
            self._waiting = None
            raise
        self._wait_backoff.reset()
        self._waiting = None
        # Only the first (the highest priority) runs: a job that raced in behind it
        # goes back, and the next claim takes jobs in strict priority order.
        for priority, raw in claimed[1:]:
            self._add_op(jobs.putback_op(priority, raw), ("putback", None))
        self._take(claimed[:1], 1)
        self._cycle_wake.set()

    def _log_ending(
        self, job: jobs.Job, run: jobs.RunResult, ending: jobs.Ending, written: bool
    ) -> None:
        fields: dict[str, Any] = {
            "job_id": job.id,
            "task": job.task,
            "queue": job.priority,
            "attempt": job.attempt,
            "outcome": ending.status,
        }
        if run.status != "not_run":
            fields["duration_s"] = round(max(0.0, run.finished_at - run.started_at), 6)
        if not written:
            self.log.warning("job finished but its lease was lost; not recorded here", **fields)
            return
        if ending.status == "succeeded":
            self.jobs_done += 1
            self.log.info("job finished", **fields)
        elif ending.status == "requeued":
            self.log.info("job finished", **fields, reason=run.error or "not run")
        else:
            self.jobs_done += 1
            self.last_error = f"{job.task} {job.id}: {run.error}"
            level = self.log.error if ending.status == "dead" else self.log.warning
            extra: dict[str, Any] = {"error": run.error}
            if ending.status == "failed":
                extra["retry_in_s"] = round(ending.retry_in_s, 3)
            if run.traceback:
                extra["traceback"] = run.traceback
            level("job finished", **fields, **extra)

    # --- heartbeat and schedule ------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff()
        while not await self._sleep_unless_stopped(self._heartbeat_interval_s):
            try:
                beat = await self.broker.heartbeat(self.id, self._lease_ms, self._daemon_info())
            except BrokerError as exc:
                self._redis_down("heartbeat", exc, backoff)
                continue
            backoff.reset()
            if beat.registered:
                self.log.warning("lease had expired and was renewed; jobs in flight may run twice")
            self._after_heartbeat(beat)

    def _schedule_wakeup(self, delay_ms: int) -> None:
        at = time.monotonic() + delay_ms / 1000
        if self._next_promote is None or at < self._next_promote:
            self._next_promote = at
            self._wake_scheduler.set()

    async def _scheduler_loop(self) -> None:
        backoff = Backoff()
        while not self._closing:
            self._wake_scheduler.clear()
            if self._next_promote is None:
                await self._wake_scheduler.wait()
                continue
            delay = self._next_promote - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_scheduler.wait(), delay)
                continue
            self._next_promote = None
            try:
                moved, next_due = await self.broker.promote()
                backoff.reset()
            except BrokerError as exc:
                self._schedule_wakeup(int(self._redis_down("promote", exc, backoff) * 1000))
                continue
            if moved:
                self.log.debug("scheduled jobs due", jobs=moved)
            if next_due is not None:
                self._schedule_wakeup(next_due)

    # --- systemd: watchdog, status, reload ------------------------------------------

    async def _watchdog_loop(self, interval_s: float) -> None:
        # Pinged from the event loop itself: if the loop wedges, the pings stop and
        # systemd's WatchdogSec kills and restarts us.
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval_s)

    def _status_text(self) -> str:
        text = f"{self.slots.busy}/{self.slots.total} slots busy, {self.jobs_done} jobs done"
        if self.last_error:
            text += f", last error: {self.last_error[:150]}"
        if self._needs_restart:
            text += f"; restart needed for {', '.join(self._needs_restart)}"
        return text

    async def _status_loop(self) -> None:
        # Woken by changes only (nothing at idle), and at most once a second.
        last = ""
        while not self._closing:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            text = self._status_text()
            if text != last and not self._closing:
                self.notifier.send(STATUS=text)
                last = text
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 1.0)

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self._closing:
                return
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file and apply what can change live; True if applied.

        Live: log level and format, slots, max_jobs_per_worker, every [jobs] and
        [daemon] key. Redis, queues and task modules need a restart: they are named
        in the log and the STATUS line. An invalid file changes nothing.
        """
        self.notifier.reloading()
        try:
            new = configuration.load(self.config.path)
        except ConfigError as exc:
            self.last_error = f"reload rejected: {exc}"
            self.log.error(
                "reload rejected; still running the previous configuration", error=str(exc)
            )
            self.notifier.ready(self._status_text())
            return False
        merged, applied, pending = configuration.reloadable(self.config, new)
        if merged.log != self.config.log:
            log.configure(merged.log.level, merged.log.format)
            self.log = get_logger(daemon_id=self.id)
        slots = merged.workers.slot_count
        if slots != self.slots.total:
            self.slots.resize(slots)
            await self.pool.resize(slots)
            with contextlib.suppress(BrokerError):  # the next registration rewrites it
                await self.broker.update_daemon_info(self.id, {"slots": str(slots)})
        self.pool.default_timeout_s = merged.jobs.timeout_s
        self.pool.max_jobs_per_worker = merged.workers.max_jobs_per_worker
        self.config = merged
        self._needs_restart = pending
        # A key that needs a restart is something an operator must act on.
        report = self.log.warning if pending else self.log.info
        report("config reloaded", applied=applied, needs_restart=pending)
        self.notifier.ready(self._status_text())
        self._status_dirty.set()
        return True

    # --- shutdown ----------------------------------------------------------------

    async def _shutdown(
        self, cycle: asyncio.Task[None], background: list[asyncio.Task[None]]
    ) -> None:
        grace = self.config.daemon.shutdown_grace_s
        self.log.info(
            "stopping: no new jobs; waiting for running ones",
            running=len(self._running),
            grace_s=grace,
            force=self._force.is_set(),
        )
        self._fetching = False
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
            _, pending = await asyncio.wait([waiting], timeout=1.0)
            if pending:
                # The cancellation was lost (see _closing): closing the connections
                # makes the blocked BLMOVE reads fail instead.
                await self.fetcher.close()
                await asyncio.wait([waiting], timeout=2.0)
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
        self._cycle_wake.set()
        try:
            await asyncio.wait_for(self._drained.wait(), max(5.0, grace))
        except TimeoutError:
            self.log.error(
                "outcomes not written; the jobs stay in flight and will run again",
                job_ids=[job.id for job, _ in self._finished],
            )
        self._closing = True
        self._closed.set()
        for event in (self._cycle_wake, self._wake_scheduler, self._reload, self._status_dirty):
            event.set()
        tasks = [cycle, *background]
        _, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            self.log.error("a background task did not stop; cancelling it", task=repr(task))
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        try:
            put_back = await self.broker.recover(self.id, self.priorities)
            if put_back:
                self.log.info("put back jobs held at stop", jobs=put_back)
        except BrokerError as exc:
            self.log.error(
                "could not deregister; other daemons recover our jobs when the lease ends",
                error=str(exc),
            )


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
