"""The Lua script on its own, against a real redis-server: every cycle op built by
``prioqd.ops`` and applied twice (a lost reply, then the retry), and a stateful
hypothesis test that interleaves pushes, claims, landings, adoptions, ops, lost
batches sent again with more ops, recoveries and restores and checks the script's
invariant after every step: every job is in exactly one place, or has ended."""

from __future__ import annotations

import hashlib
import json
import os
import random
import typing
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

import pytest
import redis
from helpers import RedisServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prioqd import jobs, ops

SCRIPT = resources.files("prioqd").joinpath("lua/prioqd.lua").read_text()
P = "t"  # key prefix
D = "d1"
PRIORITIES = ["high", "low"]
SIZES = [("high", 2), ("low", 2)]
POLICY = jobs.Policy(ttl_s=60, max_retries=1, backoff_base_s=0.001, backoff_max_s=0.001)


class Script:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.sha = r.script_load(SCRIPT)
        #: What the last cycle reported as keys of the wrong type read as empty.
        self.problems: list[str] = []

    def call(self, *args: Any) -> Any:
        return self.r.evalsha(self.sha, 0, P, *args)

    def cycle(
        self,
        op_list: Sequence[ops.Op] = (),
        *,
        next_claim: int = 1,
        tokens: int = 0,
        max_bytes: int = 10_000,
        daemon: str = D,
        repeat: bool = False,
    ) -> tuple[list[int], list[tuple[str, bytes]], bool]:
        args: list[Any] = [
            "cycle", daemon, next_claim, max_bytes, 0, tokens, int(repeat), len(SIZES),
        ]  # fmt: skip
        for p, size in SIZES:
            args += [p, size]
        for op in op_list:
            args += op.args()
        results, flat, held, _dropped, _trimmed, _paused, problems = self.call(*args)
        self.problems = [x.decode() for x in problems]
        claimed = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 3)]
        return results, claimed, bool(held)

    def beat(self, daemon: str = D, lease_ms: int = 60_000) -> list[Any]:
        return self.call(  # type: ignore[no-any-return]
            "heartbeat", daemon, lease_ms, 10, 3, 0, "priorities", ",".join(PRIORITIES)
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("lua-redis"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def lua(server: RedisServer) -> Iterator[Script]:
    client = server.client()
    client.flushall()
    script = Script(client)
    script.beat()
    yield script
    client.close()


def parsed(raw: bytes, claim: int, priority: str = "high") -> jobs.Job:
    job = jobs.parse(raw, priority, known_tasks={"t"}, max_payload_bytes=10_000, now=1e9)
    assert isinstance(job, jobs.Job)
    job.claim = claim
    job.started_at = 1e9
    return job


def claim_one(lua: Script, payload: dict[str, Any], claim: int = 1) -> jobs.Job:
    raw = json.dumps(payload).encode()
    lua.r.lpush(f"{P}:queue:high", raw)
    _, claimed, held = lua.cycle(next_claim=claim, tokens=1)
    assert held and claimed == [("high", raw)]
    return parsed(raw, claim)


def inflight(lua: Script) -> dict[bytes, bytes]:
    return lua.r.hgetall(f"{P}:inflight:{D}")  # type: ignore[return-value]


def twice(lua: Script, op: ops.Op) -> tuple[int, int]:
    """Apply ``op``, snapshot what it changed, apply it again: nothing more changes."""
    first = lua.cycle([op])[0][0]
    before = snapshot(lua.r)
    second = lua.cycle([op], repeat=True)[0][0]
    assert snapshot(lua.r) == before, f"repeating {type(op).__name__} changed Redis"
    return first, second


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key in r.keys(f"{P}:*"):
        kind = r.type(key)
        if kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1)
        elif kind == b"string":
            out[key] = r.get(key)
    return out


# --- every op, applied twice ----------------------------------------------------------


def test_claim_takes_the_highest_priority_first_per_token_and_numbers_each(lua: Script) -> None:
    for i in range(3):
        lua.r.lpush(f"{P}:queue:low", f"l{i}")
    lua.r.lpush(f"{P}:queue:high", "h0")
    _, claimed, _ = lua.cycle(next_claim=10, tokens=2)
    # high: 1 payload, 1 token; low: the token left takes up to its size (2).
    assert claimed == [("high", b"h0"), ("low", b"l0"), ("low", b"l1")]
    assert sorted(inflight(lua)) == [b"10", b"11", b"12"]
    assert inflight(lua)[b"10"] == b"high\nc0\n0\nh0"


def test_no_claims_without_a_lease(lua: Script) -> None:
    lua.r.lpush(f"{P}:queue:high", "x")
    lua.r.zadd(f"{P}:daemons", {D: 1})  # expired long ago
    _, claimed, held = lua.cycle(tokens=1)
    assert not held and claimed == [] and lua.r.llen(f"{P}:queue:high") == 1


def test_adopt(lua: Script) -> None:
    lua.r.lpush(f"{P}:landing:{D}:high", b"x", b"x")  # two equal payloads landed
    assert twice(lua, ops.Adopt(b"x", "high", 5)) == (1, 1)  # first attempts
    assert lua.r.llen(f"{P}:landing:{D}:high") == 1 and list(inflight(lua)) == [b"5"]
    assert twice(lua, ops.Adopt(b"x", "high", 6)) == (1, 1)
    assert lua.r.llen(f"{P}:landing:{D}:high") == 0 and sorted(inflight(lua)) == [b"5", b"6"]
    assert lua.cycle([ops.Adopt(b"x", "high", 7)])[0] == [ops.LOST]


def test_a_repeated_adopt_and_release_leaves_a_later_identical_landing_alone(
    lua: Script,
) -> None:
    # The blocking wait lands X (claim 1); it is adopted and put back in one cycle
    # (Watch: a payload landing on a wait being called off), and the reply is lost.
    # X is claimed again and lands once more (claim 3) before the retry goes out.
    landing = f"{P}:landing:{D}:high"
    lua.r.lpush(landing, b"x")
    lost = [ops.Adopt(b"x", "high", 1), ops.Release([1], why="race")]
    lua.cycle(lost)
    assert lua.r.lrange(f"{P}:queue:high", 0, -1) == [b"x"]
    lua.r.lmove(f"{P}:queue:high", landing, "RIGHT", "LEFT")
    results, _, _ = lua.cycle([*lost, ops.Adopt(b"x", "high", 3)])
    # The retry changes nothing; claim 3 (already running in the daemon) holds the
    # second landing, and no copy went back to the queue to run twice.
    assert results == [ops.ADOPTED_BEFORE, 0, 1]
    assert list(inflight(lua)) == [b"3"]
    assert lua.r.llen(f"{P}:queue:high") == 0 and lua.r.llen(landing) == 0


def test_identical_delayed_landings_both_reach_the_schedule_when_a_reply_is_lost(
    lua: Script,
) -> None:
    landing = f"{P}:landing:{D}:high"
    raw = b'{"id":"twin","task":"t","delay_s":5}'
    lua.r.lpush(landing, raw)
    first = parsed(raw, 1)
    lost = [ops.Adopt(raw, "high", 1), jobs.schedule_op(first, daemon_id=D, ttl_s=60)]
    lua.cycle(lost)  # applied; the reply is lost
    lua.r.lpush(landing, raw)  # the twin lands: claim 2
    twin = parsed(raw, 2)
    results, _, _ = lua.cycle(
        [*lost, ops.Adopt(raw, "high", 2), jobs.schedule_op(twin, daemon_id=D, ttl_s=60)],
        repeat=True,
    )
    assert results == [ops.ADOPTED_BEFORE, 1, 1, 1]
    assert lua.r.zcard(f"{P}:scheduled") == 2
    assert inflight(lua) == {} and lua.r.llen(landing) == 0


def test_drop(lua: Script) -> None:
    lua.r.lpush(f"{P}:landing:{D}:high", b"y" * 50)
    assert twice(lua, ops.Drop("high", 50, "too big")) == (1, 0)
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert letter["reason"] == "too big" and letter["bytes"] == 50
    assert lua.r.get(letter["payload_key"]) == b"y" * 50


def test_an_oversized_unique_payload_gives_up_its_lock_on_either_way_in(lua: Script) -> None:
    """Claimed, or landed on a blocking wait and dropped by the daemon: either way it
    goes to the dead letters, and the "q" its push took goes too (else every push of
    the id would be a duplicate until the lock expired)."""
    big = json.dumps({"id": "u", "task": "t", "unique": True, "meta": {"x": "y" * 200}})
    lua.r.set(f"{P}:unique:u", "q")
    lua.r.lpush(f"{P}:queue:high", big)
    _, claimed, _ = lua.cycle(next_claim=1, tokens=1, max_bytes=100)
    assert claimed == [] and lua.r.llen(f"{P}:dead") == 1
    assert lua.r.get(f"{P}:unique:u") is None
    lua.r.set(f"{P}:unique:u", "q")
    lua.r.lpush(f"{P}:landing:{D}:high", big)
    assert lua.cycle([ops.Drop("high", len(big), "too big")])[0] == [1]
    assert lua.r.get(f"{P}:unique:u") is None and lua.r.llen(f"{P}:dead") == 2
    # A live run's lock ("D/C") is not the dropped payload's to release.
    lua.r.hset(f"{P}:inflight:d9", "3", "high\n1\n0\n{}")
    lua.r.set(f"{P}:unique:u", "d9/3")
    lua.r.lpush(f"{P}:queue:high", big)
    lua.cycle(next_claim=2, tokens=1, max_bytes=100)
    assert lua.r.get(f"{P}:unique:u") == b"d9/3"


def test_drop_by_sha1_takes_exactly_that_payload(lua: Script) -> None:
    # (How the daemon buries a landed payload whose adopt Redis refused.)
    landing = f"{P}:landing:{D}:high"
    lua.r.lpush(landing, b"a" * 10, b"b" * 10)
    sha = hashlib.sha1(b"a" * 10).hexdigest()
    assert twice(lua, ops.Drop("high", 10, "refused", sha)) == (1, 0)
    assert lua.r.lrange(landing, 0, -1) == [b"b" * 10]
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert lua.r.get(letter["payload_key"]) == b"a" * 10


def test_start(lua: Script) -> None:
    job = claim_one(lua, {"task": "t"})  # no id: one is pinned into its stored form
    op = jobs.start_op(job, daemon_id=D, ttl_s=60)
    assert twice(lua, op) == (1, 1)
    h = lua.r.hgetall(f"{P}:job:{job.id}")
    assert h[b"status"] == b"running" and h[b"attempts"] == b"1" and h[b"claim"] == b"d1/1"
    assert inflight(lua)[b"1"] == b"high\n1\n0\n" + job.json.encode()


def test_finish(lua: Script) -> None:
    job = claim_one(lua, {"id": "f", "task": "t"})
    run = jobs.RunResult("ok", "42", started_at=1.0, finished_at=2.0)
    assert twice(lua, jobs.finish_op(job, run, daemon_id=D, ttl_s=60)) == (1, 1)
    assert inflight(lua) == {}
    assert lua.r.hget(f"{P}:job:f", "status") == b"succeeded"
    done = [json.loads(x) for x in lua.r.lrange(f"{P}:done:f", 0, -1)]
    assert done == [done[0]] and done[0]["result"] == 42 and done[0]["attempts"] == 1


def test_finish_replaces_a_past_outcome_and_fails_alone_on_a_done_key_of_another_type(
    lua: Script,
) -> None:
    """The done list's push is finish's first write (no TYPE first): a list left by a
    past run of the id ends up holding only this outcome; a key of another type is left
    as it was and the job goes to the dead letters, with nothing else written."""
    lua.r.rpush(f"{P}:done:old", "past outcome", "and another")
    lua.r.set(f"{P}:done:bad", "x")
    run = jobs.RunResult("ok", "7", started_at=1.0, finished_at=2.0)
    old = claim_one(lua, {"id": "old", "task": "t"}, claim=1)
    bad = claim_one(lua, {"id": "bad", "task": "t"}, claim=2)
    results, _, _ = lua.cycle([jobs.finish_op(j, run, daemon_id=D, ttl_s=60) for j in (old, bad)])
    assert results == [1, ops.FAILED]
    (done,) = lua.r.lrange(f"{P}:done:old", 0, -1)
    assert json.loads(done)["result"] == 7 and 0 < lua.r.ttl(f"{P}:done:old") <= 60
    assert lua.r.get(f"{P}:done:bad") == b"x" and not lua.r.exists(f"{P}:job:bad")
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert f"{P}:done:bad holds a string" in letter["reason"] and inflight(lua) == {}


def test_a_repeat_answers_as_the_first_call_after_its_id_was_claimed_again(lua: Script) -> None:
    """Found by the claim machine: two payloads of one id; the first's finish and the
    second's start go in one call whose reply is lost. Sent again, the finish must still
    say it applied (attempt 1), though the job hash now names the second claim: the
    daemon logs, counts and wakes waiters from that answer."""
    first = claim_one(lua, {"id": "same", "task": "t"}, claim=1)
    second = claim_one(lua, {"id": "same", "task": "t"}, claim=2)
    run = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)
    lost = [
        jobs.finish_op(first, run, daemon_id=D, ttl_s=60),
        jobs.start_op(second, daemon_id=D, ttl_s=60),
    ]
    assert lua.cycle(lost)[0] == [1, 2]
    assert lua.cycle(lost, repeat=True)[0] == [1, 2]
    ended = jobs.end_op(second, run, daemon_id=D, policy=POLICY, now_ms=0, rng=random.Random())
    assert lua.cycle([*lost, ended], repeat=True)[0] == [1, 2, 1]
    # The start's own repeat, after its claim ended: the attempt it ran as.
    assert lua.cycle([*lost, ended], repeat=True)[0] == [1, 2, 1]
    # A call after a reply seen forgets: nothing of D can be a repeat any more.
    assert lua.r.hlen(f"{P}:retired:{D}") == 2  # claims 1 and 2, settled
    assert 0 < lua.r.ttl(f"{P}:retired:{D}") <= 86400
    lua.cycle([])
    assert not lua.r.exists(f"{P}:retired:{D}")
    assert lua.cycle([ended])[0] == [ops.LOST]


