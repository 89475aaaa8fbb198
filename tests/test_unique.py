"""Unique jobs' locks on every path a job takes: whichever way a job ends (done,
rejected, dead-lettered, cancelled), its id can be pushed again at once; while it
waits (delayed, retrying) or runs, however long, a second push is a duplicate; and a
raw LPUSH is dropped by whichever daemon claims it while a run of the id is live."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis
from helpers import Config, Daemon, job_hash, push, wait_for, waits_blocked

from prioqd import Client, JobFailed

LOCK = "prioqd:unique:{}"


def cancel_held(r: redis.Redis, job_id: str) -> None:
    """What `prioqd cancel` writes for a job a daemon may hold."""
    r.zadd("prioqd:cancels", {job_id: int(time.time() * 1000) + 3_600_000})
    r.publish("prioqd:control", json.dumps({"op": "cancel", "ids": [job_id]}))


def note(r: redis.Redis, op: str, priority: str) -> None:
    """What `prioqd pause/resume` writes."""
    (r.sadd if op == "pause" else r.srem)("prioqd:paused", priority)
    r.publish("prioqd:control", json.dumps({"op": op, "priorities": [priority]}))


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_unique_job_that_could_not_run_frees_its_id(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    daemon(cfg)
    with Client.from_config(cfg) as client:
        bad = client.enqueue("no_such_task", id="u-bad", unique=True)
        with pytest.raises(JobFailed, match="unknown task"):
            bad.result(timeout_s=30)
        assert not r.exists(LOCK.format("u-bad"))
        again = client.enqueue("square", 3, id="u-bad", unique=True)
        assert not again.duplicate and again.result(timeout_s=30) == 9


def test_a_unique_job_cancelled_before_it_took_its_lock_frees_its_id(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    d = daemon(cfg)
    note(r, "pause", "normal")
    d.wait_log("paused priorities", paused=["normal"])
    with Client.from_config(cfg) as client:
        first = client.enqueue("square", 2, id="u-c", unique=True)
        # As `prioqd cancel` does for a job it finds held by a daemon (which then put it
        # back): the daemon that claims it ends it as cancelled before it takes the lock.
        cancel_held(r, "u-c")
        note(r, "resume", "normal")
        with pytest.raises(JobFailed) as info:
            first.result(timeout_s=30)
        assert info.value.status == "cancelled"
        assert not r.exists(LOCK.format("u-c"))
        again = client.enqueue("square", 2, id="u-c", unique=True)
        assert not again.duplicate and again.result(timeout_s=30) == 4


def test_a_unique_job_dead_lettered_as_poison_frees_its_id(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config(jobs={"max_recoveries": 0})
    runs = tmp_path / "runs"
    d = daemon(cfg)
    with Client.from_config(cfg) as client:
        # (It naps first, so its start is recorded: its waiter hears it went dead.)
        killer = client.enqueue("kill_my_daemon", str(runs), "killer", 200, id="u-k", unique=True)
        assert d.wait(30) == -signal.SIGKILL
        d.start()  # recovers its dead predecessor: the job's one recovery too many
        with pytest.raises(JobFailed, match="poison"):
            killer.result(timeout_s=30)
        assert lines(runs) == ["killer"]
        again = client.enqueue("logrun", str(runs), "again", id="u-k", unique=True)
        assert not again.duplicate and again.result(timeout_s=30) == "again"


def test_a_unique_job_running_longer_than_result_ttl_keeps_its_lock(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config(jobs={"result_ttl_s": 2})
    runs = tmp_path / "runs"
    daemon(cfg)
    with Client.from_config(cfg) as client:
        first = client.options(id="u-long", unique=True, timeout_s=20).enqueue(
            "logrun", str(runs), "first", 4000
        )
        wait_for(lambda: lines(runs) == ["first"], 20, what="the first run")
        # The lock lasts the job's timeout plus the lease plus a margin.
        assert 20 + 3 + 60 - 5 <= r.ttl(LOCK.format("u-long")) <= 20 + 3 + 60  # type: ignore[operator]
        time.sleep(2.5)  # past result_ttl_s: the lock's old expiry
        second = client.enqueue("logrun", str(runs), "second", id="u-long", unique=True)
        assert second.duplicate
        assert first.result(timeout_s=30) == "first"
        assert lines(runs) == ["first"]


def test_a_raw_unique_push_claimed_by_another_daemon_while_it_runs_is_dropped(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config(workers={"slots": 1})
    runs = tmp_path / "runs"
    first = daemon(cfg)
    wait_for(lambda: waits_blocked(r) == 3, 10, what="the first daemon's waits")
    second = daemon(cfg)
    wait_for(lambda: waits_blocked(r) == 6, 10, what="the second daemon's waits")
    job = {"id": "u-raw", "task": "logrun", "args": [str(runs), "u-raw", 1500], "unique": True}
    # Redis hands a pushed job to the client that has waited longest: the first daemon,
    # whose wait then goes to the back of the line, behind the second daemon's.
    push(r, "normal", job)
    wait_for(lambda: lines(runs) == ["u-raw"], 20, what="the first run")
    assert r.get(LOCK.format("u-raw")).decode().startswith(first.daemon_id + "/")  # type: ignore[union-attr]
    push(r, "normal", job)  # a raw push of the same unique job, while it runs
    second.wait_log("job dropped: a run of this unique job is live", job_id="u-raw")
    assert not first.events("job dropped: a run of this unique job is live")
    wait_for(lambda: job_hash(r, "u-raw").get("status") == "succeeded", 20)
    assert lines(runs) == ["u-raw"] and not r.exists(LOCK.format("u-raw"))
    push(r, "normal", job)  # ended: it runs again
    wait_for(lambda: lines(runs) == ["u-raw", "u-raw"], 20)


def test_a_push_while_the_unique_job_is_delayed_or_waits_to_retry_is_a_duplicate(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config(jobs={"retry_backoff_s": 3, "retry_backoff_max_s": 3})
    daemon(cfg)
    runs = tmp_path / "runs"
    with Client.from_config(cfg) as client:
        later = client.options(id="u-later", unique=True, delay_s=2).enqueue(
            "logrun", str(runs), "later"
        )
        wait_for(lambda: later.status() == "scheduled", 20, what="the daemon to schedule it")
        assert client.enqueue("logrun", str(runs), "x", id="u-later", unique=True).duplicate
        assert later.result(timeout_s=30) == "later"
        # A retry waits in the schedule: its lock says "q" until it is due, and longer.
        counter = tmp_path / "n"
        flaky = client.enqueue("flaky", str(counter), 1, id="u-retry", unique=True)
        wait_for(lambda: flaky.status() == "failed", 20, what="the first attempt to fail")
        assert r.get(LOCK.format("u-retry")) == b"q"
        assert client.enqueue("flaky", str(counter), 1, id="u-retry", unique=True).duplicate
        assert flaky.result(timeout_s=30) == 2
        assert counter.read_text() == "2"  # one failure, one success: no third run
        assert lines(runs) == ["later"]
