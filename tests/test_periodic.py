"""Periodic jobs ([[schedule]]): each tick enqueued exactly once across daemons, catch-up
after an outage, config errors, `prioqd schedule list`, reloads."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from helpers import Config, Daemon, prioqd, wait_for, wait_status, write_config

from prioqd import config as configuration
from prioqd import periodic
from prioqd.errors import ConfigError


def with_schedule(path: Path, *entries: str) -> Path:
    path.write_text(path.read_text() + "\n" + "\n".join(entries))
    return path


def every(name: str, seconds: float, runs: Path, **extra: str) -> str:
    lines = [
        "[[schedule]]",
        f'name = "{name}"',
        f"every_s = {seconds}",
        'task = "logrun"',
        f'args = ["{runs}", "{name}"]',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_each_tick_is_enqueued_exactly_once_by_daemons_started_and_stopped_at_random(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    entry = "\n".join(
        ["[[schedule]]", 'name = "tick"', "every_s = 0.5", 'task = "logjob"', f'args = ["{runs}"]']
    )
    cfg = with_schedule(config(), entry)
    rng = random.Random(7)
    fleet = [daemon(cfg) for _ in range(3)]
    started = time.time()
    while time.time() - started < 6:
        time.sleep(rng.uniform(0.3, 0.9))
        victim = rng.randrange(len(fleet))
        fleet[victim].stop()
        fleet[victim].start()
    for d in fleet:
        assert d.stop() == 0
    enqueued = [
        e["job_id"]
        for d in fleet
        for run in range(d.runs)
        for e in d.logs(run)
        if e.get("event") == "periodic job enqueued"
    ]
    assert len(enqueued) >= 8  # about 12 ticks in 6 s, with daemons coming and going
    # Exactly once: each tick was enqueued by one daemon only, and ran at most once
    # (the last ones may still wait in the queue: every daemon is stopped now).
    assert len(enqueued) == len(set(enqueued)), Counter(enqueued).most_common(3)
    ran = Counter(runs.read_text().split())
    assert set(ran) <= set(enqueued) and max(ran.values()) == 1, ran.most_common(3)
    assert len(ran) >= len(enqueued) - 2
def test_catch_up_last_enqueues_the_most_recent_missed_tick_once_and_none_skips_it(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    # Each of these schedules ticks on the hour: a test that straddled one would see a
    # fresh tick as well as the missed one, so it starts clear of the boundary.
    to_next_hour_s = 3600 - time.time() % 3600
    if to_next_hour_s < 30:
        time.sleep(to_next_hour_s + 0.5)
    hour_ago_ms = int((time.time() - 7200) * 1000)
    r.hset("prioqd:periodic", mapping={"hourly-last": hour_ago_ms, "hourly-none": hour_ago_ms})
    cfg = with_schedule(
        config(),
        every("hourly-last", 3600, runs, catch_up='"last"'),
        every("hourly-none", 3600, runs, catch_up='"none"'),
        every("fresh", 3600, runs),  # never ran: a new schedule misses nothing
    )
    d = daemon(cfg)
    enqueued = d.wait_log("periodic job enqueued", schedule="hourly-last")
    try:
        wait_for(lambda: runs.exists() and runs.read_text().split() == ["hourly-last"], 10)
    except AssertionError:
        ran = runs.read_text() if runs.exists() else None
        raise AssertionError(f"runs: {ran!r}\n{d.log_path.read_text()[-4000:]}") from None
    entry = configuration.load(str(cfg)).schedule[0]
    tick = periodic.last_tick(entry, time.time())
    assert enqueued["job_id"] == periodic.job_id(entry, tick)  # the latest missed tick
    # The task ran (its line is in the file) before its outcome reached Redis.
    job_id = enqueued["job_id"]
    assert wait_status(r, [job_id])[job_id]["status"] == "succeeded"
    time.sleep(1.0)
    assert runs.read_text().split() == ["hourly-last"]
    assert int(r.hget("prioqd:periodic", "fresh") or 0) > 0  # recorded, not run


def test_schedule_config_errors_name_the_key_and_exit_2(tmp_path: Path, config: Config) -> None:
    runs = tmp_path / "runs"
    cases = {
        "schedule[0].cron": '[[schedule]]\nname = "x"\ncron = "61 * * * *"\ntask = "nap"\n',
        "schedule[0]": '[[schedule]]\nname = "x"\ncron = "@hourly"\nevery_s = 5\ntask = "nap"\n',
        "schedule[0].timezone": (
            '[[schedule]]\nname = "x"\ncron = "@daily"\ntimezone = "Mars/Olympus"\ntask = "nap"\n'
        ),
        "schedule[1].name": every("a", 5, runs) + every("a", 6, runs),
        "schedule[0].priority": every("p", 5, runs, priority='"urgent"'),
    }
    for key, text in cases.items():
        path = tmp_path / f"{key}.toml"
        write_config(path, "redis://127.0.0.1:1/0")
        with_schedule(path, text)
        with pytest.raises(ConfigError) as info:
            configuration.load(str(path))
        assert info.value.key == key, (key, info.value)
        proc = prioqd("check-config", "--config", str(path))
        assert proc.returncode == 2 and key in proc.stderr, proc.stderr


def test_schedule_list_shows_next_run_and_last_enqueued_and_a_reload_applies_changes(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    cfg = config()
    base = cfg.read_text()
    with_schedule(cfg, every("slow", 3600, runs))
    d = daemon(cfg)
    out = prioqd("schedule", "list", "--json", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["name"] == "slow" and row["when"] == "every 3600 s" and row["task"] == "logrun"
    assert row["next_run"].endswith(":00:00Z")
    # A reload adds an entry that ticks every half second.
    cfg.write_text(base)
    with_schedule(cfg, every("slow", 3600, runs), every("quick", 0.5, runs))
    d.signal(signal.SIGHUP)
    d.wait_log("config reloaded")
    wait_for(lambda: runs.exists() and "quick" in runs.read_text().split(), 10)
    out = prioqd("schedule", "list", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "quick: every 0.5 s -> logrun" in out.stdout and "last enqueued 20" in out.stdout
