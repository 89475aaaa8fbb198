"""Nothing lost: retries, delays, timeouts, dying workers, shutdown, bad input, outages."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from helpers import (
    Config,
    Daemon,
    RedisServer,
    daemon_record,
    dead_letters,
    held_by,
    in_flight_count,
    job_hash,
    push,
    registered_daemons,
    wait_for,
    wait_status,
    write_config,
)

FAST_RETRY = {"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2}


# --- retries and dead letters ---------------------------------------------------------


def test_failing_job_is_retried_with_backoff_then_succeeds(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    d = daemon(config(jobs={"retry_backoff_s": 0.2, "retry_backoff_max_s": 1}))
    counter = tmp_path / "count"
    push(r, "normal", {"id": "flaky", "task": "flaky", "args": [str(counter), 2]})
    h = wait_status(r, ["flaky"])["flaky"]
    assert h["status"] == "succeeded" and h["result"] == "3" and h["attempts"] == "3"
    assert "error" not in h  # the last error is cleared by the success
    d.wait_log("job finished", job_id="flaky", outcome="succeeded")
    failed = [e for e in d.events("job finished") if e["outcome"] == "failed"]
    assert [e["attempt"] for e in failed] == [1, 2]
    assert "ValueError: flaky failure 1" in failed[0]["error"]
    # Equal-jitter backoff: attempt 1 waits 0.1-0.2 s, attempt 2 waits 0.2-0.4 s.
    assert 0.1 <= failed[0]["retry_in_s"] <= 0.2
    assert 0.2 <= failed[1]["retry_in_s"] <= 0.4
    starts = [e for e in d.events("job started") if e["job_id"] == "flaky"]
    assert [e["attempt"] for e in starts] == [1, 2, 3]


def test_job_that_keeps_failing_ends_dead_with_reason_and_traceback(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(jobs={"max_retries": 1, **FAST_RETRY}))
    push(r, "high", {"id": "bad", "task": "fail", "args": ["boom"]})
    push(r, "high", {"id": "bad0", "task": "fail", "args": ["once"], "max_retries": 0})
    hashes = wait_status(r, ["bad", "bad0"])
    assert hashes["bad"]["status"] == "dead" and hashes["bad"]["attempts"] == "2"
    assert hashes["bad"]["error"] == "RuntimeError: boom"
    assert "raise RuntimeError(message)" in hashes["bad"]["traceback"]
    assert hashes["bad0"]["attempts"] == "1"
    dead = {e["id"]: e for e in dead_letters(r)}
    assert dead["bad"]["reason"] == "RuntimeError: boom (attempt 2 of 2, no retries left)"
    assert "Traceback" in dead["bad"]["traceback"]
    assert json.loads(dead["bad"]["payload"])["id"] == "bad"
    outcome = json.loads(r.lpop("prioqd:done:bad"))  # type: ignore[arg-type]
    assert outcome["status"] == "dead"


def test_delayed_jobs_wait_and_enter_their_queue_in_due_order(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(workers={"slots": 1}))
    pushed = time.time()
    push(r, "low", {"id": "d3", "task": "square", "args": [3], "delay_s": 0.9})
    push(r, "low", {"id": "d2", "task": "square", "args": [2], "delay_s": 0.6})
    push(r, "low", {"id": "d1", "task": "square", "args": [1], "eta": pushed + 0.3})
    wait_for(lambda: r.zcard("prioqd:scheduled") == 3, 5)
    assert job_hash(r, "d1")["status"] == "scheduled"
    hashes = wait_status(r, ["d1", "d2", "d3"])
    for job_id, delay in (("d1", 0.3), ("d2", 0.6), ("d3", 0.9)):
        assert float(hashes[job_id]["started_at"]) - pushed >= delay - 0.02
        # Not forgotten either (a generous bound: the lower one is the promise).
        assert float(hashes[job_id]["started_at"]) - pushed < delay + 3.0
    assert sorted(hashes, key=lambda j: float(hashes[j]["started_at"])) == ["d1", "d2", "d3"]


# --- timeouts and dying workers -----------------------------------------------------


def test_timeout_kills_the_worker_within_a_second_and_siblings_finish(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(workers={"slots": 3}, jobs={"max_retries": 0}))
    workers_before = set(psutil.Process(d.pid).children())
    push(r, "normal", {"id": "sib1", "task": "nap", "args": [1500, "a"]})
    push(r, "normal", {"id": "slow", "task": "spin", "timeout_s": 1})
    push(r, "normal", {"id": "sib2", "task": "nap", "args": [1500, "b"]})
    hashes = wait_status(r, ["slow", "sib1", "sib2"])
    slow = hashes["slow"]
    assert slow["status"] == "dead" and slow["error"] == "timed out after 1s"
    ran_for = float(slow["finished_at"]) - float(slow["started_at"])
    assert 1.0 <= ran_for < 2.0
    for sib in ("sib1", "sib2"):
        assert hashes[sib]["status"] == "succeeded" and hashes[sib]["attempts"] == "1"
    # Exactly one worker was replaced: the one that ran the spinning job.
    wait_for(lambda: len(psutil.Process(d.pid).children()) == 3, 10)
    after = set(psutil.Process(d.pid).children())
    assert len(workers_before - after) == 1
    assert not any(p.is_running() for p in workers_before - after)


@pytest.mark.parametrize(
    ("task", "error"),
    [
        ("segfault", "worker process was killed by SIGSEGV"),
        ("crash", "worker process exited with code 13"),
        ("selfkill", "worker process was killed by SIGKILL"),
    ],
)
def test_dying_worker_charges_only_its_job_and_the_pool_recovers(
    r: redis.Redis, config: Config, daemon: Daemon, task: str, error: str
) -> None:
    d = daemon(config(workers={"slots": 2}, jobs={"max_retries": 2, **FAST_RETRY}))
    push(r, "normal", {"id": "sib", "task": "nap", "args": [800]})
    push(r, "normal", {"id": "poison", "task": task})
    hashes = wait_status(r, ["poison", "sib"])
    # The poison pill is retried, then dead-lettered: it does not loop forever.
    assert hashes["poison"]["status"] == "dead" and hashes["poison"]["attempts"] == "3"
    assert hashes["poison"]["error"] == error
    assert hashes["sib"]["status"] == "succeeded" and hashes["sib"]["attempts"] == "1"
    assert len(d.wait_count("worker process died", 3)) == 3
    push(r, "normal", {"id": "after", "task": "square", "args": [5]})
    assert wait_status(r, ["after"])["after"]["result"] == "25"


def test_arguments_the_task_rejects_and_unserialisable_results_are_dead_letters(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(jobs={"max_payload_bytes": 200}))
    push(r, "normal", {"id": "args", "task": "square", "args": [1, 2, 3]})
    push(r, "normal", {"id": "kw", "task": "square", "args": [2], "kwargs": {"nope": 1}})
    push(r, "normal", {"id": "res", "task": "unserialisable"})
    push(r, "normal", {"id": "big", "task": "echo", "args": ["x" * 300]})
    hashes = wait_status(r, ["args", "kw", "res"])
    assert all(h["status"] == "dead" for h in hashes.values())
    assert hashes["args"]["attempts"] == "1"  # no retry can fix a bad call
    wait_for(lambda: r.llen("prioqd:dead") == 4, 10)
    # An oversized payload never leaves Redis: its letter names the key that keeps it.
    def job_id(e: dict[str, Any]) -> str:
        payload = e["payload"] if "payload" in e else r.get(e["payload_key"])
        return e.get("id") or json.loads(payload)["id"]  # type: ignore[no-any-return]

    reasons = {job_id(e): e["reason"] for e in dead_letters(r)}
    assert "task 'square' rejected its arguments: too many positional arguments" in reasons["args"]
    assert "unexpected keyword argument 'nope'" in reasons["kw"]
    assert "not JSON-serialisable" in reasons["res"]
    assert "over max_payload_bytes=200" in reasons["big"]


# --- shutdown -------------------------------------------------------------------


def test_sigterm_lets_running_jobs_finish_within_the_grace(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(daemon={"shutdown_grace_s": 10}))
    push(
        r,
        "normal",
        {"id": "a", "task": "nap", "args": [700]},
        {"id": "b", "task": "nap", "args": [700]},
    )
    push(r, "low", {"id": "queued", "task": "square", "args": [1]})
    wait_status(r, ["a", "b"], ("running",))
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert all(job_hash(r, j)["status"] == "succeeded" for j in ("a", "b"))
    # Not started before the stop: still queued, untouched.
    assert r.lrange("prioqd:queue:low", 0, -1) == [
        b'{"id": "queued", "task": "square", "args": [1]}'
    ]
    assert in_flight_count(r) == 0


def test_grace_over_kills_and_puts_back_at_the_head_without_charge(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(workers={"slots": 1}, daemon={"shutdown_grace_s": 0.5}))
    push(r, "high", {"id": "long", "task": "spin", "args": [60]})
    wait_status(r, ["long"], ("running",))
    push(r, "high", {"id": "next", "task": "square", "args": [2]})
    t = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert time.monotonic() - t < 5
    queue = [json.loads(x)["id"] for x in r.lrange("prioqd:queue:high", 0, -1)]
    assert queue == ["next", "long"]  # the right end is the head: "long" runs first
    h = job_hash(r, "long")
    assert h["status"] == "queued" and h["attempts"] == "0"
    assert d.events("grace over: killed running jobs; they go back to the head of their queues")
    # The next daemon runs it as attempt 1.
    d2 = daemon(config(workers={"slots": 1}, daemon={"shutdown_grace_s": 0.5}))
    wait_status(r, ["long"], ("running",))
    assert d2.wait_log("job started", job_id="long")["attempt"] == 1


def test_second_signal_skips_the_grace(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    d = daemon(config(workers={"slots": 1}, daemon={"shutdown_grace_s": 60}))
    push(r, "high", {"id": "long", "task": "spin", "args": [60]})
    wait_status(r, ["long"], ("running",))
    t = time.monotonic()
    d.signal(signal.SIGINT)
    d.wait_log("stopping: no new jobs; waiting for running ones")
    d.signal(signal.SIGINT)
    assert d.wait(20) == 0
    assert time.monotonic() - t < 5
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:high", 0, -1)] == ["long"]


# --- leases ----------------------------------------------------------------------


def test_sigkilled_daemon_jobs_are_recovered_by_its_restart_at_once(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config(workers={"slots": 2}, daemon={"lease_s": 60})
    d = daemon(cfg)
    runs = tmp_path / "runs"
    push(
        r,
        "normal",
        *({"id": f"k{i}", "task": "logrun", "args": [str(runs), f"k{i}", 300]} for i in range(6)),
    )
    daemon_id = d.daemon_id
    wait_for(
        lambda: sum(job_hash(r, f"k{i}").get("status") == "running" for i in range(6)) == 2, 10
    )
    in_flight = held_by(r, daemon_id)
    assert len(in_flight) == 2
    workers = [psutil.Process(pid) for pid in d.worker_pids]
    assert len(workers) == 2 and all(w.is_running() for w in workers)
    d.kill()

    # Its own workers die with it (PR_SET_PDEATHSIG): no orphan goes on running a job
    # that is about to be recovered elsewhere.
    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(w) for w in workers), 10, what="the killed daemon's workers to die")
    t = time.monotonic()
    d.start()  # same host, dead pid: no need to wait out the 60 s lease
    hashes = wait_status(r, [f"k{i}" for i in range(6)])
    assert time.monotonic() - t < 15
    assert all(h["status"] == "succeeded" for h in hashes.values())
    recovered = d.wait_log("recovered a dead daemon's jobs")
    assert recovered["jobs"] == 2 and recovered["dead_daemon"] == daemon_id
    counts: dict[str, int] = {}
    for tag in runs.read_text().split():
        counts[tag] = counts.get(tag, 0) + 1
    assert set(counts) == {f"k{i}" for i in range(6)}
    assert {t for t, n in counts.items() if n > 1} <= in_flight


def test_lost_daemon_jobs_are_recovered_by_another_within_the_lease(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    lease = 3.0
    cfg = config(workers={"slots": 1}, daemon={"lease_s": lease})
    victim = daemon(cfg)
    push(r, "high", {"id": "held", "task": "nap", "args": [10_000]})
    wait_status(r, ["held"], ("running",))
    survivor = daemon(cfg)
    victim.proc.send_signal(signal.SIGSTOP)  # alive but silent: a network cut, a hang
    stopped_at = time.time()
    try:
        event = survivor.wait_log(
            "recovered jobs of daemons whose lease expired", timeout_s=lease + 10
        )
        # Within the lease (by the survivor's own clock, not this test's polling), with
        # 1 s on top for a loaded 2-CPU machine.
        assert datetime.fromisoformat(event["timestamp"]).timestamp() - stopped_at <= lease + 1.0
        survivor_id = survivor.events("daemon ready")[0]["daemon_id"]
        wait_for(lambda: job_hash(r, "held").get("daemon") == survivor_id, 10)
        assert job_hash(r, "held")["status"] == "running"
    finally:
        victim.proc.send_signal(signal.SIGCONT)


def test_a_heartbeating_daemon_is_never_robbed(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 1}, daemon={"lease_s": 1.5})
    a = daemon(cfg)
    push(r, "high", {"id": "long", "task": "nap", "args": [4000]})
    wait_status(r, ["long"], ("running",))
    b = daemon(cfg)
    h = wait_status(r, ["long"], timeout_s=15)["long"]
    assert h["status"] == "succeeded" and h["attempts"] == "1"
    assert not b.events("job started") and not b.events(
        "recovered jobs of daemons whose lease expired"
    )
    assert a.wait_log("job finished", job_id="long")["outcome"] == "succeeded"


#: The daemon's line when a cycle finds its lease gone (prioqd/daemon/lease.py).
LEASE_GONE = "our lease has run out; claiming nothing until it is renewed"


def test_a_cycle_that_finds_its_lease_gone_claims_nothing_until_renewed_and_loses_no_job(
    tmp_path: Path, daemon: Daemon
) -> None:
    """The daemon's entry in prioqd:daemons disappears while it runs two jobs (here by
    hand; a lease that ran out before the overdue heartbeat came looks the same to a
    cycle). The cycle that writes the first outcome finds the lease gone: it claims
    nothing, says so, and has the heartbeat renew the lease at once. A job queued
    meanwhile is taken off its queue only after the renewal (Redis's own record of
    its commands, in order, says so), and every job runs once and ends."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        r = server.client()
        # Redis publishes every list and sorted-set change, in the order it made them.
        r.config_set("notify-keyspace-events", "Klz")
        changes = r.pubsub()
        changes.psubscribe("__keyspace@0__:prioqd:*")
        lease_s = 30  # heartbeats every 10 s: the cycle, not a heartbeat, finds it gone
        cfg = write_config(
            tmp_path / "c.toml", server.url, workers={"slots": 2}, daemon={"lease_s": lease_s}
        )
        d = daemon(cfg)
        runs = tmp_path / "runs"
        push(r, "normal", {"id": "a", "task": "logrun", "args": [str(runs), "a", 1600]})
        push(r, "normal", {"id": "b", "task": "logrun", "args": [str(runs), "b", 800]})
        wait_status(r, ["a", "b"], ("running",), daemon=d)
        while changes.get_message(timeout=0.05) is not None:
            pass  # what came before is not this test's business
        assert r.zrem("prioqd:daemons", d.daemon_id) == 1
        # Both workers busy: "c" waits in its queue for the next claim, b's end.
        push(r, "normal", {"id": "c", "task": "logrun", "args": [str(runs), "c"]})
        d.wait_log(LEASE_GONE)
        wait_for(lambda: d.daemon_id in registered_daemons(r), 5, what="the lease renewed")
        assert daemon_record(r, d.daemon_id)["pid"] == str(d.pid)
        h = wait_status(r, ["a", "b", "c"], ("succeeded", "dead"), daemon=d)
        assert {k: (v["status"], v["attempts"]) for k, v in h.items()} == {
            k: ("succeeded", "1") for k in ("a", "b", "c")
        }
        assert sorted(runs.read_text().split()) == ["a", "b", "c"]  # each ran once
        # The claim that found the lease gone took nothing: "c" left its queue only
        # after the heartbeat had put the daemon back in prioqd:daemons.
        seen = []
        while (msg := changes.get_message(timeout=0.2)) is not None:
            if msg["type"] == "pmessage":
                key = msg["channel"].decode().split(":", 1)[1]
                seen.append((key, msg["data"].decode()))
        ops = [op for key, op in seen if key in ("prioqd:daemons", "prioqd:queue:normal")]
        assert ops[:2] == ["zrem", "lpush"] and "zadd" in ops and "rpop" in ops, seen
        assert ops.index("zadd") < ops.index("rpop"), seen
        assert in_flight_count(r) == 0 and not dead_letters(r)
        assert r.llen("prioqd:queue:normal") == 0
        assert len(d.events(LEASE_GONE)) == 1
        # Nobody recovered its jobs, and it wrote every outcome itself.
        other = [e["event"] for e in d.logs() if e["event"] != LEASE_GONE]
        assert not [e for e in other if "recovered" in e or "lease" in e], other
        assert {h[k]["daemon"] for k in h} == {d.daemon_id}
        changes.close()
        assert d.stop() == 0
    finally:
        server.stop()