def test_finish_refuses_a_job_that_ran_before(lua: Script) -> None:
    lua.r.hset(f"{P}:job:g", "attempts", 1)
    job = claim_one(lua, {"id": "g", "task": "t"})
    run = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)
    assert twice(lua, jobs.finish_op(job, run, daemon_id=D, ttl_s=60)) == (ops.NOT_FIRST,) * 2
    assert list(inflight(lua)) == [b"1"] and not lua.r.exists(f"{P}:done:g")


@pytest.mark.parametrize("status", ["ok", "error", "dead"])
def test_end(lua: Script, status: str) -> None:
    job = claim_one(lua, {"id": "e", "task": "t", "max_retries": 0 if status == "dead" else 1})
    lua.cycle([jobs.start_op(job, daemon_id=D, ttl_s=60)])
    job.attempt = 1
    run = jobs.RunResult(
        "ok" if status == "ok" else "error", "7", "E: x", started_at=1.0, finished_at=2.0
    )
    op = jobs.end_op(job, run, daemon_id=D, policy=POLICY, now_ms=0, rng=random.Random(1))
    assert twice(lua, op) == (1, 1)
    assert inflight(lua) == {}
    h = lua.r.hgetall(f"{P}:job:e")
    expected = {"ok": b"succeeded", "error": b"failed", "dead": b"dead"}[status]
    assert h[b"status"] == expected
    assert lua.r.zcard(f"{P}:scheduled") == (1 if status == "error" else 0)
    assert lua.r.llen(f"{P}:dead") == (1 if status == "dead" else 0)
    assert lua.r.llen(f"{P}:done:e") == (0 if status == "error" else 1)


