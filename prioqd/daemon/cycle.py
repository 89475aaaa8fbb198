"""The cycle: one round trip writes what happened and claims what is next.

Each turn collects the ops the dispatcher has ready (outcomes, start records,
rejects, put-backs), takes the free slot tokens, and sends both in one Lua call
(``cycle`` in ``lua/prioqd.lua``). The reply's results go back to the dispatcher op
by op, and its claims are handed to ``Dispatcher.take``.

Outcomes with no claim to ride along wait up to COALESCE_S for one: one round trip
instead of two. A reply lost to a dropped connection is safe to repeat (every op is
guarded by its claim number); claims whose numbers we never saw are put back with
``Restore``, and a landing list whose blocking wait broke with ``Unland``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from prioqd.broker import Broker, CycleReply
from prioqd.config import Config
from prioqd.daemon.dispatch import Dispatcher
from prioqd.daemon.lease import Lease
from prioqd.daemon.slots import Slots
from prioqd.errors import BrokerError, PrioqdError, ScriptError
from prioqd.ops import (
    FAILED,
    LOST,
    STUCK,
    Adopt,
    Bury,
    Drop,
    End,
    Finish,
    Op,
    Reject,
    Release,
    Restore,
    Schedule,
    Start,
    Unland,
)
from prioqd.timing import Backoff, wait_event

#: How the script refuses a cycle when our own inflight hash has the wrong type.
UNUSABLE = "prioqd: daemon state unusable:"

#: Outcomes wait at most this long for a claim to ride along with.
COALESCE_S = 0.005
#: ...and go at once when this many are pending.
MAX_OPS = 256


class InternalError(PrioqdError):
    """Something the daemon cannot carry on from: it exits non-zero and is restarted."""


class Cycle:
    def __init__(
        self,
        broker: Broker,
        config: Config,
        *,
        slots: Slots,
        dispatch: Dispatcher,
        lease: Lease,
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
        on_idle: Callable[[], None],
        on_unlanded: Callable[[str], None],
        force: asyncio.Event,
        paused: set[str],
    ) -> None:
        self.broker = broker
        self.config = config
        self.slots = slots
        self.dispatch = dispatch
        self.lease = lease
        self.log = log
        self._on_redis_down = on_redis_down
        self._on_idle = on_idle
        self._on_unlanded = on_unlanded
        self._force = force
        #: The daemon's paused priorities, and whom to tell when a claim sees others.
        self.paused = paused
        self.on_paused: Callable[[set[str]], None] = lambda paused: None
        #: Dead letters dropped to keep within dead_letters_max: (how many, by what).
        self.on_trimmed: Callable[[int, str], None] = lambda n, during: None
        #: Told of a key of the wrong type a claim read as empty (said once, not
        #: every cycle), and of each one fixed since ("" when none is left).
        self.on_problems: Callable[[list[str]], None] = lambda problems: None
        self._problems: list[str] = []
        #: Called when a claim brought payloads (the daemon is busy).
        self.on_claimed: Callable[[], None] = lambda: None
        #: Claim numbers are ours to give; each claim reserves its whole range first.
        self._next_claim = 1
        #: Put-backs owed after lost replies, sent with the next cycle.
        self._repairs: list[Op] = []
        #: A call's reply was lost since the last one seen: the next call may repeat
        #: ops that applied, and Redis keeps their results for it (P:retired:D).
        self._repeat = False
        self._pending_since: float | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        #: Set whenever nothing is left to write.
        self.drained = asyncio.Event()
        #: Claims are made while this is true (cleared by a stop).
        self.fetching = True
        #: Whether the blocking waits claim, not the cycle (idle mode; Watch's to say).
        self.is_idle: Callable[[], bool] = lambda: False
        self._closing = False

    def wake(self) -> None:
        self.drained.clear()
        self._wake.set()

    def outcome(self) -> None:
        """A run ended. With no token free (none can be claimed for now) its outcome
        waits for the claim a freed token brings, or for COALESCE_S: the timer is armed
        here, without a turn of the loop that would only decide to wait."""
        if self.slots.free > 0 or self._repairs or self._flush_due(self.dispatch.ended):
            self.wake()
            return
        self.drained.clear()
        self._arm_flush()

    def new_claim(self) -> int:
        claim = self._next_claim
        self._next_claim += 1
        return claim

    def repair(self, op: Restore | Unland) -> None:
        self._repairs.append(op)
        self.wake()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    @property
    def settled(self) -> bool:
        """Nothing is left to write: no op pending, no repair owed."""
        return not self.dispatch.pending and not self._repairs

    def _flush_due(self, n_ops: int) -> bool:
        """Whether pending ops must go now rather than with the next claim."""
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        return not self.fetching or n_ops >= MAX_OPS or now - self._pending_since >= COALESCE_S

    def _arm_flush(self) -> None:
        if self._flush_timer is not None or self._pending_since is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._flush_timer = None
            self._wake.set()

        delay = max(0.0, self._pending_since + COALESCE_S - time.monotonic())
        self._flush_timer = loop.call_later(delay, fire)

    async def run(self) -> None:
        backoff = Backoff()
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            ops = self.dispatch.collect()
            tokens = 0
            if self.fetching and not self.is_idle() and self.lease.held and self.slots.free > 0:
                self.dispatch.release_due()
                tokens = self.slots.try_acquire(self.slots.free)
            if not tokens and ops and not self._repairs and not self._flush_due(len(ops)):
                # Nothing to claim: outcomes wait (a few ms at most) to ride along with
                # the next claim, one round trip instead of two.
                self.dispatch.unwrite(ops)
                self._arm_flush()
                continue
            repairs, self._repairs = self._repairs, []
            if not ops and not repairs and not tokens:
                if not self.dispatch.pending:
                    self.drained.set()
                continue
            self._pending_since = None
            if self._flush_timer is not None:
                # What it waited for goes now: it would only wake the loop for nothing.
                self._flush_timer.cancel()
                self._flush_timer = None
            sizes = self.dispatch.claim_sizes()
            lo = self._next_claim
            self._next_claim += tokens * max(size for _, size in sizes)
            # (Not _next_claim at the failure: payloads landing meanwhile take numbers
            # too, and a Restore over theirs would put back a job that runs here.)
            hi = self._next_claim - 1
            sent = time.monotonic()
            try:
                reply = await self.broker.cycle(
                    self.lease.id,
                    [*ops, *repairs],
                    next_claim=lo,
                    max_payload_bytes=self.config.jobs.max_payload_bytes,
                    max_dead=self.config.jobs.dead_letters_max,
                    tokens=tokens,
                    sizes=sizes,
                    repeat=self._repeat,
                )
            except BrokerError as exc:
                self._repeat = True
                # Nothing is known to have applied: every op is repeated as it was (they
                # are idempotent), and a claim that may have moved payloads is restored.
                self.slots.release(tokens)
                if tokens:
                    repairs.append(Restore(lo, hi))
                self._repairs[:0] = repairs
                if isinstance(exc, ScriptError) and UNUSABLE in str(exc):
                    # Our claims are gone with the hash; only a new daemon id (a
                    # restart) can hold jobs again. Whoever recovers this id reports it.
                    raise InternalError(str(exc)) from exc
                if isinstance(exc, ScriptError):
                    await self._isolate(ops, exc)
                    self.wake()
                    continue
                self.dispatch.unwrite(ops)
                if await wait_event(self._force, self._on_redis_down("cycle", exc, backoff)):
                    return  # a forced stop during an outage: what is held comes back by lease
                self.wake()
                continue
            backoff.reset()
            # Every op that a lost reply left unsure went in this call (collect takes
            # them all), and this reply is seen: the next call repeats nothing.
            self._repeat = False
            self.dispatch.rtt_s.add(time.monotonic() - sent)
            self._apply([*ops, *repairs], reply.results)
            for reason in reply.dropped:
                self.log.warning("job rejected", reason=reason)
            if reply.trimmed:
                self.on_trimmed(reply.trimmed, "cycle")
            if tokens and reply.lease_held:
                if reply.problems != self._problems:
                    self._problems = reply.problems
                    self.on_problems(reply.problems)
                if set(reply.paused) != self.paused:
                    self.on_paused(set(reply.paused))
            if not reply.lease_held:
                self.lease.lost()
            if tokens:
                if reply.claimed:
                    claimed = [(lo + i, *c) for i, c in enumerate(reply.claimed)]
                    self.dispatch.take(claimed, tokens)
                    self.on_claimed()
                else:
                    self.slots.release(tokens)
                    if reply.lease_held and self.fetching:
                        self._on_idle()  # every queue is empty: wait in Redis
            if self.dispatch.pending or self._repairs:
                self._wake.set()
            else:
                self.drained.set()

    def _apply(self, ops: list[Op], results: list[int]) -> None:
        for op, result in zip(ops, results, strict=True):
            if isinstance(op, Unland):
                self._on_unlanded(op.priority)
            self.dispatch.applied(op, result)

    async def _isolate(self, ops: list[Op], exc: ScriptError) -> None:
        """Redis refused a whole cycle for good: find the op it refuses by sending each
        alone, and send that op's jobs to the dead letters with Redis's reason."""
        if not ops:
            # A claim alone refused for good: nothing here can fix that (an ACL, a bug).
            raise InternalError(f"redis refused a claim: {exc}")
        self.log.error("redis refused a cycle; retrying its ops one by one", error=str(exc))
        for k, op in enumerate(ops):
            try:
                reply = await self._alone(op)
            except ScriptError as refused:
                await self._bury(op, str(refused))
                continue
            except BrokerError:
                self.dispatch.unwrite(ops[k:])  # an outage: the main loop backs off
                return
            self._apply([op], reply.results)

    async def _alone(self, op: Op) -> CycleReply:
        """A cycle of this one op, claiming nothing."""
        try:
            return await self.broker.cycle(
                self.lease.id,
                [op],
                next_claim=0,
                max_payload_bytes=0,
                max_dead=self.config.jobs.dead_letters_max,
                tokens=0,
                sizes=[],
                repeat=self._repeat,
            )
        except BrokerError:
            self._repeat = True  # it may have applied before the error
            raise

    async def _bury(self, op: Op, reason: str) -> None:
        claims: list[tuple[int, str]] = []
        match op:
            case Adopt(job_raw=raw, priority=priority, claim=claim):
                # Not in the inflight hash yet: from the landing list, by reference.
                why = f"redis refused to record it: {reason}"[:1000]
                drop = Drop(priority, len(raw), why, hashlib.sha1(raw).hexdigest())
                try:
                    (result,) = (await self._alone(drop)).results
                except ScriptError as again:
                    raise InternalError(
                        f"redis refused to dead-letter landed claim {claim}: {again}"
                    ) from again
                self.log.error(
                    "job dead-lettered: redis refused its op", claim=claim, reason=reason
                )
                # Its run (started as it landed) is not recorded.
                self.dispatch.applied(op, {1: FAILED, STUCK: STUCK}.get(result, LOST))
                return
            case Start(job=job) | Finish(job=job) | End(job=job) | Schedule(job=job):
                claims = [(job.claim, job.id)]
            case Reject(claim=claim, rejected=rej):
                claims = [(claim, rej.id)]
            case Release(claims=released):
                claims = [(c, "") for c in released]
            case _:
                raise InternalError(f"redis refused a {type(op).__name__} op: {reason}")
        for claim, job_id in claims:
            bury = Bury(claim, f"redis refused to record it: {reason}"[:1000], job_id)
            try:
                await self._alone(bury)
            except ScriptError as again:
                raise InternalError(
                    f"redis refused to dead-letter claim {claim}: {again}"
                ) from again
            self.log.error("job dead-lettered: redis refused its op", claim=claim, reason=reason)
        if not isinstance(op, Release):
            self.dispatch.applied(op, FAILED)