def test_a_daemon_claims_again_once_its_lease_is_renewed(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    """As above, with one slot: the lease is found gone by the cycle that writes the
    outcome of the only job the daemon runs. Once the heartbeat has renewed the lease,
    a job pushed is claimed and run (a daemon that stopped claiming for good would
    leave it queued until something else woke it)."""
    lease_s = 30
    d = daemon(config(workers={"slots": 1}, daemon={"lease_s": lease_s}))
    runs = tmp_path / "runs"
    push(r, "normal", {"id": "a", "task": "logrun", "args": [str(runs), "a", 500]})
    wait_status(r, ["a"], ("running",), daemon=d)
    assert r.zrem("prioqd:daemons", d.daemon_id) == 1
    assert wait_status(r, ["a"], daemon=d)["a"]["status"] == "succeeded"
    d.wait_log(LEASE_GONE)
    wait_for(lambda: d.daemon_id in registered_daemons(r), 5, what="the lease renewed")
    push(r, "normal", {"id": "c", "task": "logrun", "args": [str(runs), "c"]})
    # An idle daemon takes a job within milliseconds; 3 s for a loaded machine.
    h = wait_status(r, ["c"], timeout_s=3, daemon=d)["c"]
    assert h["status"] == "succeeded" and runs.read_text().split() == ["a", "c"]


# --- Redis outages -----------------------------------------------------------------


def test_redis_outage_keeps_running_jobs_and_writes_their_outcomes_after(
    tmp_path: Path, daemon: Daemon, own_redis: RedisServer
) -> None:
    server = own_redis
    r = server.client()
    # lease_s=3: heartbeats (every second) fail during the outage and the lease
    # runs out (nobody else recovers it); a delayed job falls due during it.
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"lease_s": 3})
    d = daemon(cfg)
    push(r, "normal", {"id": "through", "task": "nap", "args": [1500]})
    push(r, "low", {"id": "later", "task": "square", "args": [5], "delay_s": 1.0})
    wait_status(r, ["through"], ("running",))
    wait_status(r, ["later"], ("scheduled",))
    proc = psutil.Process(d.pid)
    cpu_before = sum(proc.cpu_times()[:2])
    server.stop()
    time.sleep(3)
    cpu_during = sum(proc.cpu_times()[:2]) - cpu_before
    assert cpu_during < 0.5, f"the daemon spun while Redis was away: {cpu_during:.2f}s CPU"
    assert d.events("redis unavailable")
    server.start()
    h = wait_status(r, ["through"], timeout_s=20)["through"]
    assert h["status"] == "succeeded" and h["attempts"] == "1"
    assert wait_status(r, ["later"], timeout_s=20)["later"]["result"] == "25"
    failed_during = {e["during"] for e in d.events("redis unavailable")}
    assert {"heartbeat", "promote"} <= failed_during, failed_during
    # ...and it fetches again on its own.
    push(r, "high", {"id": "after", "task": "square", "args": [4]})
    assert wait_status(r, ["after"], timeout_s=20)["after"]["result"] == "16"
    r.close()