def test_reject(lua: Script) -> None:
    raw = b'{"id":"r","task":"nope"}'
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.cycle(tokens=1)
    rej = jobs.parse(raw, "high", known_tasks={"t"}, max_payload_bytes=100, now=0)
    assert isinstance(rej, jobs.Rejected)
    assert twice(lua, jobs.reject_op(rej, 1, daemon_id=D, ttl_s=60, now=0)) == (1, 1)
    assert lua.r.llen(f"{P}:dead") == 1 and lua.r.llen(f"{P}:done:r") == 1


def throughput(r: redis.Redis) -> dict[str, int]:
    """Outcomes counted in every P:throughput:<minute>, by status."""
    out: dict[str, int] = {}
    for key in r.keys(f"{P}:throughput:*"):
        assert 0 < r.ttl(key) <= 3600
        for status, n in r.hgetall(key).items():
            out[status.decode()] = out.get(status.decode(), 0) + int(n)
    return out


def test_outcomes_are_counted_per_minute_once_each(lua: Script) -> None:
    run_ok = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)
    ended = []
    runs: list[tuple[str, jobs.RunStatus, int]] = [
        ("e1", "ok", 1), ("e2", "error", 1), ("e3", "error", 0), ("e4", "cancelled", 1)
    ]  # fmt: skip
    for claim, (job_id, status, retries) in enumerate(runs, start=1):
        job = claim_one(lua, {"id": job_id, "task": "t", "max_retries": retries}, claim)
        lua.cycle([jobs.start_op(job, daemon_id=D, ttl_s=60)])
        run = jobs.RunResult(status, "7", "E: x", "", 1.0, 2.0)
        ended.append(
            jobs.end_op(job, run, daemon_id=D, policy=POLICY, now_ms=0, rng=random.Random(1))
        )
    finished = claim_one(lua, {"id": "f1", "task": "t"}, 5)
    raw = b'{"id":"r","task":"nope"}'
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.cycle(next_claim=6, tokens=1)
    rej = jobs.parse(raw, "high", known_tasks={"t"}, max_payload_bytes=100, now=0)
    assert isinstance(rej, jobs.Rejected)
    batch = [
        *ended,
        jobs.finish_op(finished, run_ok, daemon_id=D, ttl_s=60),
        jobs.reject_op(rej, 6, daemon_id=D, ttl_s=60, now=0),
    ]
    assert lua.cycle(batch)[0] == [1, 1, 1, 1, 1, 1]
    expected = {"succeeded": 2, "failed": 1, "dead": 2, "cancelled": 1}
    assert throughput(lua.r) == expected
    lua.cycle(batch)  # a lost reply, repeated: counted once
    assert throughput(lua.r) == expected


