"""What a daemon does with operators' commands and with the job fields that serve
them: pause and resume, cancel, unique jobs, enqueued_at, the dead-letter bound.

Commands are written to Redis as the CLI and the dashboard write them (the state in
``<prefix>:paused`` / ``<prefix>:cancels``, a note on ``<prefix>:control``), so these
tests hold whichever client sends them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import redis
from helpers import (
    PRIOQD,
    ROOT,
    Config,
    Daemon,
    dead_letters,
    env_with_taskmods,
    held_by,
    in_flight_count,
    job_hash,
    prioqd,
    push,
    wait_for,
    wait_status,
    waits_blocked,
    worker_gone,
)


def pause(r: redis.Redis, *priorities: str) -> None:
    r.sadd("prioqd:paused", *priorities)
    r.publish("prioqd:control", json.dumps({"op": "pause", "priorities": list(priorities)}))


def resume(r: redis.Redis, *priorities: str) -> None:
    r.srem("prioqd:paused", *priorities)
    r.publish("prioqd:control", json.dumps({"op": "resume", "priorities": list(priorities)}))


def cancel_held(r: redis.Redis, *ids: str) -> None:
    expiry_ms = int(time.time() * 1000) + 3_600_000
    r.zadd("prioqd:cancels", {i: expiry_ms for i in ids})
    r.publish("prioqd:control", json.dumps({"op": "cancel", "ids": list(ids)}))


def test_a_paused_priority_is_not_claimed_until_resumed_and_the_pause_survives_a_restart(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    d = daemon(cfg)
    pause(r, "normal")
    d.wait_log("paused priorities", paused=["normal"])
    push(r, "normal", {"id": "n1", "task": "square", "args": [3]})
    # The daemon serves the rest: a job below the paused priority, pushed after, which
    # a daemon that claimed from it would have taken second.
    push(r, "low", {"id": "l1", "task": "square", "args": [2]})
    wait_status(r, ["l1"])
    assert r.llen("prioqd:queue:normal") == 1 and not job_hash(r, "n1")
    assert d.stop() == 0
    d2 = daemon(cfg)  # a new daemon reads the pause from Redis
    push(r, "low", {"id": "l2", "task": "square", "args": [2]})
    wait_status(r, ["l2"])
    assert r.llen("prioqd:queue:normal") == 1
    resume(r, "normal")
    assert wait_status(r, ["n1"])["n1"]["result"] == "9"
    d2.wait_log("paused priorities", paused=[])


def test_cancel_kills_the_running_job_within_a_second_and_it_is_not_retried(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(jobs={"max_retries": 3}))
    push(r, "normal", {"id": "long", "task": "nap", "args": [30_000]})
    wait_for(lambda: job_hash(r, "long").get("status") == "running", 10)
    worker = int(job_hash(r, "long")["worker_pid"])
    os.kill(worker, 0)  # alive
    asked = time.monotonic()
    cancel_held(r, "long")
    wait_for(lambda: worker_gone(worker), 10, 0.005, what="the worker killed and reaped")
    killed = time.monotonic() - asked
    reply = r.blpop(["prioqd:done:long"], timeout=10)
    ended = time.monotonic() - asked
    assert reply is not None and json.loads(reply[1])["status"] == "cancelled"
    # Within a second of the note; half a second more for a loaded 2-CPU machine.
    assert killed <= 1.5, killed
    assert ended <= 1.5, ended
    assert job_hash(r, "long")["status"] == "cancelled"
    assert r.zcard("prioqd:cancels") == 0 and r.zcard("prioqd:scheduled") == 0
    assert not dead_letters(r)
    # The worker was replaced; the daemon serves on.
    push(r, "normal", {"id": "next", "task": "square", "args": [4]})
    assert wait_status(r, ["next"])["next"]["result"] == "16"
    assert d.events("job cancelled by an operator")


def test_a_pause_is_applied_by_a_running_daemon_within_a_second(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """The note on the control channel is heard at once (no polling): the daemon logs
    the pause within a second of the publish, and its blocking wait, which was
    watching the idle queue, no longer takes what is pushed there."""
    from datetime import datetime

    d = daemon(config())
    wait_for(lambda: waits_blocked(r) >= 3, 10, what="the idle daemon waiting on 3 queues")
    sent = time.time()
    pause(r, "low")
    line = d.wait_log("paused priorities", paused=["low"])
    applied = datetime.fromisoformat(line["timestamp"]).timestamp() - sent
    assert applied <= 1.0, applied
    push(r, "low", {"id": "waits", "task": "square", "args": [2]})
    push(r, "high", {"id": "goes", "task": "square", "args": [2]})
    wait_status(r, ["goes"])
    time.sleep(0.3)
    assert r.llen("prioqd:queue:low") == 1 and not job_hash(r, "waits")
    assert not r.keys("prioqd:landing:*")
    resume(r, "low")
    wait_status(r, ["waits"])


def test_a_cancel_asked_before_the_claim_stops_the_job_when_claimed(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cancel_held(r, "later")  # e.g. the CLI found it in flight, then it was put back
    daemon(config())
    push(r, "normal", {"id": "later", "task": "nap", "args": [5000]})
    reply = r.blpop(["prioqd:done:later"], timeout=10)
    assert reply is not None and json.loads(reply[1])["status"] == "cancelled"


def test_a_cancelled_job_waiting_in_the_pool_for_a_worker_never_runs(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    """One worker. A short task (a few ms on average) has its successor claimed just
    before it is expected to end (the prefetch), and that successor waits in the
    daemon's pool for the worker. Here the short task is held running, so the next job
    is claimed and stays in the pool, not started. `prioqd cancel` of it: it ends
    cancelled without ever running, and the held job runs on and succeeds."""
    cfg = config(workers={"slots": 1})
    d = daemon(cfg)
    hold, held, runs = tmp_path / "hold", tmp_path / "hold.held", tmp_path / "runs"
    # Teach the daemon that held_once takes about 5 ms (within the prefetch range).
    short = [f"short{i}" for i in range(3)]
    for job_id in short:
        push(r, "normal", {"id": job_id, "task": "held_once", "args": [str(hold), 0.005]})
    wait_status(r, short, daemon=d)
    hold.touch()  # the next held_once runs until held is removed
    push(r, "normal", {"id": "busy", "task": "held_once", "args": [str(hold), 0.005]})
    wait_for(held.exists, 10, what="the job holding the one worker")
    wait_for(lambda: job_hash(r, "busy").get("status") == "running", 10)
    worker = int(job_hash(r, "busy")["worker_pid"])
    push(r, "normal", {"id": "waiting", "task": "logrun", "args": [str(runs), "waiting"]})
    # Handed to the pool: the daemon holds it (claimed), and no worker is free for it.
    d.wait_log("job dispatched", job_id="waiting")
    assert held_by(r, d.daemon_id) == {"busy", "waiting"}
    assert r.llen("prioqd:queue:normal") == 0
    assert held.exists() and not runs.exists()

    out = prioqd("cancel", "--config", str(cfg), "waiting")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("waiting: cancelled"), out.stdout
    outcome = json.loads(r.lindex("prioqd:done:waiting", 0))  # type: ignore[arg-type]
    assert (outcome["id"], outcome["status"]) == ("waiting", "cancelled")
    assert job_hash(r, "waiting")["status"] == "cancelled"
    d.wait_log("job cancelled by an operator", job_id="waiting")
    # Taken out of the pool's queue; the running job and its worker were not touched.
    assert held.exists() and not worker_gone(worker)
    assert job_hash(r, "busy")["status"] == "running"

    held.unlink()  # let the held job end
    h = wait_status(r, ["busy"], daemon=d)["busy"]
    assert h["status"] == "succeeded" and h["attempts"] == "1"
    # The worker is free again and the cancelled job does not run on it: a job pushed
    # after runs and ends, and still nothing of "waiting" ran.
    push(r, "normal", {"id": "after", "task": "logrun", "args": [str(runs), "after"]})
    assert wait_status(r, ["after"], daemon=d)["after"]["status"] == "succeeded"
    assert runs.read_text().split() == ["after"]
    assert job_hash(r, "waiting")["status"] == "cancelled"
    assert r.llen("prioqd:done:waiting") == 1
    assert in_flight_count(r) == 0 and not dead_letters(r)
    assert r.llen("prioqd:queue:normal") == 0
    assert not d.events("worker process died")


def test_a_cancelled_job_waiting_unstarted_in_a_workers_batch_never_runs(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    """Jobs known to be short go to the one worker in a batch. The first of the batch
    is held running; `prioqd cancel` of another job of that batch, waiting behind it
    in the worker: it ends cancelled without running, the rest of the batch goes back
    to its queue and runs after, and the held job succeeds."""
    cfg = config(workers={"slots": 1})
    d = daemon(cfg)
    hold, held = tmp_path / "hold", tmp_path / "hold.held"
    # The cancelled job is a held_once on a file of its own: had it run, it would have
    # renamed that file (and held the worker).
    mark, mark_held = tmp_path / "mark", tmp_path / "mark.held"
    nowhere = str(tmp_path / "nowhere")
    # Teach the daemon that held_once, and the high priority, take well under 1 ms: a
    # claim then takes several high jobs a token and they go to the worker together.
    # Its estimate is a moving average of the runs' durations (prioqd.timing.Ewma, as
    # the daemon logs them): a run slowed by a loaded machine is made up for by more.
    average, taught = None, 0
    while average is None or average > 0.0005:
        assert taught < 100, f"held_once runs take {average} s on average here"
        short = [f"short{i}" for i in range(taught, taught + 10)]
        push(r, "high", *({"id": j, "task": "held_once", "args": [nowhere, 0]} for j in short))
        wait_status(r, short, daemon=d)
        taught += len(short)
        average = None
        for e in d.wait_count("job finished", taught):
            if "duration_s" not in e:
                continue  # put back unrun (requeued: a loaded machine batched otherwise)
            took = e["duration_s"]
            average = took if average is None else average + 0.2 * (took - average)
    # While a low job has the worker, the batch's jobs wait in the high queue...
    push(r, "low", {"id": "lead", "task": "nap", "args": [500]})
    wait_for(lambda: job_hash(r, "lead").get("status") == "running", 10)
    hold.touch()
    mark.touch()
    batch = [("head", hold), ("doomed", mark), ("rest1", nowhere), ("rest2", nowhere)]
    r.lpush(  # one LPUSH: the four are in the queue at once, in this order
        "prioqd:queue:high",
        *(json.dumps({"id": j, "task": "held_once", "args": [str(p), 0]}) for j, p in batch),
    )
    # ...and are claimed together when it ends: the first is held, the next waits
    # behind it in the same worker (its start record names that worker).
    wait_for(held.exists, 10, what="the batch's first job held")
    assert {"head", "doomed"} <= held_by(r, d.daemon_id), "not claimed as one batch"
    wait_for(lambda: "worker_pid" in job_hash(r, "doomed"), 10, what="its start record")
    assert job_hash(r, "doomed")["worker_pid"] == job_hash(r, "head")["worker_pid"]
    assert mark.exists() and not mark_held.exists()

    with open(tmp_path / "cancel.out", "w+") as out:
        cancel = subprocess.Popen(
            [*PRIOQD, "cancel", "--config", str(cfg), "--wait-s", "20", "doomed"],
            stdout=out, stderr=subprocess.STDOUT, env=env_with_taskmods(), cwd=str(ROOT),
        )  # fmt: skip
        try:
            # The daemon has taken it out of the batch; the worker hands it back (with
            # the rest) when the job it runs ends, as the hold is lifted.
            d.wait_log("job cancelled by an operator", job_id="doomed")
            held.unlink()
            assert cancel.wait(30) == 0
        finally:
            if cancel.poll() is None:
                cancel.kill()
                cancel.wait()
        out.seek(0)
        assert out.read().startswith("doomed: cancelled")
    h = wait_status(r, ["head", "doomed", "rest1", "rest2"], ("succeeded", "cancelled", "dead"))
    assert {k: v["status"] for k, v in h.items()} == {
        "head": "succeeded", "doomed": "cancelled", "rest1": "succeeded", "rest2": "succeeded",
    }  # fmt: skip
    outcome = json.loads(r.lindex("prioqd:done:doomed", 0))  # type: ignore[arg-type]
    assert outcome["status"] == "cancelled" and r.llen("prioqd:done:doomed") == 1
    assert mark.exists() and not mark_held.exists()  # it never ran
    # What else of the batch had not started went back to its queue unrun, uncharged,
    # and ran after.
    requeued = {e["job_id"] for e in d.events("job finished") if e["outcome"] == "requeued"}
    assert "doomed" not in requeued
    assert h["rest1"]["attempts"] == h["rest2"]["attempts"] == "1"
    wait_for(lambda: in_flight_count(r) == 0, 10, what="nothing left in flight")
    assert not dead_letters(r) and r.llen("prioqd:queue:high") == 0
    assert not d.events("worker process died")


def test_a_unique_job_pushed_again_while_it_runs_is_dropped_as_a_duplicate(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    d = daemon(config())
    events = r.pubsub()
    events.subscribe("prioqd:events")
    runs = tmp_path / "runs"
    job = {"id": "u1", "task": "logrun", "args": [str(runs), "u1", 800], "unique": True}
    push(r, "normal", job)
    wait_for(lambda: runs.exists(), 10)
    push(r, "normal", job)  # a raw LPUSH of the same unique job while it runs
    # Behind it, a sentinel: the duplicate goes to the free worker first, so by the
    # sentinel's end a run of it would have begun (and written to runs).
    push(r, "normal", {"id": "sentinel", "task": "square", "args": [2]})
    wait_status(r, ["u1", "sentinel"])
    assert runs.read_text().split() == ["u1"]
    d.wait_log("job dropped: a run of this unique job is live", job_id="u1")
    seen = []
    while (msg := events.get_message(timeout=0.2)) is not None or not seen:
        if msg and msg["type"] == "message":
            seen.append(json.loads(msg["data"]))
        if msg is None and seen:
            break
    assert {"id": "u1", "status": "duplicate"} in seen
    assert not r.exists("prioqd:unique:u1")  # released when the job ended
    # Once it has ended, the same unique job runs again.
    push(r, "normal", job)
    wait_for(lambda: runs.read_text().split() == ["u1", "u1"], 10)
    events.close()


def test_dead_letters_are_kept_within_dead_letters_max_oldest_dropped_first(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(jobs={"dead_letters_max": 3}))
    for i in range(5):
        push(r, "normal", {"id": f"x{i}", "task": "nope"})
        wait_status(r, [f"x{i}"])
    assert [e["id"] for e in dead_letters(r)] == ["x4", "x3", "x2"]
    d.wait_log("dead letters dropped, oldest first, to keep within dead_letters_max")


def test_enqueued_at_is_accepted_and_a_bad_one_is_rejected(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config())
    push(r, "normal", {"id": "e1", "task": "square", "args": [2], "enqueued_at": time.time()})
    push(r, "normal", {"id": "e2", "task": "square", "args": [2], "enqueued_at": "yesterday"})
    push(r, "normal", {"task": "square", "args": [2], "unique": True})
    hashes = wait_status(r, ["e1", "e2"])
    assert hashes["e1"]["status"] == "succeeded"
    assert "'enqueued_at' must be a number" in hashes["e2"]["error"]
    wait_for(lambda: len(dead_letters(r)) == 2, 10)
    assert any("'unique' needs an 'id'" in e["reason"] for e in dead_letters(r))


Scrape = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Scrape:
    """Every sample of a daemon's /metrics: name -> [(labels, value)]."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Scrape = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(m: Scrape, name: str, **want: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``want``."""
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in want.items()))


