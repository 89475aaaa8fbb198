"""Periodic jobs ([[schedule]]): each tick enqueued exactly once across daemons, catch-up
after an outage, config errors, `prioqd schedule list`, reloads."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import random
import signal
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    Config,
    Daemon,
    RedisServer,
    prioqd,
    wait_for,
    wait_status,
    write_config,
)

from prioqd import config as configuration
from prioqd import periodic
from prioqd.broker import Broker
from prioqd.config import ScheduleConfig
from prioqd.daemon.ticks import ON_TIME_S
from prioqd.errors import ConfigError
from prioqd.keys import Keys


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


def tick_of(job_id: str) -> int:
    """``tick@2026-11-29T21:48:10Z`` -> the tick, Unix seconds."""
    when = datetime.datetime.strptime(job_id.split("@", 1)[1], "%Y-%m-%dT%H:%M:%SZ")
    return int(when.replace(tzinfo=datetime.UTC).timestamp())


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 5])
def test_each_tick_is_enqueued_exactly_once_by_daemons_coming_and_going(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path, n: int
) -> None:
    """Every tick is enqueued once, by one daemon, and none is missed while one runs;
    across a window with every daemon down, catch_up = "last" enqueues only the most
    recent tick missed, once. The exact sequence of tick ids is checked."""
    runs = tmp_path / "runs"
    entry = "\n".join(
        ["[[schedule]]", 'name = "tick"', "every_s = 1", 'task = "logjob"', f'args = ["{runs}"]']
    )
    cfg = with_schedule(config(workers={"slots": 1}), entry)
    fleet = [daemon(cfg, wait_ready=False) for _ in range(n)]
    for d in fleet:
        d.wait_log("daemon ready", timeout_s=60)
    rng = random.Random(n)

    def handled() -> int:
        """The last tick enqueued, as Redis records it (Unix seconds)."""
        return int(r.hget("prioqd:periodic", "tick") or 0) // 1000

    def current_tick_done() -> None:
        tick = math.floor(time.time())
        wait_for(lambda: handled() >= tick, 10, what=f"tick {tick} to be enqueued")

    #: Every daemon down: (last tick enqueued before, when the first one was started
    #: again, when all were ready again).
    windows: list[tuple[int, float, float]] = []
    # One daemon at a time restarts: with 5 the others carry on, with 1 none is up.
    for _ in range(3):
        current_tick_done()
        victim = rng.choice(fleet)
        victim.stop()
        before, restarted = handled(), time.time()
        victim.start()
        if n == 1:
            windows.append((before, restarted, time.time()))
        # A tick after the restart, before the next stop: a daemon stopped again before
        # its next tick leaves nothing that tells its window apart.
        wait_for(lambda b=before: handled() > b, 10, what="a tick after the restart")
    # Every daemon down for three ticks.
    current_tick_done()
    for d in fleet:
        d.signal(signal.SIGTERM)
    for d in fleet:
        d.wait()
    before = handled()
    time.sleep(3.0)  # the outage itself
    restarted = time.time()
    for d in fleet:
        d.start(wait_ready=False)
    for d in fleet:
        d.wait_log("daemon ready", timeout_s=60)
    windows.append((before, restarted, time.time()))
    wait_for(lambda: handled() >= windows[-1][2] + 2, 10, what="two more ticks")
    for d in fleet:
        d.stop()

    enqueued = [
        e["job_id"]
        for d in fleet
        for run in range(d.runs)
        for e in d.logs(run)
        if e.get("event") == "periodic job enqueued"
    ]
    assert len(enqueued) == len(set(enqueued)), Counter(enqueued).most_common(3)
    ticks = sorted(tick_of(i) for i in enqueued)
    expected = list(range(ticks[0], ticks[-1] + 1))
    for before, restarted, ready in windows:
        # The first tick after the outage: the latest one as the first daemon came
        # back (a tick that passed while the daemons started counts as missed too).
        caught_up = min(t for t in ticks if t > before)
        assert math.floor(restarted) <= caught_up <= math.ceil(ready), (before, restarted)
        expected = [t for t in expected if not before < t < caught_up]
    assert windows[-1][0] + 2 < min(t for t in ticks if t > windows[-1][0])  # ticks missed
    assert ticks == expected, (ticks, windows)
    # Each ran once (the last may still wait in the queue: every daemon is stopped).
    ran = runs.read_text().split() + [
        json.loads(x)["id"] for x in r.lrange("prioqd:queue:normal", 0, -1)
    ]
    assert sorted(ran) == sorted(enqueued), Counter(ran).most_common(3)


def test_catch_up_last_enqueues_the_most_recent_missed_tick_once_and_none_skips_it(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    # Each of these schedules ticks on the hour: a test that straddled one would see a
    # fresh tick as well as the missed one, and one that starts less than ON_TIME_S
    # after the hour sees that hour's tick as on time, not missed (it ran all three at
    # 04:00:00.8 once). So it starts clear of both.
    clear_s = ON_TIME_S + 2
    since_hour_s = time.time() % 3600
    if since_hour_s > 3600 - 30 or since_hour_s < clear_s:
        time.sleep((clear_s - since_hour_s) % 3600)
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
    # `schedule list` does not call the recorded tick "enqueued".
    out = prioqd("schedule", "list", "--json", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["hourly-last"]["last_enqueued"] == periodic.iso(tick)
    assert rows["fresh"]["last_enqueued"] is None and rows["fresh"]["last_handled"]
    assert rows["hourly-none"]["last_enqueued"] is None
    text = prioqd("schedule", "list", "--config", str(cfg)).stdout
    assert f"last enqueued never (tick {rows['fresh']['last_handled']} recorded" in text


def test_a_tick_due_during_a_redis_outage_is_retried_and_ticking_goes_on_after(
    tmp_path: Path, daemon: Daemon, own_redis: RedisServer
) -> None:
    server = own_redis
    r = server.client()
    runs = tmp_path / "runs"
    cfg = with_schedule(write_config(tmp_path / "c.toml", server.url), every("sec", 1, runs))
    d = daemon(cfg)
    d.wait_log("periodic job enqueued", schedule="sec")
    server.stop()
    failed = d.wait_log("redis unavailable", during="periodic jobs", timeout_s=5)
    assert failed["retry_in_s"] > 0 and failed["failures"] >= 1
    server.start()

    def enqueued_after_the_failure() -> list[dict[str, Any]]:
        lines = d.logs()
        since = lines.index(failed)
        return [e for e in lines[since:] if e.get("event") == "periodic job enqueued"]

    # Retried after its backoff, not left until some other wake-up.
    later = wait_for(enqueued_after_the_failure, 10, what="a tick enqueued after the outage")
    job_id = later[0]["job_id"]
    assert job_id.startswith("sec@") and later[0]["catch_up"] is False
    assert wait_status(r, [job_id], daemon=d)[job_id]["status"] == "succeeded"
    assert d.stop() == 0  # while Redis is up (else its drain waits for it, 5 s)
    r.close()


def test_schedule_config_errors_name_the_key_and_exit_2(tmp_path: Path, config: Config) -> None:
    runs = tmp_path / "runs"
    cases = [
        ("schedule[0].cron", '[[schedule]]\nname = "x"\ncron = "61 * * * *"\ntask = "nap"\n'),
        # Valid, but 30 February never comes: croniter cannot find a next tick.
        ("schedule[0].cron", '[[schedule]]\nname = "x"\ncron = "0 0 30 2 *"\ntask = "nap"\n'),
        ("schedule[0]", '[[schedule]]\nname = "x"\ncron = "@hourly"\nevery_s = 5\ntask = "nap"\n'),
        (
            "schedule[0].timezone",
            '[[schedule]]\nname = "x"\ncron = "@daily"\ntimezone = "Mars/Olympus"\ntask = "nap"\n',
        ),
        ("schedule[1].name", every("a", 5, runs) + every("a", 6, runs)),
        ("schedule[0].priority", every("p", 5, runs, priority='"urgent"')),
        # A period under a second is a busy loop; one of a thousand years overflows.
        ("schedule[0].every_s", every("fast", 1e-9, runs)),
        ("schedule[0].every_s", every("fast", 0.5, runs)),
        ("schedule[0].every_s", every("slow", 1e12, runs)),
    ]
    for n, (key, text) in enumerate(cases):
        path = tmp_path / f"{n}.toml"
        write_config(path, "redis://127.0.0.1:1/0")
        with_schedule(path, text)
        with pytest.raises(ConfigError) as info:
            configuration.load(str(path))
        assert info.value.key == key, (key, info.value)
        proc = prioqd("check-config", "--config", str(path))
        assert proc.returncode == 2 and key in proc.stderr, proc.stderr
    proc = prioqd("check-config", "--config", str(tmp_path / "1.toml"))
    assert "'0 0 30 2 *' never fires" in proc.stderr, proc.stderr
    proc = prioqd("check-config", "--config", str(tmp_path / "6.toml"))
    assert "must be at least 1 (seconds)" in proc.stderr, proc.stderr


def test_a_schedule_that_never_fires_stops_neither_start_nor_reload(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    never = '[[schedule]]\nname = "never"\ncron = "0 0 30 2 *"\ntask = "nap"\nargs = [1]\n'
    cfg = config()
    base = cfg.read_text()
    with_schedule(cfg, every("ok", 1, runs), never)
    bad = daemon(cfg, wait_ready=False)
    assert bad.wait(30) == 2  # a config error: systemd does not restart it
    assert "schedule[1].cron" in bad.stderr()
    cfg.write_text(base)
    with_schedule(cfg, every("ok", 1, runs))
    d = daemon(cfg)
    wait_for(lambda: runs.exists() and "ok" in runs.read_text().split(), 10)
    # A reload to the bad schedule is refused; the daemon carries on with the old one.
    with_schedule(cfg, never)
    d.signal(signal.SIGHUP)
    rejected = d.wait_log("reload rejected; still running the previous configuration")
    assert "schedule[1].cron" in rejected["error"]
    ticks = len(runs.read_text().split())
    wait_for(lambda: len(runs.read_text().split()) >= ticks + 2, 10, what="two more ticks")
    d.assert_alive()


def test_an_entry_whose_ticks_fail_at_run_time_is_skipped_and_the_rest_tick(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """What the config check cannot foresee (here, the check bypassed): the entry is
    logged once and skipped, the daemon's loop and the other entries carry on."""
    good = ScheduleConfig(name="good", every_s=1, task="nap", args=[1], priority="normal")
    broken = dataclasses.replace(good, name="broken", every_s=0, cron="0 0 30 2 *")
    events = asyncio.run(run_ticks(redis_server, [broken, good], until_pushed=1))
    assert [e for e, f in events if e.startswith("schedule entry skipped")] == [
        "schedule entry skipped: its ticks cannot be computed"
    ]
    assert ("periodic job enqueued", "good") in [(e, f.get("schedule")) for e, f in events]
    (raw,) = r.lrange("prioqd:queue:normal", 0, -1)
    assert json.loads(raw)["id"].startswith("good@")


