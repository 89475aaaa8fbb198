"""Chaos: kill the daemon, its connections, its Redis; count what is lost (nothing).

Each test has a redis-server of its own, is bounded in jobs and time, and ends every
process it starts. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    Daemon,
    RedisServer,
    held_by,
    in_flight_count,
    job_hash,
    push,
    registered_daemons,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis", appendonly=True)
    s.start()
    yield s
    s.stop()


def report(capsys: pytest.CaptureFixture[str], name: str, **figures: Any) -> None:
    with capsys.disabled():
        print(f"\n[chaos] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def push_logrun(r: redis.Redis, runs: Path, n: int, ms: float, prefix: str = "j") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.lpush(
            "prioqd:queue:normal",
            json.dumps({"id": job_id, "task": "logrun", "args": [str(runs), job_id, ms]}),
        )
    pipe.execute()
    return ids


def run_counts(runs: Path) -> Counter[str]:
    return Counter(runs.read_text().split()) if runs.exists() else Counter()


def succeeded(r: redis.Redis, ids: list[str]) -> int:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(f"prioqd:job:{job_id}", "status")
    return sum(1 for s in pipe.execute() if s == b"succeeded")


def assert_nothing_in_flight(r: redis.Redis) -> None:
    assert r.llen("prioqd:queue:normal") == 0
    assert in_flight_count(r) == 0


def test_sigkill_and_restart_the_daemon_again_and_again(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"lease_s": 30})
    ids = push_logrun(r, runs, 2000, ms=4)
    d = daemon(cfg)
    rng = random.Random(7)
    kills = 0
    in_flight_at_kills: set[str] = set()
    held_per_kill: list[int] = []
    recovered_per_restart: list[int] = []
    deadline = time.monotonic() + 120
    while kills < 12 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 0.5))
        daemon_id = d.daemon_id
        d.kill()
        kills += 1
        # Redis may still hold a command the daemon sent just before it died: once it
        # has seen the connections close, what the daemon held is final.
        wait_for(lambda: not any(c.get("name") == "prioqd" for c in r.client_list()), 10)
        held = held_by(r, daemon_id)
        held_per_kill.append(len(held))
        in_flight_at_kills |= held
        d.start()
        # The restart (same host, dead pid) puts back exactly what its predecessor
        # held, at start-up, without waiting out the 30 s lease.
        events = d.events("recovered a dead daemon's jobs")
        recovered = sum(e["jobs"] for e in events if e["dead_daemon"] == daemon_id)
        recovered_per_restart.append(recovered)
        assert recovered == len(held), (kills, recovered, held)
    wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.2, "all jobs to succeed")
    counts = run_counts(runs)
    twice = {j for j, n in counts.items() if n > 1}
    report(
        capsys, "SIGKILL+restart", jobs=len(ids), kills=kills, ran_twice=len(twice),
        in_flight_at_kills=len(in_flight_at_kills), held_per_kill=held_per_kill,
    )  # fmt: skip
    assert kills >= 10
    # The kills did catch jobs in flight (2 slots of 4 ms jobs: nearly always), and
    # the restarts recovered them: otherwise this test proves nothing about recovery.
    assert sum(1 for n in held_per_kill if n) >= kills // 2, held_per_kill
    assert sum(recovered_per_restart) >= kills // 2
    assert set(counts) == set(ids)  # every job ran
    assert twice <= in_flight_at_kills  # ...and twice only if a kill caught it in flight
    assert_nothing_in_flight(r)
    r.close()


def test_client_kill_the_daemons_connections_repeatedly(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"lease_s": 30})
    d = daemon(cfg)
    ids = push_logrun(r, runs, 1000, ms=3)
    stop = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        rng = random.Random(3)
        admin = server.client()
        while not stop.wait(rng.uniform(0.03, 0.15)):
            killed.append(
                int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
            )
        admin.close()

    t = threading.Thread(target=killer)
    t.start()
    try:
        wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.2, "all jobs to succeed")
    finally:
        stop.set()
        t.join()
    counts = run_counts(runs)
    report(
        capsys, "CLIENT KILL", jobs=len(ids), kill_rounds=len(killed),
        connections_killed=sum(killed), ran_twice=sum(1 for n in counts.values() if n > 1),
        redis_errors_logged=len(d.events("redis unavailable")),
    )  # fmt: skip
    assert sum(killed) >= 20
    assert set(counts) == set(ids)
    # Every write is guarded, a lost reply is retried, a lost claim is restored: with
    # the daemon alive, even a storm of dropped connections runs nothing twice.
    assert max(counts.values()) == 1
    assert_nothing_in_flight(r)
    r.close()


def test_restart_redis_with_aof_mid_run(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"lease_s": 30})
    ids = push_logrun(r, runs, 1000, ms=3)
    d = daemon(cfg)
    wait_for(lambda: succeeded(r, ids) >= 300, 60, 0.05, "300 jobs")
    r.close()
    t = time.monotonic()
    server.restart(down_s=1.0)
    r = server.client()
    done_at_restart = succeeded(r, ids)
    wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.2, "all jobs to succeed")
    counts = run_counts(runs)
    report(
        capsys, "redis restart", jobs=len(ids), done_at_restart=done_at_restart,
        ran_twice=sum(1 for n in counts.values() if n > 1),
        all_done_after_s=round(time.monotonic() - t, 2),
    )  # fmt: skip
    assert set(counts) == set(ids)
    assert sum(1 for n in counts.values() if n > 1) <= 2  # at most the slots' worth in flight
    assert d.events("redis unavailable")
    assert_nothing_in_flight(r)
    r.close()


def test_two_daemons_one_sigkilled_the_survivor_recovers_within_the_lease(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    lease_s = 3.0
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"lease_s": lease_s})
    a = daemon(cfg)
    b = daemon(cfg)
    ids = push_logrun(r, runs, 400, ms=15)
    wait_for(lambda: succeeded(r, ids) >= 60, 60, 0.02, "60 jobs")
    victim = a.daemon_id
    a.kill()
    killed_at = time.time()
    held = held_by(r, victim)
    event = b.wait_log("recovered jobs of daemons whose lease expired", timeout_s=lease_s + 10)
    # By the survivor's own clock, not this test's polling of its log.
    recovered_after = datetime.fromisoformat(event["timestamp"]).timestamp() - killed_at
    wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.1, "all jobs to succeed")
    counts = run_counts(runs)
    twice = {j for j, n in counts.items() if n > 1}
    report(
        capsys, "two daemons, one SIGKILLed", jobs=len(ids), held_by_victim=len(held),
        recovered_after_s=round(recovered_after, 2), lease_s=lease_s, ran_twice=len(twice),
    )  # fmt: skip
    assert held, "the kill caught no job in flight: nothing was tested"
    assert event["dead_daemons"] == [victim] and event["jobs"] == len(held)
    # Within the lease is the promise; 1 s on top for a loaded 2-CPU machine (the
    # heartbeat that recovers is a timer in a busy event loop).
    assert recovered_after <= lease_s + 1.0
    assert set(counts) == set(ids) and twice <= held
    assert_nothing_in_flight(r)
    r.close()


def test_timeout_and_worker_crash_among_running_siblings(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(
        tmp_path / "c.toml", server.url, workers={"slots": 3}, jobs={"max_retries": 0}
    )
    d = daemon(cfg)
    ids = push_logrun(r, runs, 60, ms=100)
    push(r, "normal", {"id": "spin", "task": "spin", "timeout_s": 0.5})
    ids += push_logrun(r, runs, 30, ms=100, prefix="k")
    push(r, "normal", {"id": "crash", "task": "crash"}, {"id": "segv", "task": "segfault"})
    ids += push_logrun(r, runs, 30, ms=100, prefix="m")
    wait_for(lambda: succeeded(r, ids) == len(ids), 60, 0.1, "siblings")
    bad = ("spin", "crash", "segv")
    wait_for(lambda: all(job_hash(r, j).get("status") == "dead" for j in bad), 20)
    counts = run_counts(runs)
    report(
        capsys, "timeout+crash among siblings", siblings=len(ids),
        siblings_rerun=sum(1 for j in ids if counts[j] > 1),
        workers_died=len(d.events("worker process died")),
    )  # fmt: skip
    assert all(job_hash(r, j)["attempts"] == "1" for j in ids)
    assert all(counts[j] == 1 for j in ids)
    assert job_hash(r, "spin")["error"] == "timed out after 0.5s"
    assert job_hash(r, "crash")["error"] == "worker process exited with code 13"
    assert job_hash(r, "segv")["error"] == "worker process was killed by SIGSEGV"
    assert_nothing_in_flight(r)
    r.close()


def test_sigterm_under_load_loses_nothing(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url, daemon={"shutdown_grace_s": 0.05})
    ids = push_logrun(r, runs, 120, ms=150)
    d = daemon(cfg)
    stops = 0
    for _ in range(5):
        time.sleep(0.5)
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        stops += 1
        assert_nothing_in_flight_but_queue(r)
        d.start()
    wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.2, "all jobs to succeed")
    counts = run_counts(runs)
    rerun = sum(1 for n in counts.values() if n > 1)
    report(capsys, "SIGTERM under load", jobs=len(ids), stops=stops, killed_and_rerun=rerun)
    assert set(counts) == set(ids)
    assert rerun >= stops  # the grace was too short: each stop killed jobs mid-run
    assert all(job_hash(r, j)["attempts"] == "1" for j in ids)  # the reruns were not charged


def assert_nothing_in_flight_but_queue(r: redis.Redis) -> None:
    assert in_flight_count(r) == 0
    assert not registered_daemons(r)


def test_a_stop_in_the_middle_of_short_jobs_writes_every_outcome_and_says_so(
    server: RedisServer, tmp_path: Path, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped while it runs batches of short jobs (eight times), the daemon writes
    every outcome before it goes and says so: exit 0, no error line, nothing left in
    flight, every job run once. (The drain once took a timer that woke the cycle with
    nothing to do for a timeout, and logged "outcomes not written; the jobs stay in
    flight and will run again" in one stop in ten of the benchmark's; that race is
    pinned down in test_timing.py, which this end-to-end run rarely meets.)"""
    r = server.client()
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.toml", server.url)
    ids = push_logrun(r, runs, 12_000, ms=0)
    d = daemon(cfg)
    stops = 0
    queue = "prioqd:queue:normal"
    while r.llen(queue) > 1500 and stops < 8:
        left = r.llen(queue)
        wait_for(lambda n=left: r.llen(queue) <= n - 500, 30, 0.002, "500 more jobs taken")
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        stops += 1
        errors = [e for e in d.logs() if e.get("level") in ("error", "critical")]
        assert errors == [], errors
        assert_nothing_in_flight_but_queue(r)
        d.start()
    wait_for(lambda: succeeded(r, ids) == len(ids), 120, 0.2, "all jobs to succeed")
    counts = run_counts(runs)
    report(capsys, "stops amid short jobs", jobs=len(ids), stops=stops)
    assert stops >= 5
    assert set(counts) == set(ids) and all(n == 1 for n in counts.values())
    assert all(job_hash(r, j)["attempts"] == "1" for j in ids[:200])
    r.close()
