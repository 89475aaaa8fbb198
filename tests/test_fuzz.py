"""Arbitrary payloads at a running daemon: every one is accounted for, none crashes it,
and every job with an id gets its own outcome, whose result is checked."""

from __future__ import annotations

import itertools
import json
import math
import threading
from typing import Any

import redis
from helpers import Config, Daemon, in_flight_count, wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Job-shaped objects. Without a fuzzed "id" the test gives them one of its own, so
#: their outcome can be found and checked.
job_like = st.fixed_dictionaries(
    {"task": st.sampled_from(["echo", "square", "nope", "", 7, None])},
    optional={
        "args": st.lists(json_values, max_size=3) | json_values,
        "kwargs": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
        "id": st.text(max_size=30) | st.integers(),
        "timeout_s": st.sampled_from([5, 0, -1, "x", None, True]),
        "max_retries": st.sampled_from([0, -1, 1.5, "2", None]),
        "meta": json_values,
        "bogus": json_values,
    },
)
#: Jobs that should run: their results are compared with the task's own.
runnable = st.one_of(
    st.fixed_dictionaries(
        {"task": st.just("echo"), "args": st.lists(json_values, max_size=3)},
        optional={
            "kwargs": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
            "meta": st.dictionaries(st.text(max_size=8), json_values, max_size=2),
            "timeout_s": st.just(5),
            "max_retries": st.just(0),
        },
    ),
    st.fixed_dictionaries({"task": st.just("square"), "args": st.tuples(st.integers()).map(list)}),
)
without_id = job_like.map(lambda job: {k: v for k, v in job.items() if k != "id"})
payloads = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    job_like,
    without_id,  # weighted: most payloads are job-shaped and tracked by id
    without_id,
    runnable,
    runnable,
    st.just(b'{"task":"echo","args":[1]'),  # truncated
    st.just(b'{"task":"echo","args":[1]}' * 2),  # two documents
    st.just('{"task":"echo","args":["\u00e9\U0001f600"]}'.encode()),
    # Lone surrogates: valid JSON text, but not encodable as UTF-8 once decoded.
    st.just(b'{"task":"echo","args":["\\ud800"],"kwargs":{"\\udfff":1}}'),
    st.just(b'{"task":"nope","id":"x\\udc00"}'),
)


def finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(finite(v) for v in value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return True


def expected(job: dict[str, Any]) -> tuple[str, Any]:
    """("succeeded", result) or ("dead", None), by the README's job contract."""
    dead = ("dead", None)
    job = {k: v for k, v in job.items() if v is not None}  # null is "left out"
    if set(job) - {"task", "args", "kwargs", "id", "timeout_s", "max_retries", "meta"}:
        return dead
    args, kwargs = job.get("args", []), job.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return dead
    timeout_s = job.get("timeout_s")
    if "timeout_s" in job and (isinstance(timeout_s, bool) or timeout_s not in (5,)):
        return dead
    if job.get("max_retries") not in (None, 0):
        return dead
    if "meta" in job and not isinstance(job["meta"], dict):
        return dead
    if job.get("task") == "echo":
        if not finite(args) or not finite(kwargs):
            # Python's json reads Infinity, but the result cannot be written as JSON.
            return dead
        return "succeeded", {"args": args, "kwargs": kwargs}
    if job.get("task") == "square":
        call = dict(zip(["x", "delay_s"], args, strict=False))
        if len(args) > 2 or set(kwargs) - {"x", "delay_s"} or set(call) & set(kwargs):
            return dead
        call.update(kwargs)
        x, delay = call.get("x"), call.get("delay_s")
        if "x" not in call or delay not in (None, 0):
            return ("unknown", None)  # a TypeError inside the task, or a real delay
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return ("unknown", None) if isinstance(x, float) else ("succeeded", x * x)
        return ("unknown", None)
    return dead


def test_every_payload_ends_as_an_outcome_or_a_dead_letter(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(jobs={"max_retries": 0, "max_payload_bytes": 4096}))
    sub = r.pubsub()
    sub.subscribe("prioqd:events")
    sub.get_message(timeout=1)  # the subscribe confirmation
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = sub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                seen.append(json.loads(msg["data"]))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    pushed = 0
    checked = {"succeeded": 0, "dead": 0, "unknown": 0}
    serial = itertools.count()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(payloads, min_size=1, max_size=8))
    @example(batch=[{"task": "echo", "args": [], "kwargs": {"": math.inf}}])  # found once
    @example(batch=[{"task": "square", "args": [6]}, {"task": "echo", "args": [[1], {"a": None}]}])
    @example(batch=[{"task": "echo", "args": [], "timeout_s": None, "meta": None}])
    def check(batch: list[bytes | dict[str, Any]]) -> None:
        nonlocal pushed
        dead_before = r.llen("prioqd:dead")
        seen_before = len(seen)
        tracked: dict[str, dict[str, Any]] = {}
        for payload in batch:
            if isinstance(payload, dict):
                if "id" not in payload:
                    payload = {**payload, "id": f"fz-{next(serial)}"}
                    tracked[payload["id"]] = payload
                payload = json.dumps(payload).encode()
            r.lpush("prioqd:queue:normal", payload)
        pushed += len(batch)
        # Every payload produces exactly one terminal event (succeeded or dead).
        wait_for(lambda: len(seen) - seen_before >= len(batch), 20, what="outcomes")
        new = seen[seen_before:]
        assert len(new) == len(batch)
        dead_now = r.llen("prioqd:dead") - dead_before
        assert dead_now == sum(1 for o in new if o["status"] == "dead")
        assert all(o["status"] in ("succeeded", "dead") for o in new)
        # The new letters only (newest first; a stop of -1 would read the whole list).
        for entry in r.lrange("prioqd:dead", 0, dead_now - 1) if dead_now else []:
            e = json.loads(entry)
            assert e["reason"] and ("payload" in e or "payload_b64" in e)
        # Each tracked job has its own outcome, matched by id, with the right result.
        by_id: dict[str, list[dict[str, Any]]] = {}
        for o in new:
            by_id.setdefault(o["id"], []).append(o)
        for job_id, job in tracked.items():
            (outcome,) = by_id.get(job_id, [None])
            assert outcome is not None, f"no outcome for {job}"
            task = job["task"] if isinstance(job["task"], str) and job["task"] else None
            assert outcome["task"] == task, (job, outcome)
            status, result = expected(job)
            checked[status] += 1
            if status == "unknown":
                continue
            assert outcome["status"] == status, (job, outcome)
            if status == "succeeded":
                assert outcome["result"] == result, (job, outcome)
                assert outcome["error"] is None and outcome["attempts"] == 1
            else:
                assert outcome["error"], outcome

    try:
        check()
    finally:
        stop.set()
        listener.join()
        sub.close()
    assert r.llen("prioqd:queue:normal") == 0
    assert in_flight_count(r) == 0
    assert d.proc is not None and d.proc.poll() is None, "the daemon died on a payload"
    assert pushed >= 40
    # The oracle decided most tracked jobs, both ways.
    assert checked["succeeded"] >= 5 and checked["dead"] >= 5, checked
