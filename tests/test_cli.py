"""The prioqd command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import redis
from helpers import (
    PRIOQD,
    Config,
    Daemon,
    dead_letters,
    env_with_taskmods,
    push,
    wait_status,
)


def prioqd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PRIOQD, *args], capture_output=True, text=True, timeout=timeout, env=env_with_taskmods()
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
    assert info["pid"] == str(d.pid) and info["alive"] and info["slots"] == "1"
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