def test_a_throughput_key_of_another_type_costs_nothing_but_the_count(lua: Script) -> None:
    now_s = lua.r.time()[0]
    for m in range(now_s // 60 - 1, now_s // 60 + 2):
        lua.r.lpush(f"{P}:throughput:{m}", "x")
    job = claim_one(lua, {"id": "f", "task": "t"})
    run = jobs.RunResult("ok", "42", started_at=1.0, finished_at=2.0)
    assert lua.cycle([jobs.finish_op(job, run, daemon_id=D, ttl_s=60)])[0] == [1]
    assert lua.r.hget(f"{P}:job:f", "status") == b"succeeded" and inflight(lua) == {}


def test_schedule(lua: Script) -> None:
    job = claim_one(lua, {"id": "s", "task": "t", "delay_s": 5})
    job = parsed(job.raw, 1)  # due 5 s after now=1e9
    assert twice(lua, jobs.schedule_op(job, daemon_id=D, ttl_s=60)) == (1, 1)
    assert lua.r.zrange(f"{P}:scheduled", 0, -1, withscores=True) == [
        (f"high\nd1/1\n{job.json}".encode(), float(job.due_ms))
    ]


def test_release_keeps_fifo_order_and_uncounts_a_started_attempt(lua: Script) -> None:
    for i in range(3):
        lua.r.lpush(f"{P}:queue:high", json.dumps({"id": f"q{i}", "task": "t"}))
    SIZES[0] = ("high", 3)
    try:
        _, claimed, _ = lua.cycle(tokens=1)
    finally:
        SIZES[0] = ("high", 2)
    assert len(claimed) == 3
    started = parsed(claimed[0][1], 1)
    lua.cycle([jobs.start_op(started, daemon_id=D, ttl_s=60)])
    assert twice(lua, ops.Release([1, 2, 3])) == (3, 3)
    head_first = [json.loads(x)["id"] for x in reversed(lua.r.lrange(f"{P}:queue:high", 0, -1))]
    assert head_first == ["q0", "q1", "q2"]
    h = lua.r.hgetall(f"{P}:job:q0")
    assert h[b"status"] == b"queued" and h[b"attempts"] == b"0"


def test_bury(lua: Script) -> None:
    claim_one(lua, {"id": "b", "task": "t"})
    assert twice(lua, ops.Bury(1, "refused")) == (1, 1)
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert letter["reason"] == "refused"
    assert json.loads(lua.r.get(letter["payload_key"]))["id"] == "b"  # type: ignore[arg-type]


def test_restore_puts_back_unseen_claims_only(lua: Script) -> None:
    for x in (b"a", b"b", b"c"):
        lua.r.lpush(f"{P}:queue:high", x)
    lua.cycle(next_claim=20, tokens=2)  # claims 20..22: the reply is "lost"
    seen = parsed(b'{"id":"s","task":"t"}', 30)
    lua.r.hset(f"{P}:inflight:{D}", "30", b"high\nc0\n0\n" + seen.raw)
    assert twice(lua, ops.Restore(20, 29)) == (3, 3)
    assert lua.r.lrange(f"{P}:queue:high", 0, -1) == [b"c", b"b", b"a"]
    assert list(inflight(lua)) == [b"30"]


def test_unland(lua: Script) -> None:
    lua.r.lpush(f"{P}:landing:{D}:low", b"1", b"2")
    assert twice(lua, ops.Unland("low")) == (2, 0)
    assert lua.r.lrange(f"{P}:queue:low", 0, -1) == [b"2", b"1"]


def test_lock(lua: Script) -> None:
    job = claim_one(lua, {"id": "u", "task": "t", "unique": True})
    assert twice(lua, ops.Lock(job, 600)) == (1, 1)  # ours, and ours again
    assert lua.r.get(f"{P}:unique:u") == f"{D}/1".encode()
    # A second claim of the same id while the first holds it: a duplicate, dropped.
    other = claim_one(lua, {"id": "u", "task": "t", "unique": True}, claim=2)
    assert twice(lua, ops.Lock(other, 600)) == (0, 0)  # dropped, and again
    assert list(inflight(lua)) == [b"1"] and lua.r.get(f"{P}:unique:u") == f"{D}/1".encode()


def test_progress(lua: Script) -> None:
    job = claim_one(lua, {"id": "g", "task": "t"})
    lua.cycle([jobs.start_op(job, daemon_id=D, ttl_s=60)])
    assert twice(lua, ops.Progress(job, '{"done": 3}', 60)) == (1, 1)
    assert lua.r.hget(f"{P}:job:g", "progress") == b'{"done": 3}'
    lua.cycle([ops.Bury(1, "gone")])  # the claim ends: its progress no longer lands
    assert lua.cycle([ops.Progress(job, '{"done": 4}', 60)])[0] == [ops.LOST]
    assert lua.r.hget(f"{P}:job:g", "progress") == b'{"done": 3}'


def _every_op(lua: Script) -> dict[type, ops.Op]:
    """One op of each type, each in a state where it applies."""

    def claimed(job_id: str, claim: int, **fields: Any) -> jobs.Job:
        return claim_one(lua, {"id": job_id, "task": "t", **fields}, claim=claim)

    lua.r.lpush(f"{P}:landing:{D}:high", b"a")
    lua.r.lpush(f"{P}:landing:{D}:low", b"b", b"z" * 50)
    run = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)
    started = claimed("st", 1)
    lua.cycle([jobs.start_op(started, daemon_id=D, ttl_s=60)])
    started.attempt = 1
    rej_raw = b'{"id":"rj","task":"nope"}'
    lua.r.lpush(f"{P}:queue:high", rej_raw)
    lua.cycle(next_claim=7, tokens=1)
    rej = jobs.parse(rej_raw, "high", known_tasks={"t"}, max_payload_bytes=100, now=0)
    assert isinstance(rej, jobs.Rejected)
    delayed = parsed(claimed("sc", 8, delay_s=5).raw, 8)
    built: list[ops.Op] = [
        ops.Adopt(b"a", "high", 50),
        ops.Drop("low", 50, "too big"),
        ops.Progress(started, "1", 60),
        ops.Lock(claimed("lk", 2, unique=True), 600),
        jobs.start_op(claimed("s2", 3), daemon_id=D, ttl_s=60),
        jobs.finish_op(claimed("fi", 4), run, daemon_id=D, ttl_s=60),
        jobs.end_op(started, run, daemon_id=D, policy=POLICY, now_ms=0, rng=random.Random(1)),
        jobs.reject_op(rej, 7, daemon_id=D, ttl_s=60, now=0),
        jobs.schedule_op(delayed, daemon_id=D, ttl_s=60),
        ops.Release([claimed("re", 9).claim]),
        ops.Bury(claimed("bu", 10).claim, "refused"),
        ops.Restore(40, 49),
        ops.Unland("low"),
    ]
    return {type(op): op for op in built}


def test_every_op_type_runs_through_the_script_and_repeating_it_changes_nothing(
    lua: Script,
) -> None:
    """Built with prioqd.ops (the one Python copy of each layout), applied, then applied
    again as after a lost reply: nothing more changes. A new op type fails this test
    until it is added here."""
    every = _every_op(lua)
    assert set(every) == set(typing.get_args(ops.Op))
    for op in every.values():
        first, _ = twice(lua, op)
        assert first not in (ops.LOST, ops.FAILED), (type(op).__name__, first)


def test_an_op_on_a_wrong_type_key_fails_alone_before_writing(lua: Script) -> None:
    lua.r.lpush(f"{P}:job:v", "x")  # a list where the job hash should be
    job = claim_one(lua, {"id": "v", "task": "t"}, claim=1)
    good = claim_one(lua, {"id": "w", "task": "t"}, claim=2)
    run = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)
    results, _, _ = lua.cycle(
        [
            jobs.finish_op(job, run, daemon_id=D, ttl_s=60),
            jobs.finish_op(good, run, daemon_id=D, ttl_s=60),
        ]
    )
    assert results == [ops.FAILED, 1]
    assert lua.r.lrange(f"{P}:job:v", 0, -1) == [b"x"] and not lua.r.exists(f"{P}:done:v")
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert letter["reason"].startswith("redis error: WRONGTYPE") and inflight(lua) == {}
    assert lua.r.hget(f"{P}:job:w", "status") == b"succeeded"


