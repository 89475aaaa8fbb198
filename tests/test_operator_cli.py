"""``prioqd inspect``, ``cancel``, ``pause``/``resume`` and ``status`` as an operator
runs them: exit codes, what they print, and what they change in Redis."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    PRIOQD,
    ROOT,
    Config,
    Daemon,
    RedisServer,
    env_with_taskmods,
    job_hash,
    prioqd,
    push,
    wait_for,
    wait_status,
    worker_gone,
    write_config,
)


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    out = prioqd(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def inspect(cfg: Path, job_id: str) -> dict[str, Any]:
    out = prioqd("inspect", "--config", str(cfg), job_id, "--json")
    assert out.returncode in (0, 1), out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    assert data["found"] == (out.returncode == 0)
    return data


def member(priority: str, job: dict[str, Any], unique: str = "d/1") -> str:
    return f"{priority}\n{unique}\n{json.dumps(job)}"


# --- inspect ---------------------------------------------------------------------------


def test_inspect_says_where_a_job_is(r: redis.Redis, config: Config) -> None:
    cfg = config()
    push(r, "low", *({"id": f"q{i}", "task": "square", "args": [i]} for i in range(3)))
    r.zadd("prioqd:scheduled", {member("high", {"id": "s1", "task": "square"}): 4102444800000})
    r.lpush("prioqd:dead", json.dumps({"reason": "unknown task 'nope'", "id": "d1",
                                       "priority": "high", "payload": "{}"}))  # fmt: skip
    r.hset("prioqd:job:e1", mapping={"status": "succeeded", "result": "4"})
    r.rpush("prioqd:done:e1", json.dumps({"id": "e1", "status": "succeeded", "result": 4}))

    # q0 was pushed first: it is at the head.
    assert inspect(cfg, "q0")["where"] == {
        "state": "queued", "priority": "low", "position": 0, "depth": 3
    }  # fmt: skip
    assert inspect(cfg, "q2")["where"]["position"] == 2
    assert "position 1 from the head (of 3)" in ok("inspect", "--config", str(cfg), "q1").stdout
    assert inspect(cfg, "s1")["where"] == {
        "state": "scheduled", "priority": "high", "due_at": 4102444800.0
    }  # fmt: skip
    assert "due 2100-01-01 00:00:00Z" in ok("inspect", "--config", str(cfg), "s1").stdout
    dead = inspect(cfg, "d1")
    assert dead["where"]["state"] == "dead" and dead["where"]["reason"] == "unknown task 'nope'"
    ended = inspect(cfg, "e1")
    assert ended["where"] == {"state": "ended", "status": "succeeded"}
    assert ended["hash"]["result"] == "4" and ended["outcome"]["result"] == 4

    unknown = prioqd("inspect", "--config", str(cfg), "never-heard-of")
    assert unknown.returncode == 1 and "unknown" in unknown.stdout


def test_inspect_a_running_job(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config()
    d = daemon(cfg)
    push(r, "normal", {"id": "run1", "task": "nap", "args": [5000]})
    wait_status(r, ["run1"], ("running",))
    time.sleep(1.1)
    where = inspect(cfg, "run1")["where"]
    assert where["state"] == "running" and where["priority"] == "normal"
    assert where["daemon"].startswith(f"{r.hget('prioqd:job:run1', 'daemon').decode()}")
    assert str(d.pid) in where["daemon"] and where["running_s"] >= 1.0
    text = ok("inspect", "--config", str(cfg), "run1").stdout
    running_for = re.search(r"running on daemon .*, for (\d+\.\d)s", text)
    assert running_for and float(running_for[1]) >= 1.0, text


def test_inspect_escapes_control_characters(r: redis.Redis, config: Config) -> None:
    cfg = config()
    push(r, "low", {"id": "esc", "task": "\x1b[31mred\x07", "args": ["\x1b]0;title\x07"]})
    # A hash written by some other tool: its text reaches the terminal unquoted.
    r.hset("prioqd:job:esc", mapping={"task": "\x1b[31mred\x07", "status": "queued"})
    out = ok("inspect", "--config", str(cfg), "esc")
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "\\x1b[31mred\\x07" in out.stdout


# --- cancel ------------------------------------------------------------------------------


def test_cancel_a_queued_job_wakes_its_waiter(r: redis.Redis, config: Config) -> None:
    cfg = config()
    push(r, "low", *({"id": f"c{i}", "task": "square", "args": [i]} for i in range(3)))
    events = r.pubsub(ignore_subscribe_messages=True)
    events.subscribe("prioqd:events")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(r.blpop(["prioqd:done:c1"], 30)))
    waiter.start()
    out = ok("cancel", "--config", str(cfg), "c1")
    assert "c1: cancelled (removed from queue low)" in out.stdout
    waiter.join(10)
    outcome = json.loads(got[0][1])
    assert outcome["status"] == "cancelled" and outcome["error"] == "cancelled"
    assert outcome["task"] == "square" and outcome["priority"] == "low"
    h = job_hash(r, "c1")
    assert h["status"] == "cancelled" and h["task"] == "square" and float(h["finished_at"]) > 0
    assert 0 < r.ttl("prioqd:job:c1") <= 86400
    msg = wait_for(lambda: events.get_message(timeout=0.1), 5)
    assert json.loads(msg["data"])["id"] == "c1"
    # The others are untouched, in order.
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:low", 0, -1)] == ["c2", "c0"]
    events.close()


def test_cancel_a_scheduled_job(r: redis.Redis, config: Config) -> None:
    cfg = config()
    r.zadd("prioqd:scheduled", {member("high", {"id": "later", "task": "square"}): 4102444800000})
    r.zadd("prioqd:scheduled", {member("high", {"id": "other", "task": "square"}): 4102444800000})
    r.hset("prioqd:job:later", mapping={"status": "scheduled", "retry_at": "4102444800"})
    out = ok("cancel", "--config", str(cfg), "later", "--json")
    assert json.loads(out.stdout)[0]["outcome"] == "cancelled"
    assert r.zcard("prioqd:scheduled") == 1
    h = job_hash(r, "later")
    assert h["status"] == "cancelled" and "retry_at" not in h
    assert json.loads(r.lindex("prioqd:done:later", 0))["status"] == "cancelled"


def test_cancel_exits_1_for_unknown_or_ended_jobs(r: redis.Redis, config: Config) -> None:
    cfg = config()
    push(r, "low", {"id": "live", "task": "square"})
    r.hset("prioqd:job:done1", mapping={"status": "succeeded"})
    out = prioqd("cancel", "--config", str(cfg), "live", "done1", "ghost")
    assert out.returncode == 1
    assert "live: cancelled" in out.stdout
    assert "done1: ended (already ended: succeeded)" in out.stdout
    assert "ghost: unknown" in out.stdout
    assert job_hash(r, "done1")["status"] == "succeeded"
    # Cancelling it again: it has ended now.
    assert prioqd("cancel", "--config", str(cfg), "live").returncode == 1


def test_cancel_a_running_job(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(workers={"slots": 1})
    daemon(cfg)
    push(r, "high", {"id": "slow", "task": "nap", "args": [30000]})
    wait_status(r, ["slow"], ("running",))
    worker = int(job_hash(r, "slow")["worker_pid"])
    control = r.pubsub(ignore_subscribe_messages=True)
    control.subscribe("prioqd:control")
    wait_for(lambda: control.get_message(timeout=0.1) is None, 5)  # the subscription's reply
    cli = subprocess.Popen(
        [*PRIOQD, "cancel", "--config", str(cfg), "slow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_with_taskmods(), cwd=str(ROOT),
    )  # fmt: skip
    msg = wait_for(lambda: control.get_message(timeout=0.01), 30)  # the CLI's start-up
    published = time.monotonic()
    assert json.loads(msg["data"]) == {"op": "cancel", "ids": ["slow"]}
    wait_for(lambda: worker_gone(worker), 10, 0.005, what="the worker killed and reaped")
    # Within a second of the command's note (0.5 s more for a loaded machine).
    assert time.monotonic() - published <= 1.5
    stdout, stderr = cli.communicate(timeout=30)
    assert cli.returncode == 0, stdout + stderr
    assert "slow: cancelled (stopped by its daemon)" in stdout
    assert job_hash(r, "slow")["status"] == "cancelled"
    # Not retried; the only slot is free again.
    assert r.zcard("prioqd:scheduled") == 0 and r.llen("prioqd:queue:high") == 0
    push(r, "high", {"id": "after", "task": "square", "args": [3]})
    wait_status(r, ["after"], timeout_s=5)
    control.close()


def test_a_cancel_no_daemon_confirms_in_time_stays_requested_and_is_applied_later(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    # The daemon holding the job is stopped (SIGSTOP: a hung or very busy host), its
    # lease long enough that nobody recovers the job meanwhile.
    cfg = config(workers={"slots": 1}, daemon={"lease_s": 30})
    d = daemon(cfg)
    push(r, "high", {"id": "held", "task": "nap", "args": [30000]})
    wait_status(r, ["held"], ("running",))
    d.signal(signal.SIGSTOP)
    try:
        out = prioqd("cancel", "--config", str(cfg), "--wait-s", "0.5", "held")
        assert out.returncode == 1, out.stdout + out.stderr  # not cancelled (yet)
        assert out.stdout == (
            "held: requested (no daemon confirmed within 0.5s; the cancel stays asked for 60 min)\n"
        )
        assert job_hash(r, "held")["status"] == "running"
        expiry_ms = r.zscore("prioqd:cancels", "held")
        assert expiry_ms is not None
        assert 3590 <= expiry_ms / 1000 - time.time() <= 3600
    finally:
        d.signal(signal.SIGCONT)
    # The daemon, back, finds the cancel and stops the job: not retried.
    h = wait_status(r, ["held"], ("cancelled", "succeeded", "dead"), daemon=d)["held"]
    assert h["status"] == "cancelled", h
    assert r.zcard("prioqd:scheduled") == 0 and r.llen("prioqd:queue:high") == 0


# --- pause and resume ----------------------------------------------------------------------


def test_pause_and_resume_are_kept_in_redis_and_announced(r: redis.Redis, config: Config) -> None:
    cfg = config()
    control = r.pubsub(ignore_subscribe_messages=True)
    control.subscribe("prioqd:control")
    out = ok("pause", "--config", str(cfg), "low", "normal", "--json")
    assert json.loads(out.stdout) == {"paused": ["low", "normal"]}
    assert r.smembers("prioqd:paused") == {b"low", b"normal"}
    msg = wait_for(lambda: control.get_message(timeout=0.1), 5)
    assert json.loads(msg["data"]) == {"op": "pause", "priorities": ["low", "normal"]}
    status = json.loads(ok("status", "--config", str(cfg), "--json").stdout)
    assert status["paused"] == ["low", "normal"]
    assert [q["paused"] for q in status["priorities"]] == [False, True, True]
    assert "PAUSED" in ok("status", "--config", str(cfg)).stdout

    assert "paused: normal" in ok("resume", "--config", str(cfg), "low").stdout
    assert r.smembers("prioqd:paused") == {b"normal"}
    msg = wait_for(lambda: control.get_message(timeout=0.1), 5)
    assert json.loads(msg["data"]) == {"op": "resume", "priorities": ["low"]}
    control.close()


def test_pause_refuses_an_unknown_priority(r: redis.Redis, config: Config) -> None:
    out = prioqd("pause", "--config", str(config()), "urgent")
    assert out.returncode == 1 and "unknown priority 'urgent'" in out.stderr
    assert r.smembers("prioqd:paused") == set()


def test_a_paused_priority_waits_and_running_jobs_finish(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    daemon(cfg)
    push(r, "normal", {"id": "running", "task": "nap", "args": [1500]})
    wait_status(r, ["running"], ("running",))
    ok("pause", "--config", str(cfg), "normal")
    push(r, "normal", {"id": "waits", "task": "square", "args": [2]})
    wait_status(r, ["running"])  # the running one finishes
    # A job below the paused priority, pushed after: a daemon that claimed from the
    # paused one would have taken "waits" first.
    push(r, "low", {"id": "goes", "task": "square", "args": [2]})
    wait_status(r, ["goes"])
    assert r.llen("prioqd:queue:normal") == 1 and job_hash(r, "waits") == {}
    ok("resume", "--config", str(cfg), "normal")
    wait_status(r, ["waits"], ("succeeded",), timeout_s=10)


# --- status ------------------------------------------------------------------------------


def test_status_shows_oldest_age_and_running_jobs(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 1})
    d = daemon(cfg)
    push(r, "high", {"id": "busy", "task": "nap", "args": [4000]})
    wait_status(r, ["busy"], ("running",))
    push(r, "low", {"task": "square", "args": [1], "enqueued_at": time.time() - 90})
    push(r, "low", {"task": "square", "args": [2], "enqueued_at": time.time()})
    started_at = float(job_hash(r, "busy")["started_at"])
    before = time.time()
    report = json.loads(ok("status", "--config", str(cfg), "--json").stdout)
    after = time.time()
    low = next(q for q in report["priorities"] if q["priority"] == "low")
    assert low["depth"] == 2 and 89 <= low["oldest_age_s"] < 120
    (job,) = report["running"]
    assert job["id"] == "busy" and job["task"] == "nap" and job["state"] == "running"
    assert str(d.pid) in job["daemon"]
    # How long it has run, as of the status call (a second of slack each way).
    assert before - started_at - 1 <= job["running_s"] <= after - started_at + 1, job
    text = ok("status", "--config", str(cfg)).stdout
    assert "1m3" in text  # the low queue's oldest job: 1m30s and counting
    assert "busy" in text and "nap" in text


def test_dead_list_limit(r: redis.Redis, config: Config) -> None:
    for i in range(5):
        r.lpush("prioqd:dead", json.dumps({"reason": f"r{i}", "id": f"x{i}"}))
    out = ok("dead", "list", "--config", str(config()), "--limit", "2", "--json")
    assert [e["id"] for e in json.loads(out.stdout)] == ["x4", "x3"]


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["cancel"], 2, "required: JOB_ID"),
        (["pause"], 2, "required: PRIORITY"),
        (["inspect", "--config", "/nonexistent.toml", "x"], 2, "file not found"),
        (["web", "--config", "/nonexistent.toml"], 2, "file not found"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], code: int, message: str) -> None:
    out = prioqd(*args)
    assert out.returncode == code and message in out.stderr
    assert "Traceback" not in out.stderr


def test_web_config_errors(tmp_path: Path, config: Config) -> None:
    cfg = str(config())
    out = prioqd("web", "--config", cfg)
    assert out.returncode == 2 and "no token for actions" in out.stderr
    out = prioqd("web", "--config", cfg, "--read-only", "--listen", "localhost")
    assert out.returncode == 2 and "--listen: must be HOST:PORT" in out.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    cfg2 = str(config(web={"token_file": str(short)}))
    out = prioqd("web", "--config", cfg2)
    assert out.returncode == 2 and "shorter than 16 characters" in out.stderr
    cfg3 = str(config(web={"token_file": str(tmp_path / "missing")}))
    out = prioqd("web", "--config", cfg3)
    assert out.returncode == 2 and "web.token_file: cannot read" in out.stderr
    cfg4 = str(config(web={"root_path": "/a/"}))
    out = prioqd("web", "--config", cfg4)
    assert out.returncode == 2 and "web.root_path" in out.stderr
    assert "Traceback" not in out.stderr


# --- every command takes --config and --url; output is escaped, errors included ----------


def test_run_and_check_config_take_url(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The file names a Redis nobody listens on; --url names the test's.
    real = redis_server.url
    cfg = write_config(tmp_path / "elsewhere.toml", "redis://127.0.0.1:1/0")
    out = ok("check-config", "--config", str(cfg), "--url", real)
    assert out.stdout.strip() == f"{cfg}: ok"
    # A bad --url is a configuration error like a bad [redis] url.
    bad = prioqd("check-config", "--config", str(cfg), "--url", "http://x")
    assert bad.returncode == 2 and "--url: scheme must be" in bad.stderr, bad.stderr

    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*PRIOQD, "run", "--config", str(cfg), "--url", real],
        stdout=log, stderr=subprocess.STDOUT, env=env_with_taskmods(), cwd=str(ROOT),
    )  # fmt: skip
    try:
        push(r, "high", {"id": "via-url", "task": "square", "args": [5]})
        assert wait_status(r, ["via-url"], timeout_s=30)["via-url"]["result"] == "25"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_errors_are_escaped_like_every_other_output(r: redis.Redis, config: Config) -> None:
    # The unknown-priority error lists the queues found in Redis, by their key names.
    r.lpush("prioqd:queue:\x1b]0;owned\x07evil", "{}")
    out = prioqd("pause", "--config", str(config()), "urgent")
    assert out.returncode == 1 and "unknown priority 'urgent'" in out.stderr, out.stderr
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr
    assert "\\x1b]0;owned\\x07evil" in out.stderr


def test_dead_requeue_and_purge_print_json(r: redis.Redis, config: Config) -> None:
    cfg = str(config())
    for i in range(3):
        payload = json.dumps({"id": f"j{i}", "task": "t"})
        letter = {"reason": "r", "id": f"j{i}", "priority": "low", "payload": payload}
        r.lpush("prioqd:dead", json.dumps(letter))
    out = prioqd("dead", "requeue", "--config", cfg, "j0", "nope", "--json")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout) == {
        "requeued": 1, "missing": ["nope"], "gone": [], "duplicate": [],
    }  # fmt: skip
    out = ok("dead", "purge", "--config", cfg, "--json")
    assert json.loads(out.stdout) == {"purged": 2}
    assert r.llen("prioqd:dead") == 0 and r.llen("prioqd:queue:low") == 1


def test_dead_requeue_of_a_unique_job_whose_id_is_live_leaves_the_letter(
    r: redis.Redis, config: Config
) -> None:
    cfg = str(config())
    payload = json.dumps({"id": "u1", "task": "t", "unique": True})
    r.lpush(
        "prioqd:dead",
        json.dumps({"reason": "r", "id": "u1", "priority": "low", "payload": payload}),
    )
    r.lpush("prioqd:queue:low", payload)  # a copy pushed since, holding the lock
    r.set("prioqd:unique:u1", "q")
    out = prioqd("dead", "requeue", "--config", cfg, "u1")
    assert out.returncode == 1, out.stderr
    assert "u1 not requeued: a unique job of that id is queued or running" in out.stderr
    assert r.llen("prioqd:dead") == 1 and r.llen("prioqd:queue:low") == 1
    r.delete("prioqd:queue:low", "prioqd:unique:u1")  # that copy ran and ended
    out = prioqd("dead", "requeue", "--config", cfg, "u1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["requeued"] == 1
    assert r.get("prioqd:unique:u1") == b"q" and r.llen("prioqd:queue:low") == 1


def test_a_bounded_search_says_it_was_cut_only_when_it_was(r: redis.Redis, config: Config) -> None:
    """The dashboard's bound (inspect(search_max=...)): a list exactly as long as the
    bound, read to its end, is not a search cut short; one entry more is."""
    import asyncio

    from prioqd.admin import Admin
    from prioqd.broker import Broker
    from prioqd.config import load

    cfg = load(str(config()))
    r.rpush("prioqd:queue:normal", *(json.dumps({"id": f"x{i}", "task": "t"}) for i in range(2000)))

    async def lookup(job_id: str) -> tuple[str, bool]:
        broker = Broker.from_config(cfg)
        try:
            info = await Admin(broker, cfg).inspect(job_id, search_max=2000)
            return info.where.state, info.searched_all
        finally:
            await broker.close()

    assert asyncio.run(lookup("nowhere")) == ("unknown", True)
    assert asyncio.run(lookup("x0")) == ("queued", True)
    r.lpush("prioqd:queue:normal", json.dumps({"id": "deep", "task": "t"}))  # the tail
    assert asyncio.run(lookup("nowhere")) == ("unknown", False)
    assert asyncio.run(lookup("deep")) == ("unknown", False)