def test_metrics_for_prometheus(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    from helpers import free_port

    port = free_port()
    daemon(config(metrics={"listen": f"127.0.0.1:{port}"}))
    push(r, "high", {"id": "m1", "task": "square", "args": [3], "enqueued_at": time.time()})
    push(r, "normal", {"id": "m2", "task": "fail", "args": ["no"], "max_retries": 0})
    push(r, "normal", {"id": "m3", "task": "crash", "max_retries": 0})
    push(r, "low", *({"task": "nap", "args": [1]} for _ in range(3)))
    pause(r, "low")
    wait_status(r, ["m1", "m2", "m3"])
    r.lpush("prioqd:queue:low", json.dumps({"task": "square", "args": [1]}))

    m = wait_for(
        lambda: (s := scrape(port)) and value(s, "prioqd_queue_paused", priority="low") == 1 and s,
        10,
    )
    assert value(m, "prioqd_jobs_total", task="square", priority="high", outcome="succeeded") == 1
    assert value(m, "prioqd_jobs_total", task="fail", outcome="dead") == 1
    assert value(m, "prioqd_job_duration_seconds_count", task="square") == 1
    assert value(m, "prioqd_job_wait_seconds_count", priority="high") == 1
    assert value(m, "prioqd_queue_depth", priority="low") >= 1
    assert value(m, "prioqd_daemons_alive") == 1
    assert value(m, "prioqd_slots", state="busy") + value(m, "prioqd_slots", state="free") == 2
    assert value(m, "prioqd_dead_letters") == 2 and "prioqd_scheduled_jobs" in m
    assert value(m, "prioqd_worker_restarts_total", reason="crashed") == 1
    assert next(lab for lab, _ in m["prioqd_build_info"])["version"]
    assert value(m, "prioqd_redis_errors_total") == 0


def test_metrics_count_failed_cancelled_and_requeued_attempts(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    from helpers import free_port

    port = free_port()
    cfg = config(
        workers={"slots": 1},
        jobs={"max_retries": 1, "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    d = daemon(cfg)
    # failed (will retry), then dead
    push(r, "normal", {"id": "f", "task": "fail"})
    wait_status(r, ["f"], ("dead",))
    # cancelled
    push(r, "high", {"id": "c", "task": "nap", "args": [30_000]})
    wait_status(r, ["c"], ("running",))
    cancel_held(r, "c")
    wait_status(r, ["c"], ("cancelled",))
    # requeued: once `square` is known to be short, a claim takes several payloads of
    # `low` for the one slot; the `nap`s among them cannot share its batch and go back
    # to the head of their queue unrun (a "spill"). One LPUSH, a square at the head:
    # the idle daemon's blocking wait takes it alone (a nap there would teach the
    # daemon that `low` is slow), the next claim the naps.
    def requeued() -> list[dict[str, object]]:
        return [e for e in d.events("job finished") if e.get("outcome") == "requeued"]

    for round_ in range(5):
        warm = [f"w{round_}.{i}" for i in range(20)]
        push(r, "low", *({"id": j, "task": "square", "args": [2]} for j in warm))
        wait_status(r, warm)
        naps = [f"n{round_}.{i}" for i in range(4)]
        batch = [{"id": f"s{round_}", "task": "square", "args": [3]}]
        batch += [{"id": j, "task": "nap", "args": [50]} for j in naps]
        r.lpush("prioqd:queue:low", *(json.dumps(j) for j in batch))
        wait_status(r, [f"s{round_}", *naps])
        if requeued():
            break
    assert requeued(), "no job was put back: the scenario did not happen"
    m = wait_for(
        lambda: (s := scrape(port))
        and value(s, "prioqd_jobs_total", outcome="requeued") == len(requeued())
        and s,
        10,
    )
    assert value(m, "prioqd_jobs_total", task="fail", priority="normal", outcome="failed") == 1
    assert value(m, "prioqd_jobs_total", task="fail", priority="normal", outcome="dead") == 1
    assert value(m, "prioqd_jobs_total", task="nap", priority="high", outcome="cancelled") == 1
    assert value(m, "prioqd_worker_restarts_total", reason="cancelled") == 1


def redis_calls(r: redis.Redis, command: str) -> int:
    """How often the test's redis-server ran ``command`` (INFO commandstats)."""
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_metrics_gauges_read_redis_at_most_once_a_second_and_cover_every_queue(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """Scrapes within CACHE_S answer from the cache (ZCOUNT of the leases is the scrape's
    own command: one per read of Redis); queues no daemon serves have a depth too."""
    from helpers import free_port

    r.lpush("prioqd:queue:orphan", "{}", "{}", "{}")  # a priority nobody serves
    r.lpush("prioqd:queue:bad\x1bname", "{}")  # not a priority name: no series
    port = free_port()
    daemon(config(metrics={"listen": f"127.0.0.1:{port}"}))
    first = scrape(port)
    assert value(first, "prioqd_queue_depth", priority="orphan") == 3
    assert value(first, "prioqd_queue_paused", priority="orphan") == 0
    assert {lab["priority"] for lab, _ in first["prioqd_queue_depth"]} == {
        "high", "normal", "low", "orphan"
    }  # fmt: skip
    # Two scrapes within a second: one read of Redis.
    while True:
        before = redis_calls(r, "zcount")
        t0 = time.monotonic()
        scrape(port)
        scrape(port)
        took = time.monotonic() - t0
        if took < 0.5:  # else a loaded machine split them across a cache expiry: again
            break
    assert redis_calls(r, "zcount") - before <= 1
    # A second later the cache is stale: the next scrape reads Redis again.
    time.sleep(1.1)
    before = redis_calls(r, "zcount")
    scrape(port)
    assert redis_calls(r, "zcount") - before == 1


def test_a_scrape_waiting_on_redis_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """The gauges read Redis in prometheus_client's server thread with a client of
    their own: a scrape stuck on a stalled Redis (SIGSTOP) leaves the event loop free,
    and answers prioqd_redis_readable 0 after its socket timeout."""
    import asyncio
    import signal

    from helpers import RedisServer, free_port

    from prioqd.config import Config as Cfg
    from prioqd.config import RedisConfig
    from prioqd.keys import Keys
    from prioqd.prometheus import PrometheusMetrics, scrape_client

    server = RedisServer(tmp_path / "redis")
    server.start()
    port = free_port()
    cfg = Cfg().replace(redis=RedisConfig(url=server.url, socket_timeout_s=2.0))
    metrics = PrometheusMetrics(
        f"127.0.0.1:{port}",
        client_factory=lambda: scrape_client(cfg),
        keys=Keys("prioqd"),
        priorities=["high", "low"],
        slots=lambda: (0, 2),
    )
    assert server.proc is not None
    try:
        assert value(scrape(port), "prioqd_redis_readable") == 1
        time.sleep(1.1)  # past the cache
        server.proc.send_signal(signal.SIGSTOP)

        async def meanwhile() -> tuple[Scrape, float, float]:
            t0 = time.monotonic()
            stuck = asyncio.ensure_future(asyncio.to_thread(scrape, port))
            worst, last = 0.0, time.monotonic()
            while not stuck.done():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                worst, last = max(worst, now - last), now
            return stuck.result(), time.monotonic() - t0, worst

        m, took, worst_gap = asyncio.run(meanwhile())
        assert 1.5 <= took < 4.0, took  # it waited on Redis, one socket timeout
        assert worst_gap < 0.25, worst_gap  # ...and the loop ran all along
        assert value(m, "prioqd_redis_readable") == 0
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(1.1)
        assert value(scrape(port), "prioqd_redis_readable") == 1
    finally:
        server.proc.send_signal(signal.SIGCONT)
        metrics.close()
        server.stop()


def test_a_taken_metrics_port_exits_1_so_systemd_retries(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """Not a configuration error (exit 2 would stop systemd's restarts for good): the
    port may be held by an old process for a moment."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon(config(metrics={"listen": f"127.0.0.1:{port}"}), wait_ready=False)
        assert d.wait(30) == 1
    err = d.stderr()
    assert f"[metrics] listen = '127.0.0.1:{port}'" in err and "Address already in use" in err
    assert "Traceback" not in err
    (line,) = d.events("cannot serve metrics")
    assert line["level"] == "critical" and "Address already in use" in line["error"]
    assert not r.zcard("prioqd:daemons")  # it never registered


def test_unknown_task_names_share_one_metric_label(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """A producer's bogus task names must not each add a series (memory and scrape size
    would grow without bound)."""
    from helpers import free_port

    port = free_port()
    daemon(config(metrics={"listen": f"127.0.0.1:{port}"}))
    ids = [f"u{i}" for i in range(50)]
    push(r, "normal", *({"id": i, "task": f"bogus_{i}_" + "x" * 200} for i in ids))
    push(r, "normal", {"id": "bad-args", "task": "square", "args": "no"})
    wait_status(r, [*ids, "bad-args"])
    m = wait_for(lambda: (s := scrape(port)) and value(s, "prioqd_jobs_total") == 51 and s, 10)
    series = m["prioqd_jobs_total"]
    assert len(series) == 2, series
    assert value(m, "prioqd_jobs_total", task="(unknown)", outcome="dead") == 50
    # A known task rejected for its arguments keeps its name.
    assert value(m, "prioqd_jobs_total", task="square", outcome="dead") == 1


def test_every_dead_letter_trim_is_logged_and_counted(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """Trims by the cycle (a rejected job) and by the promotion of due jobs (a due job
    of a priority nobody serves) both show in the log and in the metric."""
    from helpers import free_port

    port = free_port()
    d = daemon(config(jobs={"dead_letters_max": 2}, metrics={"listen": f"127.0.0.1:{port}"}))
    for i in range(3):
        push(r, "normal", {"id": f"x{i}", "task": "nope"})
        wait_status(r, [f"x{i}"])
    d.wait_log("dead letters dropped, oldest first, to keep within dead_letters_max",
               during="cycle")  # fmt: skip
    # Due at once; the next heartbeat (every lease_s / 3) tells the scheduler.
    job = json.dumps({"id": "ghost1", "task": "square", "args": [1]})
    r.zadd("prioqd:scheduled", {f"ghost\nd/1\n{job}": 0})
    d.wait_log("due jobs of a priority no daemon serves were dead-lettered")
    d.wait_log("dead letters dropped, oldest first, to keep within dead_letters_max",
               during="promote")  # fmt: skip
    letters = [(e.get("id"), e["priority"]) for e in dead_letters(r)]
    assert letters == [(None, "ghost"), ("x2", "normal")]
    trims = d.events("dead letters dropped, oldest first, to keep within dead_letters_max")
    assert sum(e["dropped"] for e in trims) == 2
    assert all(e["dead_letters_max"] == 2 for e in trims)
    m = scrape(port)
    assert value(m, "prioqd_dead_letters_dropped_total") == 2
    assert value(m, "prioqd_dead_letters") == 2


# --- what a task knows and says ---------------------------------------------------------


def test_a_task_knows_its_job_and_a_retry_its_attempt(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    from prioqd import NotInTaskError, current_job

    daemon(config(jobs={"timeout_s": 60, "max_retries": 4}))
    sent = time.time()
    push(r, "high", {"id": "who", "task": "whoami", "meta": {"k": 1}, "enqueued_at": sent})
    ctx = json.loads(wait_status(r, ["who"])["who"]["result"])
    assert ctx["id"] == "who" and ctx["task"] == "whoami" and ctx["priority"] == "high"
    assert ctx["attempt"] == 1 and ctx["max_retries"] == 4 and ctx["meta"] == {"k": 1}
    assert ctx["enqueued_at"] == sent and 55 < ctx["deadline"] - time.time() <= 60
    # A retry knows it is one: attempt 3 after two failures (and its hash says 3).
    counter = tmp_path / "n"
    push(r, "normal", {"id": "again", "task": "async_flaky", "args": [str(counter), 2]})
    h = wait_status(r, ["again"], timeout_s=30)["again"]
    assert h["status"] == "succeeded" and h["attempts"] == "3" and h["result"] == "3"
    try:
        current_job()
    except NotInTaskError as exc:
        assert "inside a running prioqd task" in str(exc)
    else:
        raise AssertionError("current_job() outside a task must raise")


def test_an_async_task_knows_its_job_as_a_sync_one_does(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(jobs={"timeout_s": 60, "max_retries": 2}))
    sent = time.time()
    for task in ("whoami", "async_whoami"):
        job = {"id": task, "task": task, "meta": {"k": [1]}, "enqueued_at": sent, "timeout_s": 30}
        push(r, "low", job)
    h = wait_status(r, ["whoami", "async_whoami"])
    for task in ("whoami", "async_whoami"):
        assert h[task]["status"] == "succeeded", h[task]
        ctx = json.loads(h[task]["result"])
        assert set(ctx) == {"id", "task", "priority", "attempt", "max_retries", "meta",
                            "enqueued_at", "deadline"}  # fmt: skip
        assert (ctx["id"], ctx["task"], ctx["priority"]) == (task, task, "low")
        assert (ctx["attempt"], ctx["max_retries"], ctx["meta"]) == (1, 2, {"k": [1]})
        assert ctx["enqueued_at"] == sent
        # The job's own timeout_s (30), from when it started.
        assert ctx["deadline"] == pytest.approx(float(h[task]["started_at"]) + 30, abs=0.5)


def test_set_progress_misuse_raises_and_a_bad_last_value_is_dropped_with_a_warning(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    from prioqd import NotInTaskError, set_progress

    with pytest.raises(NotInTaskError, match=r"set_progress\(\) is only available inside"):
        set_progress(0.5)
    d = daemon(config(jobs={"max_retries": 0}))
    push(r, "normal", {"id": "misuse", "task": "progress_misuse"})
    h = wait_status(r, ["misuse"], daemon=d)["misuse"]
    # The bad last value did not fail the job: it succeeded at its first attempt...
    assert (h["status"], h["attempts"]) == ("succeeded", "1"), h
    got = json.loads(h["result"])
    wrong_type = "TypeError: progress must be a number or a JSON object (a dict)"
    assert got["text"] == got["bool"] == got["list"] == wrong_type
    assert got["nan"] == got["inf"] == "ValueError: progress must be a finite number"
    assert got["not_json"].startswith("ValueError: progress must be JSON: "), got
    assert "is not JSON serializable" in got["not_json"]
    assert got["nan_inside"].startswith("ValueError: Out of range float values"), got
    assert got["too_big"] == "ValueError: progress is 5010 bytes of JSON, over 4096"
    # ...its progress is the last value sent (4096 bytes: the limit is allowed)...
    assert len(h["progress"]) == 4096 and json.loads(h["progress"]) == {"pad": "x" * 4086}
    # ...and the value dropped is said on stderr (the worker's, which is the daemon's).
    warning = wait_for(
        lambda: re.search(r"prioqd: last progress of job misuse dropped: (.*)", d.stderr()),
        5,
        what="the warning on stderr",
    )
    assert warning[1].startswith("progress must be JSON: ") and "object" in warning[1]
    # The worker carries on.
    push(r, "normal", {"id": "next", "task": "square", "args": [3]})
    assert wait_status(r, ["next"], daemon=d)["next"]["result"] == "9"


def test_progress_reaches_the_job_hash_at_most_twice_a_second(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config())
    push(r, "normal", {"id": "p", "task": "progressing", "args": [40, 50]})  # 2 s, 40 steps
    seen: list[str] = []

    def sample() -> bool:
        value = job_hash(r, "p").get("progress")
        if value and (not seen or seen[-1] != value):
            seen.append(value)
        return job_hash(r, "p").get("status") == "succeeded"

    wait_for(sample, 20, 0.02)
    assert json.loads(job_hash(r, "p")["progress"]) == {"done": 40, "of": 40}
    assert 2 <= len(seen) <= 6, seen  # ~2 s at two a second, not 40 writes
    steps = [json.loads(v)["done"] for v in seen]
    assert steps == sorted(steps)


def test_a_task_calling_set_progress_in_a_loop_costs_redis_two_writes_a_second(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """However often a task calls set_progress, the job hash is written at most twice
    a second (counted by Redis: INFO commandstats), and the last value, given within
    half a second of the one before, arrives when the job ends."""
    daemon(config(workers={"slots": 1}))
    push(r, "normal", {"id": "spam", "task": "progress_spam", "args": [3.0]})
    wait_for(lambda: job_hash(r, "spam").get("status") == "running", 10)
    r.config_resetstat()
    since = time.time()
    h = wait_status(r, ["spam"])["spam"]
    took = float(h["finished_at"]) - since
    writes = int(r.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))
    calls = int(h["result"])
    assert calls > 1000, calls  # the task called it in a tight loop
    # Two a second, the first at once; and the ending's own writes (the job hash, and
    # the claim's result in P:retired:D).
    assert 2 <= writes <= 2 * took + 4, (writes, took)
    assert json.loads(h["progress"]) == {"calls": calls, "last": True}


def test_async_tasks_run_fail_retry_and_time_out_like_sync_ones(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    daemon(config(jobs={"max_retries": 0}))
    push(r, "normal", {"id": "a1", "task": "async_square", "args": [7]})
    push(r, "normal", {"id": "a2", "task": "async_fail", "args": ["boom"]})
    push(r, "normal", {"id": "a3", "task": "async_square", "args": [2, 30], "timeout_s": 1})
    h = wait_status(r, ["a1", "a2", "a3"], timeout_s=30)
    assert h["a1"]["status"] == "succeeded" and h["a1"]["result"] == "49"
    assert h["a2"]["status"] == "dead" and "RuntimeError: boom" in h["a2"]["error"]
    assert "raise RuntimeError(message)" in h["a2"]["traceback"]
    assert h["a3"]["status"] == "dead" and "timed out after 1s" in h["a3"]["error"]


def test_an_async_task_that_kills_its_worker_is_charged_as_a_crash_and_retried(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    d = daemon(config(jobs={"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2}))
    push(r, "normal", {"id": "ac", "task": "async_crash", "max_retries": 1})
    h = wait_status(r, ["ac"], timeout_s=30, daemon=d)["ac"]
    assert h["status"] == "dead" and h["attempts"] == "2"
    assert h["error"] == "worker process exited with code 13"
    assert len(d.wait_count("worker process died", 2)) == 2
    push(r, "normal", {"id": "after", "task": "async_square", "args": [3]})
    assert wait_status(r, ["after"], daemon=d)["after"]["result"] == "9"


def test_cancelling_a_running_async_task_kills_its_worker_and_it_is_not_retried(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    import psutil
    from helpers import prioqd

    cfg = config(jobs={"max_retries": 3})
    d = daemon(cfg)
    pid_file = tmp_path / "pid"
    push(r, "normal", {"id": "along", "task": "async_nap_pid", "args": [str(pid_file), 30]})
    wait_for(lambda: job_hash(r, "along").get("status") == "running" and pid_file.exists(), 10)
    worker = int(pid_file.read_text().split()[0])
    out = prioqd("cancel", "--config", str(cfg), "along")
    assert out.returncode == 0, out.stderr
    reply = r.blpop(["prioqd:done:along"], timeout=10)
    assert reply is not None and json.loads(reply[1])["status"] == "cancelled"
    h = job_hash(r, "along")
    assert h["status"] == "cancelled" and h["attempts"] == "1"
    wait_for(lambda: not psutil.pid_exists(worker), 10, what="the worker to be killed")
    assert r.zcard("prioqd:scheduled") == 0 and not dead_letters(r)
    push(r, "normal", {"id": "next", "task": "async_square", "args": [4]})
    assert wait_status(r, ["next"], daemon=d)["next"]["result"] == "16"
    assert job_hash(r, "along")["status"] == "cancelled"  # still: no retry ran


def test_tasks_an_async_job_leaves_running_are_cancelled_when_it_ends(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    """The worker's event loop serves the next job: what one job started and did not
    await must not run on during it (with the old job's context)."""
    daemon(config(workers={"slots": 1}))
    marks = tmp_path / "marks"
    push(r, "normal", {"id": "leaky", "task": "async_leaky", "args": [str(marks), 300]})
    push(r, "normal", {"id": "next", "task": "async_square", "args": [2, 1.0]})
    h = wait_status(r, ["leaky", "next"])
    assert h["leaky"]["result"] == '"started"' and h["next"]["result"] == "4"
    # Cancelled as its job ended, before the next job started on the same loop.
    assert marks.read_text().split() == ["cancelled"]
    assert float(h["next"]["started_at"]) >= float(h["leaky"]["finished_at"])


def test_a_task_left_running_that_fails_its_cancellation_is_reported_on_stderr(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """What ``asyncio.run`` does with such a task: its exception goes to the loop's
    exception handler (on stderr); the job that left it has succeeded, and the worker
    goes on to the next job."""
    d = daemon(config(workers={"slots": 1}))
    push(r, "normal", {"id": "bad-leak", "task": "async_leaky_bad"})
    push(r, "normal", {"id": "next", "task": "async_square", "args": [3]})
    h = wait_status(r, ["bad-leak", "next"], daemon=d)
    assert h["bad-leak"]["status"] == "succeeded" and h["bad-leak"]["result"] == '"started"'
    assert h["next"]["status"] == "succeeded" and h["next"]["result"] == "9"
    assert not d.events("worker process died")  # the same worker ran both
    wait_for(lambda: "RuntimeError: cleanup of bad-leak failed" in d.stderr(), 5)
    assert "unhandled exception in a task the job left running" in d.stderr()


def test_a_traceback_over_16_ki_characters_within_64_kib_of_utf8_is_kept_whole(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    # 20,000 characters of two bytes: 40,000 bytes of UTF-8, under the 64 KiB bound
    # (four bytes a character would be over it: the bound counts bytes, not characters).
    d = daemon(config(jobs={"max_retries": 0}))
    push(r, "normal", {"id": "long-tb", "task": "raise_long", "args": ["\u00e9", 20_000]})
    h = wait_status(r, ["long-tb"], daemon=d)["long-tb"]
    assert h["status"] == "dead"
    tb = h["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert tb.rstrip().endswith("ValueError: " + "\u00e9" * 20_000)
    assert "truncated" not in tb and 40_000 < len(tb.encode()) < 64 * 1024
    # The error line itself is held to 4 KiB.
    assert "[error text truncated: 40012 bytes, the first 4096 kept]" in h["error"]


def test_a_settled_cancel_is_forgotten_by_every_daemon_so_the_id_can_run_again(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    """Every daemon keeps the cancels in memory; the one that ends the cancelled job
    removes it from Redis and must tell the others, or a daemon that heard the cancel
    would cancel the next job pushed with that id (a raw LPUSH, a retry from a
    producer) for the ten minutes the cancel is kept."""
    cfg = config(workers={"slots": 1})
    a = daemon(cfg)
    push(r, "normal", {"id": "again", "task": "nap", "args": [30_000]})
    wait_for(lambda: job_hash(r, "again").get("status") == "running", 10)
    b = daemon(cfg)  # idle; hears the cancel below too
    cancel_held(r, "again")
    assert wait_status(r, ["again"], ("cancelled",))["again"]["status"] == "cancelled"
    wait_for(lambda: not r.zscore("prioqd:cancels", "again"), 10, what="cancel settled")
    assert a.stop() == 0  # only b is left to take the id pushed again
    r.delete("prioqd:done:again", "prioqd:job:again")
    # b busy on its one slot, so its next claim (not its idle wait) takes the id.
    push(r, "normal", {"id": "blocker", "task": "nap", "args": [300]})
    wait_for(lambda: job_hash(r, "blocker").get("status") == "running", 10)
    push(r, "normal", {"id": "again", "task": "square", "args": [4]})
    outcome = wait_status(r, ["again"], ("succeeded", "cancelled", "dead"))["again"]
    assert outcome["status"] == "succeeded" and outcome["result"] == "16", outcome
    assert not b.events("job cancelled by an operator")
