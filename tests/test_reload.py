"""SIGHUP (``systemctl reload``) applies [log], [workers] slots and max_jobs_per_worker,
[jobs] and [daemon] to a running daemon, as README "Reload" promises."""

from __future__ import annotations

import itertools
import json
import re
import signal
from pathlib import Path
from typing import Any

import psutil
import redis
from helpers import (
    Config,
    Daemon,
    DaemonProcess,
    daemon_record,
    job_hash,
    prioqd,
    push,
    wait_for,
    wait_status,
)


def reload(
    d: DaemonProcess, cfg: Path, wait: bool = True, **changes: dict[str, Any]
) -> dict[str, Any]:
    """Rewrite the config's tables with ``changes``, SIGHUP, return the "config
    reloaded" line that follows (if ``wait`` and it is a JSON line)."""
    text = cfg.read_text()
    for table, values in changes.items():
        for key, value in values.items():
            pattern = rf"(?m)^(\[{table}\][^\[]*?^){key} = .*$"
            text, n = re.subn(pattern, rf"\g<1>{key} = {json.dumps(value)}", text, count=1)
            if n == 0:
                text = text.replace(f"[{table}]\n", f"[{table}]\n{key} = {json.dumps(value)}\n")
                assert f"{key} = " in text, f"no [{table}] in {cfg}"
    cfg.write_text(text)
    before = len(d.events("config reloaded"))
    d.signal(signal.SIGHUP)
    if not wait:
        return {}
    return d.wait_count("config reloaded", before + 1)[before]


def test_sighup_shrinks_slots_while_jobs_run(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 3})
    d = daemon(cfg)
    running = ["r1", "r2", "r3"]
    push(r, "normal", *({"id": j, "task": "nap", "args": [1500]} for j in running))
    wait_status(r, running, ("running",))
    event = reload(d, cfg, workers={"slots": 1})
    assert "workers.slots" in event["applied"] and event["needs_restart"] == []
    later = [f"n{i}" for i in range(4)]
    push(r, "normal", *({"id": j, "task": "nap", "args": [150]} for j in later))
    hashes = wait_status(r, running + later)
    # The running jobs were left to finish, not killed...
    for j in running:
        assert hashes[j]["status"] == "succeeded" and hashes[j]["attempts"] == "1"
    assert not d.events("worker process died")
    # ...and nothing new started until one slot's worth was free: one at a time.
    last_running_end = max(float(hashes[j]["finished_at"]) for j in running)
    spans = sorted((float(hashes[j]["started_at"]), float(hashes[j]["finished_at"])) for j in later)
    assert spans[0][0] >= last_running_end - 0.005
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.005, spans
    assert daemon_record(r, d.daemon_id)["slots"] == "1"
    wait_for(lambda: len(psutil.Process(d.pid).children()) == 1, 10, what="one worker left")


def test_sighup_applies_jobs_settings(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(jobs={"timeout_s": 300, "max_retries": 3, "result_ttl_s": 86400})
    d = daemon(cfg)
    event = reload(d, cfg, jobs={"timeout_s": 0.5, "max_retries": 0, "result_ttl_s": 30})
    assert set(event["applied"]) == {"jobs.timeout_s", "jobs.max_retries", "jobs.result_ttl_s"}
    push(r, "normal", {"id": "spin", "task": "spin"})
    h = wait_status(r, ["spin"], timeout_s=20)["spin"]
    assert h["status"] == "dead" and h["attempts"] == "1"  # no retries any more
    assert h["error"] == "timed out after 0.5s"  # the new default timeout
    assert 0 < r.ttl("prioqd:job:spin") <= 30  # type: ignore[operator]


def test_sighup_applies_daemon_settings(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(workers={"slots": 1}, daemon={"lease_s": 3, "shutdown_grace_s": 60})
    d = daemon(cfg)

    def lease_left_s() -> float:
        out = prioqd("status", "--config", str(cfg), "--json")
        (info,) = json.loads(out.stdout)["daemons"]
        return float(info["lease_left_s"])

    assert lease_left_s() <= 2.0  # two heartbeat intervals of lease_s / 3
    event = reload(d, cfg, daemon={"lease_s": 60, "shutdown_grace_s": 0.2})
    assert set(event["applied"]) == {"daemon.lease_s", "daemon.shutdown_grace_s"}
    # The next heartbeat (within the old interval) takes the lease of the new lease_s.
    wait_for(lambda: lease_left_s() > 20, 10, 0.2, "a lease of the new length")

    push(r, "high", {"id": "long", "task": "spin", "args": [120]})
    wait_status(r, ["long"], ("running",))
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0  # the old 60 s grace would still be running
    assert d.events("grace over: killed running jobs; they go back to the head of their queues")
    assert job_hash(r, "long")["status"] == "queued"


def test_sighup_applies_max_jobs_per_worker(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config(workers={"slots": 1, "max_jobs_per_worker": 0})
    d = daemon(cfg)
    event = reload(d, cfg, workers={"max_jobs_per_worker": 2})
    assert event["applied"] == ["workers.max_jobs_per_worker"]
    ids = [f"p{i}" for i in range(5)]
    for job_id in ids:  # one at a time, so none share a batch
        push(r, "normal", {"id": job_id, "task": "pid"})
        wait_status(r, [job_id])
    pids = [int(job_hash(r, j)["result"]) for j in ids]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids


def test_sighup_applies_log_format(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(log={"format": "json", "level": "info"})
    d = daemon(cfg)
    reload(d, cfg, wait=False, log={"format": "console"})

    def reloaded() -> bool:
        return "config reloaded" in re.sub(r"\x1b\[[0-9;]*m", "", d.log_path.read_text())

    wait_for(reloaded, 10, what="'config reloaded' in the console format")
    push(r, "normal", {"id": "after", "task": "square", "args": [3]})
    wait_status(r, ["after"])

    def console_line() -> str | None:
        for line in d.log_path.read_text().splitlines():
            plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if "job finished" in plain and "job_id=after" in plain:
                return plain
        return None

    line = wait_for(console_line, 10, what="a console-format 'job finished' line")
    assert not line.startswith("{")
    assert not [e for e in d.events("job finished") if e.get("job_id") == "after"]  # no JSON
