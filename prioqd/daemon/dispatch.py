"""Claims in, outcomes out: parse each claimed payload, hand runnable jobs to the pool
in batches under slot tokens, and turn every finished run into the op that records
it. The cycle (``cycle.py``) carries the ops to Redis and brings the claims back.

One job's walk through this file: ``take`` (parse, schedule or reject, batch) ->
``_submit`` (pool futures, prefetch) -> ``_on_done`` (the future's done-callback:
the slot token back, the run queued) -> ``collect`` (the run becomes a ``Finish``,
or a ``Start`` then an ``End``) -> ``applied`` (the op's result: job state, log).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from prioqd import jobs
from prioqd.config import Config
from prioqd.daemon.slots import BatchSlot, Slots
from prioqd.jobs import Job, JobState, RunResult
from prioqd.metrics import NO_METRICS, UNKNOWN_TASK, Metrics
from prioqd.ops import (
    FAILED,
    LOST,
    NOT_FIRST,
    STUCK,
    Adopt,
    Bury,
    Drop,
    End,
    Finish,
    Lock,
    Op,
    Progress,
    Reject,
    Release,
    Restore,
    Schedule,
    Start,
    Unland,
)
from prioqd.pool import Pool
from prioqd.timing import Ewma

#: A worker is handed a run of short jobs expected to take about this long in all.
BATCH_BUDGET_S = 0.002
#: ...and never more jobs than this at once.
MAX_BATCH = 64
#: A lone job expected to take this long is prefetched for: its successor is claimed
#: just before it ends, so the worker does not wait a round trip for it. From where
#: jobs stop going in batches (shorter ones are batched, and a batch gives its token
#: back halfway, to the same effect); not for long ones (where the round trip is
#: noise and a job of a fleet would wait here for a whole long job while another
#: daemon idles). A higher job never waits behind the prefetched one: it waits in the
#: pool, the busy-mode waits watch the priorities above it, and the pool hands it back
#: when a higher one comes (``Pool.evict``). For 2 ms jobs this is 0.78 of the
#: workers' time against 0.70 with the claim's round trip after each.
PREFETCH_MIN_S = BATCH_BUDGET_S / 2
PREFETCH_MAX_S = 0.05
#: When a claim is made, lone jobs due to give their token back within this long give
#: it at once and are claimed for too: one round trip for several. On 2 workers of
#: 5 ms jobs a job then costs 0.62 cycles instead of 0.9, a tenth less daemon CPU and
#: a sixth less of Redis's. The successor claimed early waits in the pool at most
#: this long more (a higher job still takes its place there, ``Pool.evict``).
PREFETCH_PAIR_S = BATCH_BUDGET_S
PREFETCH_MARGIN_S = 0.0005
#: A job still running this long after dispatch has its start ("running") written;
#: one that ends sooner is recorded in one step, which halves its Redis work.
START_RECORD_AFTER_S = 0.02
#: A unique job's lock, once a claim takes it, lasts its timeout plus the lease plus
#: this: longer than the run can (a timeout kills it; a daemon that stops beating
#: has it recovered within the lease), so a second run cannot start beside it.
LOCK_MARGIN_S = 60


def batch_size(average_s: float | None) -> int:
    """How many jobs of this average length one worker gets at once: as many as fit
    in BATCH_BUDGET_S. Long or unknown jobs go one at a time, so a batch delays a
    higher-priority job by about one short job at most."""
    if average_s is None:
        return 1
    return max(1, min(MAX_BATCH, int(BATCH_BUDGET_S / max(average_s, 1e-6))))


def _average(averages: dict[str, Ewma], key: str) -> Ewma:
    # (Not setdefault: that would build an Ewma for every job, to throw it away.)
    avg = averages.get(key)
    if avg is None:
        avg = averages[key] = Ewma()
    return avg


class Dispatcher:
    def __init__(
        self,
        config: Config,
        *,
        daemon_id: str,
        pool: Pool,
        slots: Slots,
        redis_time: Callable[[], float],
        due_in_ms: Callable[[int], None],
        wake: Callable[[], None],
        log: Any,
    ) -> None:
        self.config = config
        self.daemon_id = daemon_id
        self.pool = pool
        self.slots = slots
        self._redis_time = redis_time
        self._due_in_ms = due_in_ms
        self._wake = wake
        self.log = log
        self._rank = {p: i for i, p in enumerate(config.queues.priorities)}
        self._rng = random.Random()
        #: Ops made outside a cycle (rejects, schedules, put-backs), sent with the next.
        self._outbox: list[Op] = []
        #: Runs that ended, oldest first, and are not turned into ops yet.
        self._finished: deque[tuple[Job, RunResult]] = deque()
        #: Dispatched jobs whose start is not written yet, in dispatch order.
        self._unrecorded: dict[int, Job] = {}
        self._start_timer: asyncio.TimerHandle | None = None
        #: The latest progress of running jobs, not written yet, by claim.
        self._progress: dict[int, Progress] = {}
        #: Landed jobs whose Adopt has not come back yet (it tells their attempt).
        self._adopting: dict[int, Job | None] = {}
        #: Unique jobs waiting for their lock (see ops.Lock) before they run.
        self._locking: dict[int, Job] = {}
        #: Ids of jobs an operator cancelled that may still come our way.
        self.cancels: set[str] = set()
        self._task_s: dict[str, Ewma] = {}
        self._priority_s: dict[str, Ewma] = {}
        #: Round trip of a cycle, for the prefetch lead.
        self.rtt_s = Ewma(initial=0.0005)
        #: Lone jobs' early token releases not yet due (see PREFETCH_MIN_S).
        self._early: dict[BatchSlot, tuple[asyncio.Handle, float]] = {}
        #: Called when the set of running priorities may have changed.
        self.on_change: Callable[[], None] = lambda: None
        #: Called when a run ended: its outcome waits to be written.
        self.on_outcome: Callable[[], None] = wake
        #: Called when ``last_error`` changed (after the outcome was written).
        self.on_error: Callable[[], None] = lambda: None
        self.jobs_done = 0
        self.last_error = ""
        self.metrics: Metrics = NO_METRICS

    @property
    def policy(self) -> jobs.Policy:
        cfg = self.config.jobs
        return jobs.Policy(
            ttl_s=cfg.result_ttl_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.retry_backoff_s,
            backoff_max_s=cfg.retry_backoff_max_s,
        )

    @property
    def ended(self) -> int:
        """Runs that ended and are not written yet."""
        return len(self._finished)

    @property
    def pending(self) -> bool:
        """Whether anything waits to be written."""
        return bool(
            self._outbox or self._finished or self._unrecorded or self._locking or self._progress
        )

    # --- claims in ---------------------------------------------------------------------

    def lowest_unstarted(self) -> int | None:
        """The rank (0 = highest) of the lowest priority among jobs held here that
        have not started: a higher job must not wait behind them."""
        return self.pool.lowest_rank(unstarted=True)

    def lowest_held(self) -> int | None:
        """The rank of the lowest priority among jobs held here, running or not."""
        return self.pool.lowest_rank(unstarted=False)

    def claim_sizes(self) -> list[tuple[str, int]]:
        """Payloads to claim per slot token, per priority (highest first)."""
        sizes = []
        for p in self.config.queues.priorities:
            avg = self._priority_s.get(p)
            sizes.append((p, batch_size(avg.value if avg else None)))
        return sizes

    def land(self, claim: int, priority: str, raw: bytes) -> None:
        """A payload the blocking wait moved into our landing list: adopt and take it."""
        self.slots.take_one()
        limit = self.config.jobs.max_payload_bytes
        if len(raw) > limit:
            reason = f"payload is {len(raw)} bytes, over max_payload_bytes={limit}"
            self.log.warning("job rejected", queue=priority, reason=reason)
            self._outbox.append(Drop(priority, len(raw), reason))
            self.slots.release()
            self._wake()
            return
        self._outbox.append(Adopt(raw, priority, claim))
        self._adopting[claim] = None
        self.take([(claim, priority, raw, 0)], 1)

    def land_back(self, claim: int, priority: str, raw: bytes) -> None:
        """A payload that landed while its wait was being called off: adopt it and put
        it back at the head of its queue, so that the next claim takes jobs in strict
        priority order (running it could start it before a higher job queued now)."""
        if len(raw) > self.config.jobs.max_payload_bytes:
            self.land(claim, priority, raw)  # dropped by reference, never run
            return
        self._outbox.append(Adopt(raw, priority, claim))
        self._outbox.append(Release([claim], why="race"))
        self._wake()

    def take(self, claimed: list[tuple[int, str, bytes, int]], tokens: int) -> None:
        """Parse claimed payloads (claim number, priority, payload, attempts used
        before) and hand the runnable ones to workers in batches (one slot token each);
        the rest become ops for the next cycle."""
        cfg = self.config.jobs
        now = self._redis_time()
        runnable: list[Job] = []
        for claim, priority, raw, used in claimed:
            item = jobs.parse(
                raw,
                priority,
                known_tasks=self.pool.task_names,
                max_payload_bytes=cfg.max_payload_bytes,
                max_timeout_s=cfg.max_timeout_s,
                now=now,
            )
            if isinstance(item, jobs.Rejected):
                self._outbox.append(
                    jobs.reject_op(
                        item, claim, daemon_id=self.daemon_id, ttl_s=cfg.result_ttl_s, now=now
                    )
                )
                continue
            item.claim = claim
            item.attempt = used + 1
            if claim in self._adopting:
                self._adopting[claim] = item
            if item.id in self.cancels:
                self._cancelled(item)
            elif item.due_ms:
                self._outbox.append(
                    jobs.schedule_op(item, daemon_id=self.daemon_id, ttl_s=cfg.result_ttl_s)
                )
            elif item.unique:
                # Runs only once it holds its lock: never twice at the same time.
                self._locking[claim] = item
                self._outbox.append(Lock(item, self._lock_ttl_s(item)))
            else:
                runnable.append(item)
        batches, spill = self._batches(runnable, tokens)
        if spill:
            # More than fits (the claim was sized before we knew which tasks came):
            # back to the head of their queues, in order.
            self._outbox.append(Release([j.claim for j in spill], spill, why="spill"))
        self.slots.release(tokens - len(batches))
        for batch in batches:
            self._submit(batch)
        if batches:
            # Start records wait a moment: a job that is done by then is recorded in
            # one step (claim -> succeeded); one still running gets its "running".
            self._arm_start_timer(time.monotonic() + START_RECORD_AFTER_S)
            self.on_change()
        if self._outbox:
            self._wake()

    def _lock_ttl_s(self, job: Job) -> int:
        """How long the lock a unique job's claim takes lasts (see LOCK_MARGIN_S); at
        least result_ttl_s, which the lock keeps if the job goes back to its queue."""
        cfg = self.config
        run_s = (job.timeout_s or cfg.jobs.timeout_s) + cfg.daemon.lease_s + LOCK_MARGIN_S
        return max(cfg.jobs.result_ttl_s, math.ceil(run_s))

    def _batches(self, runnable: list[Job], tokens: int) -> tuple[list[list[Job]], list[Job]]:
        """Split runnable jobs into at most ``tokens`` batches, keeping claim order.

        Each free worker gets a job first (parallelism before batching); the rest join
        the smallest batch of their priority that still has room, where room is the
        batch size of its slowest task, so a task not known to be short always runs
        alone, and a batch can be preempted as a whole by a higher priority.
        """
        batches: list[list[Job]] = []
        limits: list[int] = []
        spill: list[Job] = []
        sizes: dict[str, int] = {}
        for job in runnable:
            size = sizes.get(job.task)
            if size is None:
                size = sizes[job.task] = self._task_batch_size(job.task)
            if len(batches) < tokens:
                batches.append([job])
                limits.append(size)
                continue
            room = [
                i
                for i, b in enumerate(batches)
                if b[0].priority == job.priority and len(b) < min(limits[i], size)
            ]
            if not room:
                spill.append(job)
                continue
            i = min(room, key=lambda k: len(batches[k]))
            batches[i].append(job)
            limits[i] = min(limits[i], size)
        return batches, spill

    def _task_batch_size(self, task: str) -> int:
        avg = self._task_s.get(task)
        return batch_size(avg.value if avg else None)

    def joinable(self, batch: Sequence[Job]) -> bool:
        """Whether these jobs may go to one worker at once (``Pool.joinable``): the
        rule of ``_batches``, no more of them than the batch size of the slowest of
        their tasks (1 for a task not known)."""
        return len(batch) <= min(self._task_batch_size(t) for t in {j.task for j in batch})

    def _submit(self, batch: list[Job]) -> None:
        slot = BatchSlot(self.slots, len(batch))
        on_start = None
        avg = self._task_s.get(batch[0].task)
        expected = avg.value if avg else None
        if (
            len(batch) == 1
            and expected is not None
            and PREFETCH_MIN_S <= expected <= PREFETCH_MAX_S
        ):
            # A lone job of known length gives its token back just before it is
            # expected to end (counted from when a worker starts it, not from now: it
            # may wait in the pool), so its successor is claimed in time.
            lead = 2 * (self.rtt_s.value or 0.0) + PREFETCH_MARGIN_S
            on_start = functools.partial(self._arm_early, slot, max(0.0, expected - lead))
        now, mono = time.time(), time.monotonic()
        for job in batch:
            job.started_at = now
            job.dispatched_at = mono
            if job.enqueued_at is not None:
                self.metrics.job_started(job.priority, now - job.enqueued_at)
        try:
            futures = self.pool.submit(batch, on_start, self._rank.get(batch[0].priority, 0))
        except Exception as exc:  # the arguments cannot be sent to a worker
            if len(batch) > 1:
                for job in batch:
                    self.slots.take_one()
                    self._submit([job])
                slot.release()
                return
            run = RunResult("rejected", error=f"arguments cannot be sent to a worker: {exc!r}")
            run.started_at = run.finished_at = now
            slot.release()
            self._unrecorded[batch[0].claim] = batch[0]
            self._finish(batch[0], run)
            return
        if self.log.debug_enabled:
            for job in batch:
                self.log.debug("job dispatched", job_id=job.id, queue=job.priority)
        for job, future in zip(batch, futures, strict=True):
            self._unrecorded[job.claim] = job
            future.add_done_callback(functools.partial(self._on_done, job, slot))

    def _arm_early(self, slot: BatchSlot, delay_s: float) -> None:
        """Give ``slot``'s token back in ``delay_s`` (called as its job starts)."""
        loop = asyncio.get_running_loop()
        # (The due time is kept apart: uvloop makes a zero delay a plain Handle.)
        self._early[slot] = (
            loop.call_later(delay_s, self._release_early, slot),
            loop.time() + delay_s,
        )

    def _release_early(self, slot: BatchSlot) -> None:
        self._early.pop(slot, None)
        if slot.release():
            self._wake()  # a free token: time to claim

    def release_due(self) -> None:
        """A claim is about to be made: lone jobs due to give their token back within
        PREFETCH_PAIR_S give it now, so that one round trip claims for all of them."""
        if not self._early:
            return
        horizon = asyncio.get_running_loop().time() + PREFETCH_PAIR_S
        for slot, (handle, due) in list(self._early.items()):
            if due <= horizon:
                handle.cancel()
                self._early.pop(slot, None)
                slot.release()

    def _on_done(self, job: Job, slot: BatchSlot, future: asyncio.Future[RunResult]) -> None:
        # A done-callback: small, synchronous, never raises.
        slot.job_done()
        early = self._early.pop(slot, None)
        if early is not None:
            early[0].cancel()  # it ended before its token was due back early
        if future.cancelled() or future.exception() is not None:
            run = RunResult("not_run", error="pool future failed")
        else:
            run = future.result()
        if run.status in ("ok", "error"):
            took = max(0.0, run.finished_at - run.started_at)
            _average(self._task_s, job.task).add(took)
            _average(self._priority_s, job.priority).add(took)
        self._finish(job, run)

    def _cancelled(self, job: Job) -> None:
        """A job cancelled before it ran: it ends as such, and is not retried."""
        now = time.time()
        job.started_at = now
        self._unrecorded[job.claim] = job
        self._finish(job, jobs.cancelled_run(now))

    def cancel(self, ids: set[str]) -> None:
        """Operators' cancels as they stand in Redis (``<prefix>:cancels``): stop any of
        these jobs we run, drop any we hold, and stop any claimed later. The set is
        replaced, not added to: a cancel that was settled or withdrawn (the id pushed
        again) no longer applies."""
        new = ids - self.cancels
        self.cancels = set(ids)
        for job_id in new:
            stopped = self.pool.cancel(job_id)
            for claim, job in list(self._locking.items()):
                if job.id == job_id:
                    del self._locking[claim]
                    self._cancelled(job)
                    stopped += 1
            if stopped:
                self.log.info("job cancelled by an operator", job_id=job_id, jobs=stopped)

    def progress(self, job: Job, value: str) -> None:
        """A task reported progress (at most twice a second, see prioqd.context)."""
        self._progress[job.claim] = Progress(job, value, self.config.jobs.result_ttl_s)
        self._wake()

    def _finish(self, job: Job, run: RunResult) -> None:
        self._finished.append((job, run))
        self.on_outcome()
        self.on_change()

    # --- outcomes out --------------------------------------------------------------------

    def _arm_start_timer(self, at_monotonic: float) -> None:
        if self._start_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._start_timer = None
            self._wake()

        self._start_timer = loop.call_later(max(0.0, at_monotonic - time.monotonic()), fire)

    def _start(self, job: Job) -> Start:
        job.state = JobState.STARTING
        return jobs.start_op(job, daemon_id=self.daemon_id, ttl_s=self.config.jobs.result_ttl_s)

    def collect(self) -> list[Op]:
        """Every op pending to be written: made outside a cycle, for runs that ended,
        and the start records that are due (see START_RECORD_AFTER_S)."""
        ops, self._outbox = self._outbox, []
        if self._progress:
            # Before the ops that end those jobs: a claim's progress needs it held.
            ops.extend(self._progress.values())
            self._progress.clear()
        ttl = self.config.jobs.result_ttl_s
        awaiting_start: deque[tuple[Job, RunResult]] = deque()
        released: list[Job] = []
        for job, run in self._finished:
            state = job.state
            if state is JobState.CLAIMED:
                self._unrecorded.pop(job.claim, None)
                if run.status == "ok":
                    ops.append(jobs.finish_op(job, run, daemon_id=self.daemon_id, ttl_s=ttl))
                elif run.status == "not_run":
                    released.append(job)  # never recorded as started: back as it came
                else:
                    # The policy (retry or dead) needs the attempt the start returns.
                    ops.append(self._start(job))
                    awaiting_start.append((job, run))
            elif state is JobState.STARTING:
                awaiting_start.append((job, run))  # its start op is on its way
            elif state is JobState.STARTED:
                if run.status == "not_run":
                    released.append(job)
                else:
                    ops.append(
                        jobs.end_op(
                            job,
                            run,
                            daemon_id=self.daemon_id,
                            policy=self.policy,
                            now_ms=int(self._redis_time() * 1000),
                            rng=self._rng,
                        )
                    )
            # JobState.LOST: another daemon owns the job now; nothing to write.
        self._finished = awaiting_start
        if released:
            released.sort(key=lambda j: j.claim)
            ops.append(Release([j.claim for j in released], released, why="not run"))
        # Insertion order is dispatch order: stop at the first job not yet due.
        due = time.monotonic() - START_RECORD_AFTER_S
        for claim, job in list(self._unrecorded.items()):
            if job.state is not JobState.CLAIMED:
                continue
            if job.dispatched_at > due:
                self._arm_start_timer(job.dispatched_at + START_RECORD_AFTER_S)
                break
            del self._unrecorded[claim]
            ops.append(self._start(job))
        return ops

    def unwrite(self, ops: list[Op]) -> None:
        """Ops that were not applied (Redis did not answer): send them again first."""
        self._outbox[:0] = ops

    def applied(self, op: Op, result: int) -> None:
        """Act on the result of one op of a cycle."""
        match op:
            # (Cases are tried in order: the most common first.)
            case Finish(job=job, run=run):
                if result == NOT_FIRST:
                    # It has run before: record its start, then its end.
                    self._outbox.append(self._start(job))
                    self._finished.append((job, run))
                elif self._claim_gone(job, result, "finished"):
                    return
                else:
                    job.state = JobState.STARTED
                    job.attempt = result
                    self._log_started(job)
                    self._log_ending(job, run, jobs.Ending("succeeded"))
            case Lock(job=job):
                if self._locking.pop(job.claim, None) is None:
                    return  # cancelled meanwhile
                if result == 1:
                    self.slots.take_one()
                    self._submit([job])
                    self._arm_start_timer(time.monotonic() + START_RECORD_AFTER_S)
                    self.on_change()
                elif result == 0:
                    job.state = JobState.LOST
                    self.log.warning(
                        "job dropped: a run of this unique job is live", job_id=job.id,
                        task=job.task, queue=job.priority, outcome="duplicate",
                    )  # fmt: skip
                else:
                    self._claim_gone(job, result, "claimed")
            case Start(job=job):
                self._started(job, result)
            case End(job=job, run=run, ending=ending):
                if run.status == "cancelled":
                    self.cancels.discard(job.id)
                if not self._claim_gone(job, result, "finished"):
                    self._log_ending(job, run, ending)
                    if ending.retry_in_s:
                        self._due_in_ms(int(ending.retry_in_s * 1000))
            case Reject(rejected=rej):
                # A producer's name for a task we do not have: one label for all of
                # them, or each bogus name would add a series for good.
                task = rej.task if rej.task in self.pool.task_names else UNKNOWN_TASK
                self.metrics.job_ended(task, rej.priority, "dead", None)
                self.log.warning(
                    "job rejected", job_id=rej.id or None, task=rej.task or None,
                    queue=rej.priority, reason=rej.reason,
                )  # fmt: skip
            case Schedule(job=job) if result >= 0:
                delay_ms = max(0, job.due_ms - int(self._redis_time() * 1000))
                self.log.info(
                    "job scheduled", job_id=job.id, task=job.task, queue=job.priority,
                    delay_s=delay_ms / 1000,
                )  # fmt: skip
                self._due_in_ms(delay_ms)
            case Release(jobs=released, why=why) if result:
                for job in released:
                    self.metrics.job_ended(job.task, job.priority, "requeued", None)
                    self.log.info(
                        "job finished", job_id=job.id, task=job.task, queue=job.priority,
                        outcome="requeued", reason=why,
                    )  # fmt: skip
            case Restore() | Unland() if result > 0:
                self.log.info(
                    "put back payloads of a lost reply", op=type(op).__name__, jobs=result
                )
            case Adopt(claim=claim):
                landed = self._adopting.pop(claim, None)
                if landed is None:
                    return
                if result >= 1 and landed.state is JobState.CLAIMED:
                    landed.attempt = result
                elif result < 0:
                    # Not ours (recovered meanwhile: it is back in its queue): what
                    # this run ends with is not written.
                    self._claim_gone(landed, result, "landed")
            case Drop() | Progress() | Schedule() | Release() | Bury() | Restore() | Unland():
                pass

    def _claim_gone(self, job: Job, result: int, what: str) -> bool:
        if result >= 0:
            return False
        job.state = JobState.LOST
        # Nothing of it is ours to write any more, its start record neither. (A landed
        # job runs before its Adopt comes back; left here it would keep `pending` true
        # for good, and a stop would wait for it in vain.)
        self._unrecorded.pop(job.claim, None)
        fields = {"job_id": job.id, "task": job.task, "queue": job.priority}
        if result == LOST:
            self.log.warning(f"job {what} but its lease was lost; not recorded here", **fields)
        elif result == FAILED:
            self.log.error("job could not be recorded; it went to the dead letters", **fields)
        elif result == STUCK:
            self.log.critical(
                "job could not be recorded nor dead-lettered; it stays held", **fields
            )
        return True

    def _started(self, job: Job, result: int) -> None:
        if self._claim_gone(job, result, "started"):
            return
        job.state = JobState.STARTED
        job.attempt = result
        self._log_started(job)

    def _log_started(self, job: Job) -> None:
        self.log.info(
            "job started", job_id=job.id, task=job.task, queue=job.priority, attempt=job.attempt
        )

    def _log_ending(self, job: Job, run: RunResult, ending: jobs.Ending) -> None:
        fields: dict[str, Any] = {
            "job_id": job.id,
            "task": job.task,
            "queue": job.priority,
            "attempt": job.attempt,
            "outcome": ending.status,
            "duration_s": round(max(0.0, run.finished_at - run.started_at), 6),
        }
        self.jobs_done += 1
        self.metrics.job_ended(job.task, job.priority, ending.status, fields["duration_s"])
        if ending.status == "succeeded":
            self.log.info("job finished", **fields)
            return
        self.last_error = f"{job.task} {job.id}: {run.error}"
        self.on_error()
        level = self.log.error if ending.status == "dead" else self.log.warning
        extra: dict[str, Any] = {"error": run.error}
        if ending.status == "failed":
            extra["retry_in_s"] = round(ending.retry_in_s, 3)
        if run.traceback:
            extra["traceback"] = run.traceback
        level("job finished", **fields, **extra)