def test_a_unique_lock_follows_its_job_on_every_path(lua: Script) -> None:
    """The lock says "q" while its job waits, "D/C" while a claim holds it, and is gone
    once the job has ended, however it ended; an enqueue finds a lock whose claim is
    gone free."""

    def enqueue(job_id: str) -> int:
        payload = json.dumps({"id": job_id, "task": "t", "unique": True})
        return int(lua.call("enqueue", "high", payload, job_id, "1", 60))

    def lock(job_id: str) -> bytes | None:
        return lua.r.get(f"{P}:unique:{job_id}")  # type: ignore[return-value]

    def claim(job_id: str, c: int) -> jobs.Job:
        assert enqueue(job_id) == 1 and lock(job_id) == b"q"
        _, claimed, _ = lua.cycle(next_claim=c, tokens=1)
        job = parsed(claimed[0][1], c)
        assert lua.cycle([ops.Lock(job, 600)])[0] == [1]
        assert lock(job_id) == f"{D}/{c}".encode() and lua.r.ttl(f"{P}:unique:{job_id}") > 590  # type: ignore[operator]
        return job

    # Put back (a higher job took its place): it waits again, and keeps its expiry.
    claim("rel", 1)
    lua.cycle([ops.Release([1])])
    assert lock("rel") == b"q" and lua.r.ttl(f"{P}:unique:rel") > 590  # type: ignore[operator]
    assert enqueue("rel") == 0
    lua.r.delete(f"{P}:queue:high")
    # Buried, or an op Redis refused: dead letters; the id is free.
    claim("bur", 2)
    lua.cycle([ops.Bury(2, "refused", "bur")])
    assert lock("bur") is None
    job = claim("wrong", 3)
    lua.r.lpush(f"{P}:job:wrong", "x")
    assert lua.cycle([jobs.start_op(job, daemon_id=D, ttl_s=60)])[0] == [ops.FAILED]
    assert lock("wrong") is None
    # Rejected before it took the lock (its task is unknown): the "q" goes.
    assert enqueue("rej") == 1
    _, claimed, _ = lua.cycle(next_claim=4, tokens=1)
    rej = jobs.parse(claimed[0][1], "high", known_tasks=set(), max_payload_bytes=10_000, now=0)
    assert isinstance(rej, jobs.Rejected)
    lua.cycle([jobs.reject_op(rej, 4, daemon_id=D, ttl_s=60, now=0)])
    assert lock("rej") is None
    # Its daemon died: recovered to its queue, it waits again; dying once too often
    # (max_recoveries = 0 here), it is poison: dead letters, and the id is free.
    lua.beat("d2")  # registered: from its next beat on, its lease is unbroken
    claim("rec", 5)
    lua.r.zadd(f"{P}:daemons", {D: 1})
    lua.beat("d2")
    assert lock("rec") == b"q" and lua.r.llen(f"{P}:queue:high") == 1
    lua.beat(D)
    _, claimed, _ = lua.cycle(next_claim=6, tokens=1)
    assert lua.cycle([ops.Lock(parsed(claimed[0][1], 6), 600)])[0] == [1]
    lua.r.zadd(f"{P}:daemons", {D: 1})
    assert lua.call("heartbeat", "d2", 60_000, 10, 0, 0)[4] == 1  # one poison payload
    assert lock("rec") is None
    lua.beat(D)
    # A lock whose claim is gone (an ending that never reached it) holds nothing.
    lua.r.delete(f"{P}:queue:high")
    lua.r.set(f"{P}:unique:gone", "d9/7")
    assert enqueue("gone") == 1 and lock("gone") == b"q"
    lua.r.hset(f"{P}:inflight:d9", "8", "high\nc0\n0\nx")
    lua.r.set(f"{P}:unique:live", "d9/8")
    assert enqueue("live") == 0 and lock("live") == b"d9/8"


def test_recovery_of_a_dead_daemon_counts_it_and_poison_goes_to_the_dead_letters(
    lua: Script,
) -> None:
    raw = b'{"id":"p","task":"t"}'
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.beat("d2")  # registered: from its next beat on, its lease is unbroken
    for round_ in range(4):
        _, claimed, _ = lua.cycle(next_claim=1, tokens=1)
        assert claimed == [("high", raw)], round_
        lua.r.zadd(f"{P}:daemons", {D: 1})  # D's lease ran out
        lua.beat("d2")  # d2 recovers it (max_recoveries = 3)
        lua.beat(D)
    assert lua.r.llen(f"{P}:queue:high") == 0
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert letter["reason"] == "poison: its daemon died 4 times while holding it"
    assert lua.r.get(letter["payload_key"]) == raw
    assert_waiter_hears_poison(lua, "p")


def assert_waiter_hears_poison(lua: Script, job_id: str) -> None:
    """A job that never started still tells its waiter (hash and done list) it died."""
    reason = "poison: its daemon died 4 times while holding it"
    assert lua.r.hget(f"{P}:job:{job_id}", "status") == b"dead"
    assert lua.r.hget(f"{P}:job:{job_id}", "error") == reason.encode()
    (done,) = [json.loads(x) for x in lua.r.lrange(f"{P}:done:{job_id}", 0, -1)]
    assert done["status"] == "dead" and done["error"] == reason


@pytest.mark.parametrize(
    "raw",
    [
        *(json.dumps({"id": i, "task": "t"}).encode() for i in ["", "two words", "x" * 201]),
        *(json.dumps({"id": i, "task": "t"}).encode() for i in ["tab\there", "nbsp\u00a0"]),
        b'{"id":"caf\xc3\xa9","task":"t"}',  # Unicode: left to the dead letter
        b'{"id":"job-\xff","task":"t"}',  # not UTF-8
    ],
)
def test_a_poison_payload_with_an_id_no_daemon_accepts_writes_no_job_record(
    lua: Script, raw: bytes
) -> None:
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.beat("d2")
    _, claimed, _ = lua.cycle(next_claim=1, tokens=1)
    assert claimed == [("high", raw)]
    lua.r.zadd(f"{P}:daemons", {D: 1})
    assert lua.call("heartbeat", "d2", 60_000, 10, 0, 0)[4] == 1  # max_recoveries 0
    assert lua.r.llen(f"{P}:dead") == 1
    assert lua.r.keys(f"{P}:job:*") == [] and lua.r.keys(f"{P}:done:*") == []


def test_a_poison_payload_leaves_the_record_of_another_run_of_its_id_alone(
    lua: Script,
) -> None:
    """The same id pushed again and running on another daemon: the poison copy (never
    started) must not tell that run's waiter it died."""
    raw = json.dumps({"id": "twin", "task": "t"}).encode()
    lua.r.hset(f"{P}:job:twin", mapping={"status": "running", "claim": "d9/1"})
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.beat("d2")
    assert lua.cycle(next_claim=1, tokens=1)[1] == [("high", raw)]
    lua.r.zadd(f"{P}:daemons", {D: 1})
    assert lua.call("heartbeat", "d2", 60_000, 10, 0, 0)[4] == 1  # dead-lettered
    assert lua.r.hget(f"{P}:job:twin", "status") == b"running"
    assert not lua.r.exists(f"{P}:done:twin")