def test_recovered_jobs_read_queued_until_they_run_again(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 1}, daemon={"lease_s": 1.5})
    a = daemon(cfg)
    push(r, "high", {"id": "held", "task": "nap", "args": [10_000]})
    wait_for(lambda: job_hash(r, "held").get("status") == "running", 10)
    b = daemon(cfg)
    push(r, "high", {"id": "busy", "task": "nap", "args": [10_000]})  # a is full: b takes it
    wait_for(lambda: job_hash(r, "busy").get("status") == "running", 10)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b.wait_log("recovered jobs of daemons whose lease expired", timeout_s=5)
        assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:high", 0, -1)] == ["held"]
        assert job_hash(r, "held")["status"] == "queued"
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_workers_are_replaced_after_max_jobs_per_worker(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(workers={"slots": 1, "max_jobs_per_worker": 2}))
    ids = [f"p{i}" for i in range(6)]
    for job_id in ids:  # one at a time, so none share a batch
        push(r, "normal", {"id": job_id, "task": "pid"})
        wait_status(r, [job_id])
    pids = [int(job_hash(r, j)["result"]) for j in ids]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    assert all(not psutil.pid_exists(p) for p in (pids[0], pids[2]))


def test_a_stop_while_redis_is_gone_leaves_the_jobs_to_recovery(
    tmp_path: Path, daemon: Daemon, own_redis: RedisServer
) -> None:
    """design.md, Shutdown: with Redis gone for good the drain gives up after a bound;
    the jobs are still recorded as the daemon's in Redis and come back by recovery."""
    server = own_redis
    r = server.client()
    cfg = write_config(tmp_path / "c.toml", server.url,
                       daemon={"lease_s": 60, "shutdown_grace_s": 2})  # fmt: skip
    d = daemon(cfg)
    push(r, "normal", {"id": "stuck", "task": "nap", "args": [800]})
    wait_status(r, ["stuck"], ("running",))
    server.stop()
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    # (Its job_ids field lists only runs not yet turned into ops: here it is empty.)
    d.wait_log("outcomes not written; the jobs stay in flight and will run again")
    d.wait_log("could not deregister; other daemons recover our jobs when the lease ends")
    server.start()
    assert job_hash(r, "stuck")["status"] == "running"  # as the stopped daemon left it
    d.start()  # same host, its predecessor's pid is gone: recovered at once
    assert d.wait_log("recovered a dead daemon's jobs")["jobs"] == 1
    h = wait_status(r, ["stuck"], timeout_s=20)["stuck"]
    assert h["status"] == "succeeded" and h["attempts"] == "2"
    r.close()


