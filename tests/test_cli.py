"""The prioqd command line, run as a user runs it."""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    Config,
    Daemon,
    dead_letters,
    job_hash,
    prioqd,
    push,
    wait_for,
    wait_status,
)


def test_submit_pushes_exactly_what_redis_cli_would(r: redis.Redis, config: Config) -> None:
    cfg = str(config())
    before = time.time()
    out = prioqd("submit", "--config", cfg, "echo", "7", "hello", "[1,2]", "--priority", "low",
                 "--kwargs", '{"k": true}', "--timeout-s", "9", "--max-retries", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    (raw,) = r.lrange("prioqd:queue:low", 0, -1)
    job = json.loads(raw)
    assert before <= job.pop("enqueued_at") <= time.time()
    assert job == {
        "id": job_id, "task": "echo", "args": [7, "hello", [1, 2]], "kwargs": {"k": True},
        "timeout_s": 9.0, "max_retries": 1,
    }  # fmt: skip


def test_submit_unique_pushes_once_and_checks_locally(r: redis.Redis, config: Config) -> None:
    cfg = str(config())
    first = prioqd("submit", "--config", cfg, "square", "3", "--id", "nightly", "--unique")
    assert first.returncode == 0 and first.stdout == "nightly\n", first.stderr
    second = prioqd("submit", "--config", cfg, "square", "3", "--id", "nightly", "--unique")
    assert second.returncode == 0 and second.stdout == "nightly\n"
    assert "duplicate: unique job nightly is already queued or running" in second.stderr
    (raw,) = r.lrange("prioqd:queue:normal", 0, -1)
    assert json.loads(raw)["unique"] is True
    no_id = prioqd("submit", "--config", cfg, "square", "3", "--unique")
    assert no_id.returncode == 2 and "--unique needs --id" in no_id.stderr
    bad = prioqd("submit", "--config", cfg, "square", "3", "--timeout-s", "-1")
    assert bad.returncode == 2 and "'timeout_s' must be a number greater than 0" in bad.stderr
    assert r.llen("prioqd:queue:normal") == 1


def test_submit_default_priority_is_the_middle_one_and_unknown_is_refused(
    r: redis.Redis, config: Config
) -> None:
    cfg = str(config())
    assert prioqd("submit", "--config", cfg, "square", "2").returncode == 0
    assert r.llen("prioqd:queue:normal") == 1
    bad = prioqd("submit", "--config", cfg, "square", "2", "--priority", "urgent")
    assert bad.returncode == 2 and "unknown priority 'urgent'" in bad.stderr


def test_submit_wait_prints_the_outcome(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config()
    daemon(cfg)
    ok = prioqd("submit", "--config", str(cfg), "square", "12", "--wait", "--wait-timeout-s", "20")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.split("\n", 1)
    outcome = json.loads(lines[1])
    assert outcome["id"] == lines[0] and outcome["result"] == 144
    bad = prioqd("submit", "--config", str(cfg), "fail", "--max-retries", "0", "--wait")
    assert bad.returncode == 1
    assert json.loads(bad.stdout.split("\n", 1)[1])["status"] == "dead"


def test_status_shows_depths_in_flight_and_daemons(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 1})
    d = daemon(cfg)
    push(r, "high", {"id": "busy", "task": "nap", "args": [3000]})
    push(r, "low", *({"task": "square", "args": [i]} for i in range(3)))
    wait_status(r, ["busy"], ("running",))
    out = prioqd("status", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["queues"] == {"high": 0, "normal": 0, "low": 3}
    assert report["in_flight"] == 1
    (info,) = report["daemons"]
    assert info["pid"] == str(d.pid) and info["alive"] and info["slots"] == 1
    text = prioqd("status", "--config", str(cfg))
    assert "daemons alive: 1" in text.stdout and "low" in text.stdout


def test_status_without_redis_fails_clearly(tmp_path: Path) -> None:
    out = prioqd("status", "--url", "redis://127.0.0.1:1/0")
    assert out.returncode == 1
    assert "redis error" in out.stderr


def test_dead_list_requeue_and_purge(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(jobs={"max_retries": 0})
    daemon(cfg)
    push(r, "high", {"id": "f1", "task": "fail"}, {"id": "f2", "task": "fail"}, "garbage")
    wait_status(r, ["f1", "f2"])
    listing = prioqd("dead", "list", "--config", str(cfg))
    assert listing.returncode == 0
    assert "id=f1" in listing.stdout and "RuntimeError: failed on purpose" in listing.stdout
    assert "not valid JSON" in listing.stdout

    # Requeued, f1 fails again and comes back: a fresh job whose attempts restart.
    out = prioqd("dead", "requeue", "--config", str(cfg), "f1")
    assert out.returncode == 0 and "requeued 1" in out.stdout
    wait_status(r, ["f1"], ("dead",))
    assert len(dead_letters(r)) == 3
    assert prioqd("dead", "requeue", "--config", str(cfg), "nope").returncode == 1

    purge = prioqd("dead", "purge", "--config", str(cfg))
    assert purge.returncode == 0 and "purged 3" in purge.stdout
    assert r.llen("prioqd:dead") == 0


def test_submit_id_and_delay(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = str(config())
    out = prioqd("submit", "--config", cfg, "square", "3", "--id", "mine-1", "--delay-s", "1.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mine-1"
    (raw,) = r.lrange("prioqd:queue:normal", 0, -1)
    job = json.loads(raw)
    assert time.time() - 30 < job.pop("enqueued_at") <= time.time()
    assert job == {"id": "mine-1", "task": "square", "args": [3], "kwargs": {}, "delay_s": 1.5}

    pushed = time.time()
    daemon(config())
    wait_for(lambda: job_hash(r, "mine-1").get("status") == "scheduled", 10, what="scheduled")
    h = wait_status(r, ["mine-1"])["mine-1"]
    assert h["status"] == "succeeded" and h["result"] == "9"
    # Not before its delay (counted from when the daemon took it, after `pushed`).
    assert float(h["started_at"]) >= pushed + 1.5 - 0.02


def test_submit_wait_timeout_exits_1(r: redis.Redis, config: Config) -> None:
    # No daemon runs: nothing will answer.
    out = prioqd("submit", "--config", str(config()), "square", "2", "--id", "lonely",
                 "--wait", "--wait-timeout-s", "0.5")  # fmt: skip
    assert out.returncode == 1
    assert out.stdout.strip() == "lonely"
    assert "no outcome within 0.5s" in out.stderr
    assert r.llen("prioqd:queue:normal") == 1  # pushed all the same


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [("{bad json", "--kwargs is not valid JSON"), ("[1, 2]", "--kwargs must be a JSON object")],
)
def test_submit_malformed_kwargs_exits_2_and_pushes_nothing(
    r: redis.Redis, config: Config, kwargs: str, message: str
) -> None:
    out = prioqd("submit", "--config", str(config()), "echo", "--kwargs", kwargs)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not r.keys("prioqd:queue:*")


def test_status_with_several_daemons_one_expired(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    # The survivor heartbeats (and so recovers expired daemons) every lease_s / 3 = 20 s:
    # the other one's expired lease stays visible long enough to be looked at.
    survivor = daemon(config(daemon={"lease_s": 60}, workers={"slots": 1}))
    cfg = config(daemon={"lease_s": 1.5}, workers={"slots": 1})
    frozen = daemon(cfg)
    push(r, "high", {"id": "held", "task": "nap", "args": [30_000]})
    push(r, "high", {"id": "held2", "task": "nap", "args": [30_000]})
    wait_status(r, ["held", "held2"], ("running",))
    frozen.signal(signal.SIGSTOP)

    def report() -> dict[str, Any]:
        out = prioqd("status", "--config", str(cfg), "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def expired() -> dict[str, Any] | None:
        rep = report()
        gone = [d for d in rep["daemons"] if d["id"] == frozen.daemon_id and not d["alive"]]
        return rep if gone else None

    rep = wait_for(expired, 10, 0.2, "the stopped daemon's lease to run out")
    by_id = {d["id"]: d for d in rep["daemons"]}
    assert set(by_id) == {survivor.daemon_id, frozen.daemon_id}
    assert by_id[survivor.daemon_id]["alive"] is True
    assert by_id[survivor.daemon_id]["lease_left_s"] > 0
    assert by_id[frozen.daemon_id]["lease_left_s"] <= 0
    assert by_id[survivor.daemon_id]["in_flight"] == 1
    assert by_id[frozen.daemon_id]["in_flight"] == 1
    assert rep["in_flight"] == 2
    text = prioqd("status", "--config", str(cfg)).stdout
    assert "daemons alive: 1" in text
    # (Each daemon's row starts with its id; running jobs below name their daemon too.)
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(frozen.daemon_id)]
    assert " expired " in line  # (the last error column follows)
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(survivor.daemon_id)]
    assert re.search(r" \d+(\.\d)?s ", line)
    frozen.signal(signal.SIGCONT)


def test_dead_requeue_all_puts_every_letter_back_as_a_fresh_job(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(jobs={"max_retries": 0})
    d = daemon(cfg)
    push(r, "high", {"id": "f1", "task": "fail"})
    push(r, "low", {"id": "f2", "task": "fail", "args": ["low one"]})
    push(r, "normal", "garbage")
    hashes = wait_status(r, ["f1", "f2"])
    assert hashes["f1"]["attempts"] == "1"
    wait_for(lambda: r.llen("prioqd:dead") == 3, 10)
    assert d.stop() == 0  # nothing takes them while we look

    out = prioqd("dead", "requeue", "--config", str(cfg), "--all")
    assert out.returncode == 0, out.stderr
    assert "requeued 3 dead letter(s)" in out.stdout
    assert r.llen("prioqd:dead") == 0
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:high", 0, -1)] == ["f1"]
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:low", 0, -1)] == ["f2"]
    assert r.lrange("prioqd:queue:normal", 0, -1) == [b"garbage"]
    # Fresh jobs: the hash says queued with no attempts, the old outcome is gone.
    assert job_hash(r, "f1")["status"] == "queued" and job_hash(r, "f1")["attempts"] == "0"
    assert not r.exists("prioqd:done:f1", "prioqd:done:f2")

    daemon(cfg)  # ...and they run again, as attempt 1
    again = wait_status(r, ["f1", "f2"])
    assert again["f1"]["status"] == "dead" and again["f1"]["attempts"] == "1"
    wait_for(lambda: r.llen("prioqd:dead") == 3, 10)


def test_requeue_of_a_dead_letter_that_is_not_utf8(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    d = daemon(cfg)
    payload = b"\xff\xfe not utf-8 \x80"
    r.lpush("prioqd:queue:low", payload)
    wait_for(lambda: r.llen("prioqd:dead") == 1, 10)
    (entry,) = dead_letters(r)
    assert entry["payload_b64"] == base64.b64encode(payload).decode()
    assert "payload" not in entry and "not UTF-8" in entry["reason"]
    assert d.stop() == 0

    out = prioqd("dead", "requeue", "--config", str(cfg), "--all")
    assert out.returncode == 0 and "requeued 1" in out.stdout, out.stderr
    # Back byte for byte on the queue it came from.
    assert r.lrange("prioqd:queue:low", 0, -1) == [payload]
    assert r.llen("prioqd:dead") == 0


def test_dead_list_json_and_limit(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(jobs={"max_retries": 0})
    daemon(cfg)
    ids = [f"d{i}" for i in range(5)]
    for job_id in ids:  # one at a time, so the dead list's order is known
        push(r, "normal", {"id": job_id, "task": "fail", "args": [f"boom {job_id}"]})
        wait_status(r, [job_id])
    wait_for(lambda: r.llen("prioqd:dead") == 5, 10)

    out = prioqd("dead", "list", "--config", str(cfg), "--json", "--limit", "2")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    assert [e["id"] for e in entries] == ["d4", "d3"]  # newest first
    assert entries[0]["reason"] == "RuntimeError: boom d4 (attempt 1 of 1, no retries left)"
    assert json.loads(entries[0]["payload"])["id"] == "d4"
    assert "Traceback" in entries[0]["traceback"]

    everything = json.loads(prioqd("dead", "list", "--config", str(cfg), "--json").stdout)
    assert [e["id"] for e in everything] == ["d4", "d3", "d2", "d1", "d0"]

    text = prioqd("dead", "list", "--config", str(cfg), "--limit", "1").stdout
    assert "id=d4" in text and "id=d3" not in text
    assert text.count("reason:") == 1


def test_dead_letters_of_any_shape_are_listed_and_requeued(r: redis.Redis, config: Config) -> None:
    cfg = str(config())
    empty = prioqd("dead", "list", "--config", cfg)
    assert empty.returncode == 0 and empty.stdout.strip() == "no dead letters"
    # Letters a daemon did not write (an older version, another tool, a hand edit).
    r.lpush("prioqd:dead", b"not json \xff")
    letter = {"reason": "x", "id": "gone-prio", "priority": "urgent",
              "payload": '{"id":"gone-prio","task":"square"}'}  # fmt: skip
    r.lpush("prioqd:dead", json.dumps(letter))
    listing = prioqd("dead", "list", "--config", cfg, "--json")
    assert listing.returncode == 0, listing.stderr
    entries = json.loads(listing.stdout)
    assert entries[0]["id"] == "gone-prio"
    assert entries[1]["reason"] == "unreadable dead letter"
    assert base64.b64decode(entries[1]["payload_b64"]) == b"not json \xff"
    out = prioqd("dead", "requeue", "--config", cfg, "--all")
    assert out.returncode == 0 and "requeued 2" in out.stdout, out.stderr
    # A priority no longer configured goes to the lowest queue; none at all, the highest.
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:low", 0, -1)] == ["gone-prio"]
    assert r.lrange("prioqd:queue:high", 0, -1) == [b"not json \xff"]


def test_dead_requeue_needs_ids_or_all(config: Config) -> None:
    out = prioqd("dead", "requeue", "--config", str(config()))
    assert out.returncode == 2 and "give job ids or --all" in out.stderr