def test_heartbeat_recover_and_promote_return_the_dead_letters_they_trimmed(
    lua: Script,
) -> None:
    """Each command that may add a dead letter says how many old ones it dropped to
    keep within max_dead (the daemon logs and counts them)."""
    lua.r.lpush(f"{P}:dead", "old1", "old2")
    # heartbeat: a recovered poison payload (its daemon died max_recoveries + 1 times).
    raw = b'{"id":"p","task":"t"}'
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.beat("d2")
    for _ in range(4):
        lua.cycle(next_claim=1, tokens=1)
        lua.r.zadd(f"{P}:daemons", {D: 1})
        reply = lua.call("heartbeat", "d2", 60_000, 10, 3, 2)
        lua.beat(D)
    assert reply[4] == 1 and reply[7] == 1  # one poisoned, one old letter dropped
    # recover: with max_recoveries 0, the held payload is poison at once.
    claim_one(lua, {"id": "q", "task": "t"})
    assert lua.call("recover", D, 1, 0, 2, "high") == [0, 1, 1, b""]
    # promote: a due job of a priority nobody serves.
    lua.r.zadd(f"{P}:scheduled", {'ghost\nd/1\n{"id":"g","task":"t"}': 0})
    assert lua.call("promote", 100, 2)[1::2] == [1, 1]
    assert lua.r.llen(f"{P}:dead") == 2
    # Nothing due (and a schedule of another type): the same shape, nothing trimmed.
    assert lua.call("promote", 100, 2) == [0, 0, -1, 0]
    lua.r.set(f"{P}:scheduled", "x")
    assert lua.call("promote", 100, 2) == [0, 0, -1, 0]


def test_a_stalled_redis_does_not_make_the_first_daemon_to_speak_recover_the_others(
    lua: Script,
) -> None:
    lua.beat("d2")
    claim_one(lua, {"id": "k", "task": "t"})
    # Both leases ran out (a stall): d2 speaks first; its own lease was broken too.
    lua.r.zadd(f"{P}:daemons", {D: 1, "d2": 1})
    registered, lapsed, recovered, *_ = lua.beat("d2")
    assert (registered, lapsed, recovered) == (0, 1, b"")
    assert list(inflight(lua)) == [b"1"]


# --- keys of the wrong type -----------------------------------------------------------


def test_a_paused_key_of_the_wrong_type_reads_as_nothing_paused_and_is_reported(
    lua: Script,
) -> None:
    lua.r.set(f"{P}:paused", "x")
    lua.r.lpush(f"{P}:queue:high", b"h")
    _, claimed, held = lua.cycle(tokens=1)
    assert held and claimed == [("high", b"h")]
    assert lua.problems == [
        f"WRONGTYPE: {P}:paused holds a string, not a set: read as no priority paused"
    ]
    assert lua.r.get(f"{P}:paused") == b"x"


@pytest.mark.parametrize("key", ["inflight", "landing"])
def test_a_daemon_whose_own_key_has_the_wrong_type_is_refused_and_claims_nothing(
    lua: Script, key: str
) -> None:
    lua.r.lpush(f"{P}:queue:high", b"h")
    lua.r.lpush(f"{P}:landing:{D}:low", b"l")
    broken = f"{P}:inflight:{D}" if key == "inflight" else f"{P}:landing:{D}:high"
    lua.r.set(broken, "x")
    before = snapshot(lua.r)
    with pytest.raises(redis.ResponseError, match=f"daemon state unusable: WRONGTYPE: {broken}"):
        lua.cycle([ops.Unland("high"), ops.Unland("low")], tokens=1)
    assert snapshot(lua.r) == before


@pytest.mark.parametrize("key", ["inflight", "landing", "daemon"])
def test_recovery_leaves_a_dead_daemons_key_of_the_wrong_type_and_recovers_the_rest(
    lua: Script, key: str
) -> None:
    # Two daemons died holding a job each; one of them has a key of the wrong type.
    # The survivor's heartbeat recovers both, puts back every job it can reach, and
    # reports (rather than fails on) the broken key, which it leaves as it is.
    lua.beat("d2")
    lua.beat("d3")
    for d, job in ((D, b"a"), ("d3", b"b")):
        lua.r.lpush(f"{P}:queue:high", job)
        assert lua.cycle(tokens=1, daemon=d)[1] == [("high", job)]
    lua.r.lpush(f"{P}:landing:{D}:low", b"l")
    broken = {
        "inflight": f"{P}:inflight:{D}",
        "landing": f"{P}:landing:{D}:high",
        "daemon": f"{P}:daemon:{D}",
    }[key]
    lua.r.delete(broken)
    lua.r.set(broken, "x")
    lua.r.zadd(f"{P}:daemons", {D: 1, "d3": 1})
    _, _, recovered, queued, dead, _, _, _, problems = lua.beat("d2")
    assert sorted(recovered.split(b",")) == [D.encode(), b"d3"]
    kind = "list" if key == "landing" else "hash"
    assert problems.decode() == f"WRONGTYPE: {broken} holds a string, not a {kind}"
    back = lua.r.lrange(f"{P}:queue:high", 0, -1) + lua.r.lrange(f"{P}:queue:low", 0, -1)
    # (Its inflight hash unreadable, "a" is lost to prioqd; everything else comes back.)
    expected = [b"b", b"l"] if key == "inflight" else [b"a", b"b", b"l"]
    assert sorted(back) == expected and (queued, dead) == (len(expected), 0)
    assert lua.r.get(broken) == b"x"
    assert lua.r.zrange(f"{P}:daemons", 0, -1) == [b"d2"]


def test_a_landed_payload_counts_the_deaths_of_its_daemons_and_becomes_poison(
    lua: Script,
) -> None:
    # In idle mode a job runs before its adopt is applied: a payload that kills its
    # daemon at once dies in the landing list. Each such death counts, as for a claim.
    raw = b'{"id":"p","task":"t"}'
    lua.r.lpush(f"{P}:queue:high", raw)
    lua.beat("d2")
    for round_ in range(4):
        assert lua.r.lmove(f"{P}:queue:high", f"{P}:landing:{D}:high", "RIGHT", "LEFT") == raw
        lua.r.zadd(f"{P}:daemons", {D: 1})
        lua.beat("d2")
        lua.beat(D)
        assert lua.r.llen(f"{P}:landing:{D}:high") == 0, round_
    assert lua.r.llen(f"{P}:queue:high") == 0
    (letter,) = [json.loads(x) for x in lua.r.lrange(f"{P}:dead", 0, -1)]
    assert letter["reason"] == "poison: its daemon died 4 times while holding it"
    assert lua.r.get(letter["payload_key"]) == raw
    assert_waiter_hears_poison(lua, "p")


def test_a_periodic_tick_is_not_recorded_while_its_queue_has_the_wrong_type(
    lua: Script,
) -> None:
    lua.r.set(f"{P}:queue:low", "x")
    with pytest.raises(redis.ResponseError, match=f"WRONGTYPE: {P}:queue:low"):
        lua.call("periodic", "tick", 1000, "low", b"job", 0)
    assert lua.r.hget(f"{P}:periodic", "tick") is None
    lua.r.delete(f"{P}:queue:low")
    assert lua.call("periodic", "tick", 1000, "low", b"job", 0) == 1
    assert lua.r.lrange(f"{P}:queue:low", 0, -1) == [b"job"]


