"""What a daemon does with operators' commands and with the job fields that serve
them: pause and resume, cancel, unique jobs, enqueued_at, the dead-letter bound.

Commands are written to Redis as the CLI and the dashboard write them (the state in
``<prefix>:paused`` / ``<prefix>:cancels``, a note on ``<prefix>:control``), so these
tests hold whichever client sends them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis
from helpers import Config, Daemon, dead_letters, job_hash, push, wait_for, wait_status


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
    asked = time.monotonic()
    cancel_held(r, "long")
    reply = r.blpop(["prioqd:done:long"], timeout=10)
    took = time.monotonic() - asked
    assert reply is not None and json.loads(reply[1])["status"] == "cancelled"
    assert took < 3.0, took  # within a second of the note, with margin for a loaded box
    assert job_hash(r, "long")["status"] == "cancelled"
    assert r.zcard("prioqd:cancels") == 0 and r.zcard("prioqd:scheduled") == 0
    assert not dead_letters(r)
    # The worker was replaced; the daemon serves on.
    push(r, "normal", {"id": "next", "task": "square", "args": [4]})
    assert wait_status(r, ["next"])["next"]["result"] == "16"
    assert d.events("job cancelled by an operator")


def test_a_cancel_asked_before_the_claim_stops_the_job_when_claimed(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cancel_held(r, "later")  # e.g. the CLI found it in flight, then it was put back
    daemon(config())
    push(r, "normal", {"id": "later", "task": "nap", "args": [5000]})
    reply = r.blpop(["prioqd:done:later"], timeout=10)
    assert reply is not None and json.loads(reply[1])["status"] == "cancelled"


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


def test_metrics_for_prometheus(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    import urllib.request

    from helpers import free_port
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    daemon(config(metrics={"listen": f"127.0.0.1:{port}"}))
    push(r, "high", {"id": "m1", "task": "square", "args": [3], "enqueued_at": time.time()})
    push(r, "normal", {"id": "m2", "task": "fail", "args": ["no"], "max_retries": 0})
    push(r, "normal", {"id": "m3", "task": "crash", "max_retries": 0})
    push(r, "low", *({"task": "nap", "args": [1]} for _ in range(3)))
    pause(r, "low")
    wait_status(r, ["m1", "m2", "m3"])
    r.lpush("prioqd:queue:low", json.dumps({"task": "square", "args": [1]}))

    def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **want: str) -> float:
        return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in want.items()))

    m = wait_for(
        lambda: (s := scrape()) and value(s, "prioqd_queue_paused", priority="low") == 1 and s,
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
