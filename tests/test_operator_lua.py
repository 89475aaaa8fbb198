"""The script's cancel commands on their own: they change nothing unless the job is
still exactly where it was seen, and refuse keys of the wrong type before writing."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
import redis

SCRIPT = resources.files("prioqd").joinpath("lua/prioqd.lua").read_text()
OUTCOME = json.dumps(
    {"id": "j", "task": "square", "priority": "low", "status": "cancelled", "result": None,
     "error": "cancelled", "attempts": 0, "finished_at": 1700000000.5}
)  # fmt: skip


def call(r: redis.Redis, command: str, where: Any, *rest: Any) -> Any:
    """cancel_queued p raw id ttl outcome / cancel_scheduled member id ttl outcome, in
    the script's layout (which adds the unique flag and the job hash's fields)."""
    from prioqd.broker import cancel_args

    head = [where, rest[0]] if command == "cancel_queued" else [where]
    job_id, ttl, outcome = rest[-3:]
    args = cancel_args(job_id, ttl, outcome, unique=True)
    return r.evalsha(r.script_load(SCRIPT), 0, "prioqd", command, *head, *args)


def test_cancel_queued_removes_exactly_the_payload_seen(r: redis.Redis) -> None:
    raw = json.dumps({"id": "j", "task": "square"})
    r.lpush("prioqd:queue:low", raw, "other", raw)
    r.set("prioqd:unique:j", "q")
    assert call(r, "cancel_queued", "low", raw, "j", 60, OUTCOME) == 1
    # One copy removed (a duplicate id stays queued), the rest in order.
    assert r.lrange("prioqd:queue:low", 0, -1) == [b"other", raw.encode()]
    assert r.hgetall("prioqd:job:j") == {
        b"status": b"cancelled", b"error": b"cancelled", b"task": b"square",
        b"priority": b"low", b"finished_at": b"1700000000.500000",
    }  # fmt: skip
    assert 0 < r.ttl("prioqd:job:j") <= 60 and 0 < r.ttl("prioqd:done:j") <= 60
    assert r.lrange("prioqd:done:j", 0, -1) == [OUTCOME.encode()]
    assert not r.exists("prioqd:unique:j")


def test_cancel_queued_of_a_payload_already_taken_writes_nothing(r: redis.Redis) -> None:
    r.lpush("prioqd:queue:low", "other")
    assert call(r, "cancel_queued", "low", '{"id":"j"}', "j", 60, OUTCOME) == 0
    assert not r.exists("prioqd:job:j") and not r.exists("prioqd:done:j")
    assert r.lrange("prioqd:queue:low", 0, -1) == [b"other"]


def test_cancel_scheduled_removes_the_member_once(r: redis.Redis) -> None:
    member = 'low\nd/1\n{"id":"j","task":"square"}'
    r.zadd("prioqd:scheduled", {member: 5, "low\nd/2\nx": 6})
    r.hset("prioqd:job:j", mapping={"status": "scheduled", "retry_at": "9", "attempts": "1"})
    assert call(r, "cancel_scheduled", member, "j", 60, OUTCOME) == 1
    assert call(r, "cancel_scheduled", member, "j", 60, OUTCOME) == 0
    assert r.zrange("prioqd:scheduled", 0, -1) == [b"low\nd/2\nx"]
    h = r.hgetall("prioqd:job:j")
    assert h[b"status"] == b"cancelled" and b"retry_at" not in h and h[b"attempts"] == b"1"


@pytest.mark.parametrize("bad", ["prioqd:job:j", "prioqd:done:j", "prioqd:unique:j"])
def test_a_key_of_the_wrong_type_is_refused_before_any_write(r: redis.Redis, bad: str) -> None:
    raw = json.dumps({"id": "j"})
    r.lpush("prioqd:queue:low", raw)
    r.sadd(bad, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        call(r, "cancel_queued", "low", raw, "j", 60, OUTCOME)
    assert r.lrange("prioqd:queue:low", 0, -1) == [raw.encode()]
    assert r.exists("prioqd:job:j", "prioqd:done:j", "prioqd:unique:j") == 1