def test_undead_into_a_queue_of_the_wrong_type_writes_nothing(lua: Script) -> None:
    letter = json.dumps({"reason": "r", "payload_key": f"{P}:payload:1"})
    lua.r.lpush(f"{P}:dead", letter)
    lua.r.set(f"{P}:payload:1", b"job")
    lua.r.set(f"{P}:queue:high", "x")
    before = snapshot(lua.r)
    with pytest.raises(redis.ResponseError, match=f"WRONGTYPE: {P}:queue:high"):
        lua.call("undead", letter, "high", "", "", f"{P}:payload:1", 60)
    assert snapshot(lua.r) == before


def test_undead_of_a_unique_job_takes_its_lock_or_leaves_the_letter(lua: Script) -> None:
    payload = json.dumps({"id": "u", "task": "t", "unique": True})
    letter = json.dumps({"reason": "r", "id": "u", "payload": payload})
    lua.r.lpush(f"{P}:dead", letter)
    # A live job of that id (queued: "q") holds the lock: the letter stays.
    lua.r.set(f"{P}:unique:u", "q")
    before = snapshot(lua.r)
    assert lua.call("undead", letter, "high", payload, "u", "", 60) == -2
    assert snapshot(lua.r) == before
    # The lock freed: requeued, holding the lock as a push would.
    lua.r.delete(f"{P}:unique:u")
    assert lua.call("undead", letter, "high", payload, "u", "", 60) == 1
    assert lua.r.lrange(f"{P}:queue:high", 0, -1) == [payload.encode()]
    assert lua.r.get(f"{P}:unique:u") == b"q" and 0 < lua.r.ttl(f"{P}:unique:u") <= 60
    assert lua.r.llen(f"{P}:dead") == 0
    # A lock whose claim is gone holds nothing, as at a push.
    lua.r.delete(f"{P}:queue:high")
    lua.r.lpush(f"{P}:dead", letter)
    lua.r.set(f"{P}:unique:u", "d9/4")
    assert lua.call("undead", letter, "high", payload, "u", "", 60) == 1
    assert lua.r.get(f"{P}:unique:u") == b"q"
    # A letter already gone is said so (0), not called a duplicate.
    assert lua.call("undead", letter, "high", payload, "u", "", 60) == 0


# --- the invariant under any interleaving ---------------------------------------------

PAYLOADS = [
    b'{"id":"same","task":"t"}',
    b'{"id":"same","task":"t"}',
    b'{"task":"t"}',
    b'{"id":"other","task":"t","delay_s":0.001}',
]


Callback = Callable[[int], None]


def ignore(result: int) -> None:
    """What the model does with the result of an op that moves a payload it does not
    track (back to a queue, to the schedule)."""


RUN_OK = jobs.RunResult("ok", "1", started_at=1.0, finished_at=2.0)