def test_a_tick_later_than_redis_clock_is_refused(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """A daemon whose clock jumped an hour ahead offers a tick an hour early: Redis
    refuses it, so the other daemons do not skip an hour of real ticks."""
    entry = ScheduleConfig(name="e", every_s=1, task="nap", args=[1], priority="normal")
    events = asyncio.run(run_ticks(redis_server, [entry], ahead_s=3600, until_logged=1))
    assert [e for e, _ in events] == [
        "periodic tick not enqueued: it is later than Redis's clock (this host's clock jumped?)"
    ]
    assert not r.exists("prioqd:periodic") and not r.llen("prioqd:queue:normal")
    # The script itself: a tick an hour ahead is refused, one of now enqueued.
    script = r.register_script(resources.files("prioqd").joinpath("lua/prioqd.lua").read_text())
    future_ms = int((time.time() + 3600) * 1000)
    assert script(args=["prioqd", "periodic", "e", future_ms, "normal", "{}", 0]) == -1
    now_ms = int(time.time() * 1000)  # (this redis-server runs on this host's clock)
    assert script(args=["prioqd", "periodic", "e", now_ms, "normal", "{}", 0]) == 1
    assert int(r.hget("prioqd:periodic", "e")) == now_ms  # type: ignore[arg-type]


class Recorder:
    """A structlog-like logger that keeps (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _log(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = _log


async def run_ticks(
    server: RedisServer,
    entries: list[ScheduleConfig],
    *,
    ahead_s: float = 0.0,
    until_pushed: int = 0,
    until_logged: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """Run the daemon's Ticks loop on ``entries`` (its clock ``ahead_s`` ahead of
    Redis's) until that many jobs are pushed or events logged; the events."""
    from prioqd.daemon.ticks import Ticks

    cfg = configuration.Config(schedule=tuple(entries))
    broker = Broker(server.url, Keys("prioqd"))
    log = Recorder()

    def down(what: str, exc: Exception, backoff: Any) -> float:
        raise AssertionError(f"{what}: {exc}")

    ticks = Ticks(
        broker, cfg, redis_time=lambda: time.time() + ahead_s, log=log, on_redis_down=down
    )
    task = asyncio.ensure_future(ticks.run())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not task.done():
            pushed = await broker.redis.llen("prioqd:queue:normal")
            if (until_pushed and pushed >= until_pushed) or (
                until_logged and len(log.events) >= until_logged
            ):
                break
            await asyncio.sleep(0.02)
        assert not task.done(), task.exception()
    finally:
        ticks.close()
        await asyncio.wait_for(task, 5)
        await broker.close()
    return log.events


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
    # A reload adds an entry that ticks every second.
    cfg.write_text(base)
    with_schedule(cfg, every("slow", 3600, runs), every("quick", 1, runs))
    d.signal(signal.SIGHUP)
    d.wait_log("config reloaded")
    wait_for(lambda: runs.exists() and "quick" in runs.read_text().split(), 10)
    out = prioqd("schedule", "list", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "quick: every 1 s -> logrun" in out.stdout and "last enqueued 20" in out.stdout


def test_cron_ticks_across_daylight_saving_transitions() -> None:
    """What croniter does, and so prioqd: a local time that comes twice (the clocks go
    back) fires twice, an hour apart; one that never comes (they go forward) fires
    once, as the gap ends. Ticks are instants, named in UTC, so the ids differ."""

    def utc(*when: int) -> float:
        return datetime.datetime(*when, tzinfo=datetime.UTC).timestamp()

    def ticks(entry: ScheduleConfig, after: float, n: int) -> list[str]:
        out = []
        for _ in range(n):
            after = periodic.next_tick(entry, after)
            out.append(periodic.iso(after))
        return out

    back = ScheduleConfig(
        name="d", cron="30 1 * * *", timezone="America/New_York", task="nap", priority="normal"
    )
    # 2025-11-02: 01:30 EDT (05:30Z), then 01:30 EST (06:30Z).
    assert ticks(back, utc(2025, 11, 1, 12), 3) == [
        "2025-11-02T05:30:00Z", "2025-11-02T06:30:00Z", "2025-11-03T06:30:00Z"
    ]  # fmt: skip
    # The tick a daemon offers between them is the first; after the second, that one.
    def last(entry: ScheduleConfig, *when: int) -> str:
        return periodic.iso(periodic.last_tick(entry, utc(*when)))

    assert last(back, 2025, 11, 2, 6, 0) == "2025-11-02T05:30:00Z"
    assert last(back, 2025, 11, 2, 6, 45) == "2025-11-02T06:30:00Z"
    # 2025-03-09: 02:30 does not exist; it fires at 03:00 EDT (07:00Z), then as usual.
    forward = dataclasses.replace(back, cron="30 2 * * *")
    assert ticks(forward, utc(2025, 3, 8, 12), 2) == [
        "2025-03-09T07:00:00Z", "2025-03-10T06:30:00Z"
    ]  # fmt: skip
    assert last(forward, 2025, 3, 9, 7, 30) == "2025-03-09T07:00:00Z"