def test_a_second_sigterm_during_a_redis_outage_stops_the_cycle_retrying_at_once(
    tmp_path: Path, daemon: Daemon, own_redis: RedisServer
) -> None:
    """A forced stop while the cycle is retrying a write Redis cannot take: it stops
    retrying there and then (no spinning through the drain's bound), and what the
    daemon holds stays recorded as its own, for recovery."""
    server = own_redis
    r = server.client()
    cfg = write_config(tmp_path / "c.toml", server.url,
                       daemon={"lease_s": 60, "shutdown_grace_s": 5})  # fmt: skip
    d = daemon(cfg)
    push(r, "normal", {"id": "short", "task": "nap", "args": [1000]},
         {"id": "long", "task": "nap", "args": [60_000]})  # fmt: skip
    wait_status(r, ["short", "long"], ("running",))
    server.stop()

    def cycle_failures() -> int:
        return sum(e.get("during") == "cycle" for e in d.events("redis unavailable"))

    # "short" ends: its outcome cannot be written, and the cycle retries with backoff.
    wait_for(cycle_failures, 10, what="the cycle failing")
    d.signal(signal.SIGTERM)
    d.wait_log("stopping: no new jobs; waiting for running ones")
    before = cycle_failures()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    # At most the call in flight when the stop came (and a line that was still
    # in the log's 10 ms buffer); retrying through the drain's 5 s makes dozens.
    assert cycle_failures() <= before + 2, (before, cycle_failures())
    d.wait_log("outcomes not written; the jobs stay in flight and will run again")
    d.wait_log("could not deregister; other daemons recover our jobs when the lease ends")
    server.start()
    assert held_by(r, d.daemon_id) == {"short", "long"}
    assert job_hash(r, "short")["status"] == job_hash(r, "long")["status"] == "running"
    r.close()


def test_an_error_text_that_is_not_utf8_encodable_is_kept_escaped(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(jobs={"max_retries": 0}))
    # A lone surrogate (valid in JSON text, not in UTF-8) in the exception message.
    r.lpush("prioqd:queue:normal", b'{"id":"sur","task":"fail","args":["bad \\ud800 end"]}')
    h = wait_status(r, ["sur"])["sur"]
    assert h["status"] == "dead"
    assert h["error"] == "RuntimeError: bad \\ud800 end"
    (letter,) = dead_letters(r)
    assert letter["reason"].startswith("RuntimeError: bad \\ud800 end")
