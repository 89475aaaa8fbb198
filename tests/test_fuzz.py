"""Arbitrary payloads at a running daemon: every one is accounted for, none crashes it."""

from __future__ import annotations

import json
import threading
from typing import Any

import redis
from helpers import Config, Daemon, in_flight_count, wait_for
from hypothesis import HealthCheck, given, settings
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
payloads = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    job_like.map(lambda v: json.dumps(v).encode()),
    st.just(b'{"task":"echo","args":[1]'),  # truncated
    st.just(b'{"task":"echo","args":[1]}' * 2),  # two documents
    st.just('{"task":"echo","args":["\u00e9\U0001f600"]}'.encode()),
    # Lone surrogates: valid JSON text, but not encodable as UTF-8 once decoded.
    st.just(b'{"task":"echo","args":["\\ud800"],"kwargs":{"\\udfff":1}}'),
    st.just(b'{"task":"nope","id":"x\\udc00"}'),
)


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

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(payloads, min_size=1, max_size=8))
    def check(batch: list[bytes]) -> None:
        nonlocal pushed
        dead_before = r.llen("prioqd:dead")
        seen_before = len(seen)
        for payload in batch:
            r.lpush("prioqd:queue:normal", payload)
        pushed += len(batch)
        # Every payload produces exactly one terminal event (succeeded or dead).
        wait_for(lambda: len(seen) - seen_before >= len(batch), 20, what="outcomes")
        new = seen[seen_before:]
        assert len(new) == len(batch)
        dead_now = r.llen("prioqd:dead") - dead_before
        assert dead_now == sum(1 for o in new if o["status"] == "dead")
        assert all(o["status"] in ("succeeded", "dead") for o in new)
        for entry in r.lrange("prioqd:dead", 0, dead_now - 1):
            e = json.loads(entry)
            assert e["reason"] and ("payload" in e or "payload_b64" in e)

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