class ClaimMachine(RuleBasedStateMachine):
    """Model: how many payloads were pushed and how many ended; the claims we know.

    Redis must always account for every payload: queued, landed, held, scheduled,
    dead or ended. As in ``Cycle``, ops go in batches whose reply may be lost: the
    lost batch is then sent again at the head of the next one, with new ops appended
    (and may be lost again). Claims may be lost (the reply never seen: ``Restore``);
    payloads land on the blocking wait, seen (adopted alone, or in one batch with the
    op that settles them, as ``Dispatcher.land`` and ``land_back`` send them) or
    unseen (a broken wait: ``Unland``); the daemon may be recovered by another."""

    def __init__(self) -> None:
        super().__init__()
        self.pushed = 0
        self.ended = 0
        self.next_claim = 1
        self.known: dict[int, jobs.Job] = {}  # claims we saw and hold, no op on its way
        self.started: set[int] = set()  # of those, the ones recorded as running
        self.lost_ranges: list[tuple[int, int]] = []
        self.landed: list[tuple[int, str, bytes]] = []  # seen, no Adopt sent yet
        self.unacked: list[tuple[ops.Op, Callback]] = []  # sent, the reply lost
        self.repeat = False  # the last call's reply was lost
        self.recoveries = 0  # times the daemon was recovered by another
        #: Priorities whose wait broke: as in ``Watch``, nothing lands there until an
        #: Unland's result is back.
        self.dirty: set[str] = set()

    @initialize()
    def start(self) -> None:
        self.lua = Script(self.server.client())
        self.lua.r.flushall()
        self.lua.beat()

    server: RedisServer  # set by the test below

    @staticmethod
    def job(raw: bytes, priority: str, claim: int) -> jobs.Job:
        job = jobs.parse(raw, priority, known_tasks={"t"}, max_payload_bytes=10_000, now=1e9)
        assert isinstance(job, jobs.Job)
        job.claim = claim
        return job

    def cycle(
        self, batch: Sequence[tuple[ops.Op, Callback]], *, tokens: int = 0, lose: bool = False
    ) -> None:
        full = [*self.unacked, *batch]
        lo = self.next_claim
        self.next_claim += tokens * 2
        results, claimed, _ = self.lua.cycle(
            [op for op, _ in full], next_claim=lo, tokens=tokens, repeat=self.repeat
        )
        # As in ``Cycle``: a call after a lost reply says so (its ops answer as before).
        self.repeat = lose
        if lose:
            self.unacked = full
            if tokens:
                self.lost_ranges.append((lo, self.next_claim - 1))
            return
        self.unacked = []
        for (_, done), result in zip(full, results, strict=True):
            done(result)
        for i, (p, raw) in enumerate(claimed):
            self.known[lo + i] = self.job(raw, p, lo + i)

    # --- what the model learns from results ----------------------------------------

    def adopted(self, job: jobs.Job, hold: bool) -> Callback:
        """An Adopt's result. A landed job runs at once (``Dispatcher.land``), so an
        Adopt must not miss its payload unless another daemon recovered ours: the
        job would run here while its payload is queued again, or lost."""
        recoveries = self.recoveries

        def done(result: int) -> None:
            assert result != ops.LOST or self.recoveries > recoveries, (
                f"claim {job.claim} landed here but its Adopt found nothing"
            )
            if result >= 1 and hold:
                self.known[job.claim] = job

        return done

    def finished(self, job: jobs.Job) -> Callback:
        def done(result: int) -> None:
            if result == ops.NOT_FIRST:
                self.known[job.claim] = job  # still held: it takes start, then end
            elif result >= 1:
                self.ended += 1

        return done

    def started_as(self, job: jobs.Job) -> Callback:
        def done(attempt: int) -> None:
            if attempt >= 1:
                job.attempt = attempt
                self.known[job.claim] = job
                self.started.add(job.claim)

        return done

    def ended_as(self, succeeded: bool) -> Callback:
        def done(result: int) -> None:
            self.ended += result == 1 and succeeded

        return done

    # --- rules ----------------------------------------------------------------------

    @rule(payload=st.sampled_from(PAYLOADS), priority=st.sampled_from(PRIORITIES))
    def push(self, payload: bytes, priority: str) -> None:
        self.lua.r.lpush(f"{P}:queue:{priority}", payload)
        self.pushed += 1

    @rule(tokens=st.integers(1, 2), lose=st.booleans())
    def claim(self, tokens: int, lose: bool) -> None:
        self.cycle([], tokens=tokens, lose=lose)

    @precondition(lambda self: self.unacked)
    @rule(lose=st.booleans())
    def resend(self, lose: bool) -> None:
        self.cycle([], lose=lose)

    @precondition(lambda self: self.lost_ranges)
    @rule(lose=st.booleans())
    def restore(self, lose: bool) -> None:
        lo, hi = self.lost_ranges.pop()
        self.cycle([(ops.Restore(lo, hi), ignore)], lose=lose)

    @rule(priority=st.sampled_from(PRIORITIES), seen=st.booleans())
    def land(self, priority: str, seen: bool) -> None:
        """The blocking wait moves the head of a queue into our landing list; we read
        it (a claim number is given), or the wait broke and we did not."""
        if priority in self.dirty:
            return
        queue, landing = f"{P}:queue:{priority}", f"{P}:landing:{D}:{priority}"
        raw = self.lua.r.lmove(queue, landing, "RIGHT", "LEFT")
        if raw is not None and seen:
            self.landed.append((self.next_claim, priority, raw))
            self.next_claim += 1
        elif not seen:
            self.dirty.add(priority)

    @precondition(lambda self: self.landed)
    @rule(data=st.data(), lose=st.booleans())
    def adopt(self, data: st.DataObject, lose: bool) -> None:
        # The oldest seen landing of a priority: they are adopted in landing order.
        priority = data.draw(st.sampled_from(sorted({p for _, p, _ in self.landed})))
        k = next(i for i, (_, p, _) in enumerate(self.landed) if p == priority)
        claim, _, raw = self.landed.pop(k)
        job = self.job(raw, priority, claim)
        adopt = ops.Adopt(raw, priority, claim)
        how = data.draw(st.sampled_from(["alone", "release", "schedule", "finish"]))
        if how == "alone":
            self.cycle([(adopt, self.adopted(job, hold=True))], lose=lose)
            return
        adopted = self.adopted(job, hold=False)
        if how == "release":  # land_back: adopted and put back in one batch
            self.cycle([(adopt, adopted), (ops.Release([claim]), ignore)], lose=lose)
        elif how == "schedule":  # a delayed job that landed
            job.due_ms = 1
            schedule = jobs.schedule_op(job, daemon_id=D, ttl_s=60)
            self.cycle([(adopt, adopted), (schedule, ignore)], lose=lose)
        else:  # a short job that ended before its Adopt went out
            finish = jobs.finish_op(job, RUN_OK, daemon_id=D, ttl_s=60)
            self.cycle([(adopt, adopted), (finish, self.finished(job))], lose=lose)

    @rule(priority=st.sampled_from(PRIORITIES), lose=st.booleans())
    def unland(self, priority: str, lose: bool) -> None:
        """A broken wait's landing list goes back; the Adopts of what we saw land there
        go first (they were queued before the wait broke)."""
        self.dirty.add(priority)  # no wait there until the Unland's reply is back
        batch: list[tuple[ops.Op, Callback]] = []
        for claim, p, raw in [x for x in self.landed if x[1] == priority]:
            self.landed.remove((claim, p, raw))
            job = self.job(raw, p, claim)
            batch.append((ops.Adopt(raw, p, claim), self.adopted(job, hold=True)))
        unlanded = (ops.Unland(priority), lambda _: self.dirty.discard(priority))
        self.cycle([*batch, unlanded], lose=lose)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), lose=st.booleans())
    def settle(self, data: st.DataObject, lose: bool) -> None:
        claim = data.draw(st.sampled_from(sorted(self.known)))
        job = self.known.pop(claim)
        op: ops.Op
        if claim in self.started:
            kind = data.draw(st.sampled_from(["end-ok", "end-fail", "release"]))
        else:
            kind = data.draw(st.sampled_from(["finish", "start", "release", "schedule"]))
        if kind == "finish":
            op, done = jobs.finish_op(job, RUN_OK, daemon_id=D, ttl_s=60), self.finished(job)
        elif kind == "start":
            op, done = jobs.start_op(job, daemon_id=D, ttl_s=60), self.started_as(job)
        elif kind.startswith("end"):
            run = RUN_OK if kind == "end-ok" else jobs.RunResult("error", error="E")
            op = jobs.end_op(job, run, daemon_id=D, policy=POLICY, now_ms=0, rng=random.Random())
            done = self.ended_as(op.ending.status == "succeeded")
        elif kind == "release":
            op, done = ops.Release([claim]), ignore
        else:
            job.due_ms = 1
            op, done = jobs.schedule_op(job, daemon_id=D, ttl_s=60), ignore
        self.started.discard(claim)
        self.cycle([(op, done)], lose=lose)

    @rule()
    def promote(self) -> None:
        self.lua.call("promote", 100, 0)

    @rule()
    def recovered_by_another_daemon(self) -> None:
        self.lua.beat("d2")
        self.lua.r.zadd(f"{P}:daemons", {D: 1})
        self.lua.beat("d2")
        self.lua.beat(D)
        self.recoveries += 1
        # What we held or saw land is back in the queues. (A batch whose reply was
        # lost is still sent again: the daemon does not know.)
        self.known.clear()
        self.started.clear()
        self.lost_ranges.clear()
        self.landed.clear()

    @invariant()
    def every_payload_is_in_one_place_or_ended(self) -> None:
        if not hasattr(self, "lua") or self.unacked:
            return  # ops applied whose results the model has not seen yet
        r = self.lua.r
        where = sum(int(r.llen(f"{P}:queue:{p}")) for p in PRIORITIES)  # type: ignore[arg-type]
        where += sum(int(r.llen(f"{P}:landing:{D}:{p}")) for p in PRIORITIES)  # type: ignore[arg-type]
        where += int(r.hlen(f"{P}:inflight:{D}"))  # type: ignore[arg-type]
        where += int(r.zcard(f"{P}:scheduled"))  # type: ignore[arg-type]
        where += int(r.llen(f"{P}:dead"))  # type: ignore[arg-type]
        assert where + self.ended == self.pushed, (where, self.ended, self.pushed)
        held = {int(c) for c in r.hkeys(f"{P}:inflight:{D}")}  # type: ignore[union-attr]
        assert set(self.known) <= held, "a claim we hold vanished"

    def teardown(self) -> None:
        if hasattr(self, "lua"):
            self.lua.r.close()


def test_every_payload_is_in_exactly_one_place_whatever_the_interleaving(
    server: RedisServer,
) -> None:
    ClaimMachine.server = server
    machine = ClaimMachine.TestCase
    machine.settings = settings(
        max_examples=int(os.environ.get("PRIOQD_CLAIM_EXAMPLES", "90")),
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine().runTest()
