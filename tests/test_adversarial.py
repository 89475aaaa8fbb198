"""Regressions of issue 9 (adversarial hardening): no payload, key, stall or
operator slip may stop the fleet, run a job twice or lose it.

Every test runs real ``prioqd run`` daemons against real redis-server processes on
free loopback ports; tests that break their Redis (ACLs, maxmemory, CLIENT PAUSE,
proto-max-bulk-len, a password) start one of their own. The task modules the tests
need beyond ``tests/taskmods`` are written to ``tmp_path`` (``ADV_TASKS``), and the
in-flight layout is read only through ``helpers`` (``helpers.in_flight_count``).
The section headers name the item of issue 9 each test guards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import psutil
import pytest
import redis
from helpers import (
    ROOT,
    TASKMODS,
    Daemon,
    DaemonProcess,
    RedisServer,
    dead_letters,
    job_hash,
    prioqd,
    push,
    skip_or_fail,
    wait_for,
    write_config,
)

#: Tasks for these tests only, importable as ``advtasks`` (see ``mods``).
ADV_TASKS = '''
import json
import os
import signal
import subprocess
import sys
import time

from prioqd import task


def _log(path, tag):
    # One O_APPEND write per run, so runs can be counted.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag}\\n".encode())
    finally:
        os.close(fd)


@task
def kill_daemon(path, tag, ms=0.0):
    """SIGKILLs the daemon that runs it (a payload that crashes its daemon)."""
    _log(path, tag)
    time.sleep(ms / 1000)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


@task
def quick(path, tag, die=False):
    _log(path, tag)
    if die:
        os._exit(13)
    return tag


@task
def gated(path, tag, gate):
    """Logs its run, then waits while the file ``gate`` exists."""
    _log(path, tag)
    deadline = time.monotonic() + 60
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return tag


@task
def big_result(n):
    return "x" * n


@task
def loud(n):
    """Raises with a message of n characters (not ASCII: the cap counts bytes)."""
    raise ValueError("\u00e9" * n)


@task
def secrets():
    names = ["PRIOQD_REDIS_PASSWORD", "CREDENTIALS_DIRECTORY"]
    code = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
    child = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, check=True
    )
    return {"worker": {k: os.environ.get(k) for k in names}, "child": json.loads(child.stdout)}
'''

MODULES = ["prioqd.examples", "testtasks", "advtasks"]
FAST_RETRY = {"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2}

#: A read-only script that keeps Redis busy for ARGV[1] microseconds: a stall of the
#: whole server (DEBUG SLEEP is disabled in Redis 7's default configuration).
STALL_SCRIPT = """
local t0 = redis.call('TIME')
local start = t0[1] * 1000000 + t0[2]
while true do
    local t = redis.call('TIME')
    if t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) then return 1 end
end
"""


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def mods(tmp_path: Path) -> Path:
    d = tmp_path / "mods"
    d.mkdir()
    (d / "advtasks.py").write_text(ADV_TASKS)
    return d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that break their Redis."""
    s = RedisServer(tmp_path / "redis-own")
    s.start()
    yield s
    s.stop()


def env_for(mods: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(mods), str(TASKMODS), str(ROOT)])
    return {"PYTHONPATH": path, **extra}


def make_config(path: Path, url: str, **sections: dict[str, Any]) -> Path:
    sections.setdefault("tasks", {"modules": MODULES})
    return write_config(path, url, **sections)




def wait_ended(
    r: redis.Redis,
    ids: list[str],
    d: DaemonProcess,
    timeout_s: float = 20.0,
    statuses: tuple[str, ...] = ("succeeded", "dead"),
) -> dict[str, dict[str, str]]:
    """:func:`helpers.wait_status` with a shorter default, failing at once if ``d`` exits."""
    return helpers.wait_status(r, ids, statuses, timeout_s, daemon=d)




def run_counts(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def criticals(d: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in d.all_logs() if e.get("level") == "critical"]


def events_like(d: DaemonProcess, text: str) -> list[dict[str, Any]]:
    return [e for e in d.logs() if text in str(e.get("event", ""))]


def letters_by_reason(r: redis.Redis, text: str) -> list[dict[str, Any]]:
    return [e for e in dead_letters(r) if text in str(e.get("reason", ""))]


class EventCounter:
    """Counts the outcomes published on ``prioqd:events`` (one per attempt)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._pubsub.subscribe("prioqd:events")
        confirmed = self._pubsub.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        self.outcomes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg is not None and msg["type"] == "message":
                self.outcomes.append(json.loads(msg["data"]))

    def succeeded(self) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if o.get("status") == "succeeded"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()


class NotifyRecorder:
    """systemd's end of NOTIFY_SOCKET: every datagram, raw."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.datagrams.append(self.sock.recv(65536))

    def statuses(self) -> list[str]:
        out = []
        for data in list(self.datagrams):
            for line in data.decode(errors="replace").split("\n"):
                if line.startswith("STATUS="):
                    out.append(line[len("STATUS=") :])
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyRecorder]:
    n = NotifyRecorder(tmp_path / "notify.sock")
    yield n
    n.close()


def stall_redis(client: redis.Redis, seconds: float) -> None:
    client.eval(STALL_SCRIPT, 0, int(seconds * 1_000_000))


def wait_idle(client: redis.Redis) -> None:
    """Until a daemon waits in a blocking BLMOVE: every queue it serves was empty, and
    the next payload pushed takes the idle path."""

    def blocked() -> bool:
        return any(
            c.get("name") == "prioqd" and c.get("cmd") == "blmove" for c in client.client_list()
        )

    wait_for(blocked, 10, what="a daemon waiting in BLMOVE")


def prioqd_connections(admin: redis.Redis) -> list[int]:
    return [int(c["id"]) for c in admin.client_list() if c.get("name") == "prioqd"]


# --- 1. poison payloads ---------------------------------------------------------------


def test_poison_fields_are_dead_letters_and_the_daemon_keeps_serving(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env_for(mods))
    digits = "9" * 400
    nested = "[" * 940 + "]" * 940
    poison = {
        "delay_huge": ('"delay_s": 1e306', "'delay_s'"),
        "delay_digits": (f'"delay_s": {digits}', "'delay_s'"),
        "timeout_digits": (f'"timeout_s": {digits}', "'timeout_s'"),
        "eta_digits": (f'"eta": {digits}', "'eta'"),
        "nested": (f'"args": {nested}', "nest deeper than 100 levels"),
        # Of the same classes:
        "eta_huge": ('"eta": 1e306', "'eta'"),
        "nested_kwargs": (f'"kwargs": {{"k": {nested}}}', "nest deeper than 100 levels"),
        # orjson reads it (json would not, from about 990 deep): limited as args are.
        "nested_meta": (f'"meta": {{"k": {nested}}}', "'meta' nests deeper than 100 levels"),
    }
    raw = {
        job_id: f'{{"id": "{job_id}", "task": "echo", {field}}}'
        for job_id, (field, _) in poison.items()
    }
    # Too many digits for Python's int parser: not JSON to prioqd, so no id is known.
    unreadable = '{"id": "digits5000", "task": "echo", "args": [' + "7" * 5000 + "]}"
    push(r, "normal", *raw.values(), unreadable)
    # An eta far in the past is simply due: it runs now.
    push(r, "normal", '{"id": "eta_past", "task": "square", "args": [3], "eta": -1e306}')
    push(r, "normal", {"id": "after", "task": "square", "args": [4]})
    hashes = wait_ended(r, [*poison, "eta_past", "after"], d)
    assert hashes["eta_past"]["status"] == "succeeded" and hashes["eta_past"]["result"] == "9"
    assert hashes["after"]["status"] == "succeeded" and hashes["after"]["result"] == "16"
    wait_for(lambda: r.llen("prioqd:dead") == len(poison) + 1, 10, what="every dead letter")
    letters = {e.get("id"): e for e in dead_letters(r)}
    for job_id, (_, reason) in poison.items():
        assert hashes[job_id]["status"] == "dead", job_id
        assert reason in hashes[job_id]["error"], (job_id, hashes[job_id]["error"])
        assert reason in letters[job_id]["reason"]
        assert letters[job_id]["payload"] == raw[job_id]  # kept whole, for a requeue
        done = json.loads(r.lindex(f"prioqd:done:{job_id}", 0))  # type: ignore[arg-type]
        assert done["status"] == "dead"
    assert "not valid JSON" in letters[None]["reason"]
    assert letters[None]["payload"] == unreadable
    d.assert_alive()
    assert not criticals(d)


def test_numbers_json_cannot_carry_are_dead_letters_not_changed_arguments(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # Python's json reads NaN, Infinity and 1e400 (as nan and inf), but the stored
    # form of a job (an id-less or delayed one, a rerun) would carry null instead:
    # the job must be refused with the reason, not run with other arguments later.
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env_for(mods))
    bad = {
        "nan_args": '"args": [NaN]',
        "inf_kwargs": '"kwargs": {"x": Infinity}',
        "huge_meta": '"meta": {"x": 1e400}, "delay_s": 0.1',
    }
    for job_id, field in bad.items():
        push(r, "normal", f'{{"id": "{job_id}", "task": "echo", {field}}}')
    push(r, "normal", '{"task": "echo", "args": [-Infinity]}')  # no id: one would be pinned
    push(r, "normal", {"id": "fine", "task": "echo", "args": [1e300], "delay_s": 0.1})
    hashes = wait_ended(r, [*bad, "fine"], d)
    for job_id in bad:
        assert hashes[job_id]["status"] == "dead", job_id
        assert "not finite" in hashes[job_id]["error"], hashes[job_id]
    assert json.loads(hashes["fine"]["result"]) == {"args": [1e300], "kwargs": {}}
    wait_for(lambda: r.llen("prioqd:dead") == len(bad) + 1, 10, what="every dead letter")
    reasons = [e["reason"] for e in dead_letters(r)]
    assert all(x.startswith("payload has a number that is not finite") for x in reasons)
    assert any("(-Infinity)" in x for x in reasons) and any("(1e400)" in x for x in reasons)
    d.assert_alive()


def test_a_failed_idle_barrier_hears_every_wait_out_and_keeps_the_order(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # The round trip that settles an idle race (a low and a high payload landing in
    # one turn, one slot) fails: here an ACL denies PING once the daemon runs. The
    # daemon then calls off and hears out every wait, keeps the order and stays up.
    # (An error reply is a round trip too, so the order would hold here even without
    # hearing out: this checks the failure path runs and harms nothing.)
    r = server.client()
    cfg = make_config(tmp_path / "c.toml", server.url, workers={"slots": 1})
    d = daemon(cfg, env=env_for(mods))
    r.execute_command("ACL", "SETUSER", "default", "-ping")
    # A low job alone, once the daemon waits on all three queues: the waits above it
    # are blocked, so the barrier runs, and fails.
    wait_for(lambda: helpers.waits_blocked(r) == 3, 10)
    push(r, "low", {"id": "alone", "task": "nap", "args": [1]})
    wait_ended(r, ["alone"], d)
    # (Log lines are written in batches: wait for it rather than read at once.)
    wait_for(
        lambda: events_like(d, "barrier failed"),
        10,
        what="the barrier failing (else the test proves nothing)",
    )
    # High first: Redis writes the replies of one turn newest first, so the low one's
    # tends to be read first, which is the case that needs the barrier.
    helpers.high_and_low_together(r, 6, high_first=True, daemon=d)
    d.assert_alive()


@pytest.mark.slow
def test_an_internal_failure_exits_1_and_logs_at_critical(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # Redis refuses every script once the daemon is running (an ACL change): it can
    # neither record a finished job nor dead-letter it, so it cannot go on. It must
    # exit non-zero (systemd restarts it; the lease brings its jobs back), not hang
    # and not exit 0.
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "admin", "on", ">adminpw", "~*", "&*", "+@all")
    r = server.client(username="admin", password="adminpw")
    cfg = make_config(
        tmp_path / "c.toml",
        server.url,
        workers={"slots": 1},
        daemon={"lease_s": 3, "shutdown_grace_s": 1},
    )
    d = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "held", "task": "nap", "args": [800]})
    wait_ended(r, ["held"], d, statuses=("running",))
    r.execute_command("ACL", "SETUSER", "default", "-@scripting")
    code = d.wait(40)
    assert code == 1, f"exit code {code}"
    crit = criticals(d)
    assert crit, "nothing logged at critical"
    # The job is still recorded as held by the dead daemon, so the lease brings it back.
    assert job_hash(r, "held")["status"] == "running"
    r.close()
    admin.close()


@pytest.mark.slow
def test_a_payload_that_keeps_killing_its_daemon_becomes_a_dead_letter(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    # The default max_recoveries (3): the fourth death sends it to the dead letters.
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 30}
    )
    payload = json.dumps(
        {"id": "killer", "task": "kill_daemon", "args": [str(runs), "killer", 100]}
    )
    push(r, "normal", payload)
    d = daemon(cfg, env=env_for(mods))
    deaths = 0
    while not r.llen("prioqd:dead") and deaths < 6:
        # The task SIGKILLs the daemon; systemd (here: this loop) starts another, which
        # recovers its dead predecessor on this host at once.
        assert d.wait(30) == -signal.SIGKILL
        deaths += 1
        d.start()
    assert deaths == 4, f"{deaths} daemon deaths, dead letters: {dead_letters(r)}"
    assert run_counts(runs)["killer"] == 4
    (letter,) = dead_letters(r)
    assert letter["reason"] == "poison: its daemon died 4 times while holding it"
    assert letter["id"] == "killer"
    assert r.get(letter["payload_key"]) == payload.encode()
    assert job_hash(r, "killer")["status"] == "dead"
    assert json.loads(r.lindex("prioqd:done:killer", 0))["status"] == "dead"  # type: ignore[arg-type]
    assert r.llen("prioqd:queue:normal") == 0
    # The fifth daemon lives, and serves.
    push(r, "normal", {"id": "after", "task": "square", "args": [6]})
    assert wait_ended(r, ["after"], d)["after"]["result"] == "36"
    assert d.stop() == 0
    out = prioqd("dead", "requeue", "killer", "--config", str(cfg), env=env_for(mods))
    assert out.returncode == 0, out.stderr
    assert r.lrange("prioqd:queue:normal", 0, -1) == [payload.encode()]
    assert not r.exists(letter["payload_key"]) and not r.llen("prioqd:dead")


@pytest.mark.slow
def test_a_payload_that_kills_its_idle_daemon_at_once_becomes_a_dead_letter(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # In idle mode a landed job runs before its adopt is written: a task that kills
    # the daemon at once dies with its payload still in the landing list. That death
    # counts too, so the default max_recoveries (3) still stops it at the fourth.
    runs = tmp_path / "runs"
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 30}
    )
    d = daemon(cfg, env=env_for(mods))
    wait_idle(r)
    payload = json.dumps({"id": "killer", "task": "kill_daemon", "args": [str(runs), "killer"]})
    push(r, "normal", payload)
    deaths = 0
    while not r.llen("prioqd:dead") and deaths < 6:
        assert d.wait(30) == -signal.SIGKILL
        deaths += 1
        d.start()
    assert deaths == 4, f"{deaths} daemon deaths, dead letters: {dead_letters(r)}"
    assert run_counts(runs)["killer"] == 4
    (letter,) = dead_letters(r)
    assert letter["reason"] == "poison: its daemon died 4 times while holding it"
    assert r.get(letter["payload_key"]) == payload.encode()
    assert not r.llen("prioqd:queue:normal") and helpers.in_flight_count(r) == 0
    # It never started (its adopt was never written), yet its waiter hears of it.
    assert job_hash(r, "killer")["status"] == "dead"
    assert json.loads(r.lindex("prioqd:done:killer", 0))["status"] == "dead"  # type: ignore[arg-type]
    d.assert_alive()


# --- 2. identical payloads, repeated ops ------------------------------------------------


def push_twins(r: redis.Redis, runs: Path, n: int) -> tuple[bytes, bytes]:
    """``n`` byte-identical payloads with one id and ``n`` without, interleaved, in
    one LPUSH."""
    same = json.dumps({"id": "twin", "task": "logrun", "args": [str(runs), "twin", 2]})
    anon = json.dumps({"task": "logrun", "args": [str(runs), "anon", 2]})
    r.lpush("prioqd:queue:normal", *[p for _ in range(n) for p in (same, anon)])
    return same.encode(), anon.encode()


def assert_twins_all_ended(
    r: redis.Redis, events: EventCounter, runs: Path, n: int, d: DaemonProcess
) -> None:
    def all_published() -> bool:
        d.assert_alive()
        return len(events.succeeded()) >= 2 * n

    wait_for(all_published, 90, 0.1, f"{2 * n} outcomes on prioqd:events")
    # A sentinel pushed now is claimed after every twin ended: anything published
    # twice (a repeated op) comes before its outcome.
    push(r, "normal", {"id": "sentinel", "task": "square", "args": [2]})

    def sentinel_published() -> bool:
        d.assert_alive()
        return any(o["id"] == "sentinel" for o in events.succeeded())

    wait_for(sentinel_published, 90, 0.1, "the sentinel's outcome on prioqd:events")
    outcomes = [o for o in events.succeeded() if o["id"] != "sentinel"]
    by_id = Counter(o["id"] for o in outcomes)
    assert by_id["twin"] == n, by_id["twin"]
    anon = {j: c for j, c in by_id.items() if j != "twin"}
    assert len(anon) == n and set(anon.values()) == {1}
    assert run_counts(runs) == Counter({"twin": n, "anon": n})
    for job_id in ["twin", *anon]:
        assert job_hash(r, job_id)["status"] == "succeeded", job_id
        (done,) = r.lrange(f"prioqd:done:{job_id}", 0, -1)
        assert json.loads(done)["status"] == "succeeded"
    assert r.llen("prioqd:queue:normal") == 0 and not r.llen("prioqd:dead")
    assert helpers.in_flight_count(r) == 0


def twins_all_end_despite(
    r: redis.Redis,
    runs: Path,
    n: int,
    d: DaemonProcess,
    disrupt: Callable[[], None],
    gap_s: tuple[float, float],
    seed: int,
) -> None:
    """:func:`push_twins`, ``disrupt()`` at random gaps (seeded) until every twin
    has ended, then :func:`assert_twins_all_ended`."""
    events = EventCounter(r)
    stop = threading.Event()

    def disrupter() -> None:
        rng = random.Random(seed)
        while not stop.wait(rng.uniform(*gap_s)):
            disrupt()

    t = threading.Thread(target=disrupter)
    try:
        push_twins(r, runs, n)
        t.start()
        assert_twins_all_ended(r, events, runs, n, d)
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        events.close()


@pytest.mark.slow
def test_identical_payloads_all_end_when_replies_are_lost_and_ops_repeated(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # Stalls longer than the daemon's socket timeout: the script it sent runs after
    # the stall, but its reply is lost (the daemon gave up on the connection), so the
    # daemon sends the same ops again. With identical payloads held side by side, a
    # repeated op must not touch the twin's claim.
    r = server.client()
    admin = server.client()
    runs = tmp_path / "runs"
    cfg = make_config(
        tmp_path / "c.toml",
        server.url,
        redis={"socket_timeout_s": 0.2},
        workers={"slots": 2},
        daemon={"lease_s": 30},
    )
    d = daemon(cfg, env=env_for(mods))
    stalls: list[float] = []

    def stall() -> None:
        stall_redis(admin, 0.45)
        stalls.append(time.monotonic())

    twins_all_end_despite(r, runs, 200, d, stall, (0.05, 0.2), seed=5)
    # Replies were lost (the daemon timed out on cycles that Redis then ran).
    assert len(stalls) >= 2
    assert len([e for e in d.events("redis unavailable") if e.get("during") == "cycle"]) >= 2
    r.close()
    admin.close()


@pytest.mark.slow
def test_identical_payloads_survive_client_kill_of_the_daemons_connections(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r = server.client()
    admin = server.client()
    runs = tmp_path / "runs"
    cfg = make_config(tmp_path / "c.toml", server.url, daemon={"lease_s": 30})
    d = daemon(cfg, env=env_for(mods))
    killed: list[int] = []

    def kill() -> None:
        for cid in prioqd_connections(admin):
            with contextlib.suppress(redis.ResponseError):
                killed.append(int(admin.execute_command("CLIENT", "KILL", "ID", cid)))

    twins_all_end_despite(r, runs, 400, d, kill, (0.01, 0.05), seed=11)
    assert sum(killed) >= 20
    r.close()
    admin.close()


# --- 3. a key of the wrong type; Redis out of memory ------------------------------------


def test_wrongtype_keys_fail_one_job_each_and_the_daemon_goes_on(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r.lpush("prioqd:job:v", "x")  # finish (claim -> succeeded in one step) cannot write
    r.lpush("prioqd:job:vs", "x")  # start (a job still running at 20 ms) cannot write
    r.set("prioqd:done:w", "x")  # the done list cannot be written
    r.set("prioqd:queue:low", "x")  # a queue that is not a list
    cfg = make_config(tmp_path / "c.toml", redis_server.url, daemon={"lease_s": 3})
    d = daemon(cfg, env=env_for(mods))
    me = d.daemon_id
    push(
        r,
        "normal",
        {"id": "before", "task": "square", "args": [2]},
        {"id": "v", "task": "square", "args": [3]},
        {"id": "vs", "task": "nap", "args": [200]},
        {"id": "w", "task": "square", "args": [4]},
        {"id": "after", "task": "square", "args": [5]},
    )
    hashes = wait_ended(r, ["before", "after"], d)
    assert hashes["before"]["result"] == "4" and hashes["after"]["result"] == "25"

    def three_letters() -> list[dict[str, Any]] | None:
        d.assert_alive()
        letters = letters_by_reason(r, "redis error: WRONGTYPE")
        return letters if len(letters) == 3 else None

    letters = wait_for(three_letters, 20, what="3 WRONGTYPE dead letters")
    by_key = {}
    for letter in letters:
        payload = json.loads(letter.get("payload") or r.get(letter["payload_key"]))
        by_key[payload["id"]] = letter["reason"]
    assert set(by_key) == {"v", "vs", "w"}
    assert "prioqd:job:v holds a list" in by_key["v"]
    assert "prioqd:job:vs holds a list" in by_key["vs"]
    assert "prioqd:done:w" in by_key["w"]
    assert r.lrange("prioqd:job:v", 0, -1) == [b"x"] and r.get("prioqd:done:w") == b"x"
    # Still claiming (a job pushed now runs) and heartbeating (its lease moves on).
    lease = r.zscore("prioqd:daemons", me)
    assert lease is not None
    push(r, "high", {"id": "later", "task": "square", "args": [7]})
    assert wait_ended(r, ["later"], d)["later"]["result"] == "49"
    wait_for(lambda: (r.zscore("prioqd:daemons", me) or 0) > lease, 5, what="a heartbeat")
    # The queue of the wrong type costs a backed-off retry now and then, not a spin.
    before = len(d.events("redis unavailable"))
    time.sleep(3)
    assert len(d.events("redis unavailable")) - before <= 10
    d.assert_alive()
    assert not criticals(d)


def test_a_wrongtype_schedule_key_stops_no_daemon(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # Every heartbeat reads the schedule's first due time: with prioqd:scheduled of
    # another type no daemon could register (start) any more. Delayed jobs cannot be
    # scheduled: they, alone, go to the dead letters with the reason.
    r.set("prioqd:scheduled", "x")
    cfg = make_config(tmp_path / "c.toml", redis_server.url, daemon={"lease_s": 3})
    d = daemon(cfg, env=env_for(mods))
    push(
        r,
        "normal",
        {"id": "now", "task": "square", "args": [3]},
        {"id": "later", "task": "square", "args": [4], "delay_s": 1},
    )
    hashes = wait_ended(r, ["now"], d)
    assert hashes["now"]["result"] == "9"
    letter = wait_for(lambda: letters_by_reason(r, "prioqd:scheduled"), 10)[0]
    assert letter["reason"].startswith("redis error: WRONGTYPE")
    assert json.loads(letter.get("payload") or r.get(letter["payload_key"]))["id"] == "later"
    before = len(d.events("redis unavailable"))
    time.sleep(2)  # two heartbeats
    assert len(d.events("redis unavailable")) == before
    assert r.get("prioqd:scheduled") == b"x"
    d.assert_alive()


def test_a_wrongtype_recovered_key_loses_no_job(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # prioqd:history (recovery counts of put-back payloads) of another type must
    # not make a claim fail after it popped a payload, nor a recovery fail midway.
    r.set("prioqd:history", "x")
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    gate.touch()
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 30}
    )
    ids = [f"k{i}" for i in range(3)]
    push(r, "normal", *({"id": j, "task": "square", "args": [i]} for i, j in enumerate(ids)))
    push(r, "normal", {"id": "held", "task": "gated", "args": [str(runs), "held", str(gate)]})
    d = daemon(cfg, env=env_for(mods))
    hashes = wait_ended(r, ids, d)
    assert [hashes[j]["result"] for j in ids] == ["0", "1", "4"]
    wait_ended(r, ["held"], d, statuses=("running",))
    d.kill()
    d.start()  # recovers its predecessor: "held" goes back with a recovery count
    wait_for(lambda: run_counts(runs)["held"] == 2, 10, what="the recovered job to rerun")
    gate.unlink()
    h = wait_ended(r, ["held"], d)["held"]
    assert h["status"] == "succeeded" and h["attempts"] == "2"
    assert r.get("prioqd:history") == b"x"
    assert not r.llen("prioqd:queue:normal") and not r.llen("prioqd:dead")
    d.assert_alive()


def test_a_paused_key_of_the_wrong_type_stops_no_daemon_and_is_reported_once(
    r: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    mods: Path,
    daemon: Daemon,
    notify: NotifyRecorder,
) -> None:
    # Every claim reads prioqd:paused: of the wrong type, it must read as "nothing
    # paused" (and be said once), not fail every cycle of every daemon.
    r.set("prioqd:paused", "x")
    cfg = make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 1})
    d = daemon(cfg, env=env_for(mods, NOTIFY_SOCKET=notify.path))
    ids = [f"p{i}" for i in range(6)]
    for i, job_id in enumerate(ids):  # one at a time: a claim (or a landing) each
        push(r, "normal", {"id": job_id, "task": "square", "args": [i]})
        assert wait_ended(r, [job_id], d)[job_id]["result"] == str(i * i)
    reports = events_like(d, "has the wrong type; read as empty")
    # Once by the claim, once by the reader of operators' commands; not every cycle.
    assert 1 <= len(reports) <= 2, reports
    assert all("prioqd:paused" in str(e["problems"]) and e["level"] == "error" for e in reports)
    wait_for(lambda: any("prioqd:paused" in s for s in notify.statuses()), 10)
    # Fixed: a pause works again.
    r.delete("prioqd:paused")
    assert prioqd("pause", "normal", "--config", str(cfg)).returncode == 0
    push(r, "normal", {"id": "held_back", "task": "square", "args": [2]})
    time.sleep(0.5)
    assert r.llen("prioqd:queue:normal") == 1
    d.assert_alive()
    assert not criticals(d)


@pytest.mark.parametrize("key", ["inflight", "landing"])
def test_a_daemon_whose_own_key_has_the_wrong_type_restarts_and_loses_nothing(
    r: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    mods: Path,
    daemon: Daemon,
    key: str,
) -> None:
    # The daemon's own inflight hash (or a landing list) overwritten: it cannot hold a
    # job any more, so it exits 1 (systemd restarts it under a new id). Its successor
    # recovers what it can of it, reports the broken key and serves.
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 30}
    )
    d = daemon(cfg, env=env_for(mods))
    me = d.daemon_id
    wait_idle(r)
    broken = f"prioqd:inflight:{me}" if key == "inflight" else f"prioqd:landing:{me}:normal"
    r.set(broken, "x")
    push(r, "normal", {"id": "a", "task": "square", "args": [3]})
    assert d.wait(30) == 1
    assert any(broken in str(e.get("error")) for e in criticals(d)), criticals(d)
    d.start()
    h = wait_ended(r, ["a"], d)["a"]
    assert h["status"] == "succeeded" and h["result"] == "9"
    # Reported by whoever recovered it: the daemon itself as it stopped, or the next.
    event = "keys of the wrong type left as they are while recovering a daemon's jobs"
    (report,) = [e for e in d.all_logs() if e.get("event") == event]
    assert report["daemons"] == [me] and broken in str(report["problems"])
    assert r.get(broken) == b"x"
    assert me not in helpers.registered_daemons(r)
    d.assert_alive()


def test_members_that_are_not_utf8_stop_no_daemon(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # An operator's typo (or a client writing bytes): members that are not UTF-8 text
    # in the sets a daemon reads at start-up and on every note.
    far = int(time.time() * 1000) + 3_600_000
    r.sadd("prioqd:paused", b"\xff")
    r.zadd("prioqd:cancels", {b"\xfe": far})
    r.zadd("prioqd:daemons", {b"\xfd": far, b"\xfc": 1})  # one alive, one expired
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    d = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "a", "task": "square", "args": [5]})
    assert wait_ended(r, ["a"], d)["a"]["result"] == "25"
    # A note makes every daemon read the paused set and the cancels again.
    assert prioqd("pause", "low", "--config", str(cfg)).returncode == 0
    d.wait_log("paused priorities", paused=["low", "\ufffd"])
    push(r, "low", {"id": "b", "task": "square", "args": [6]})
    push(r, "normal", {"id": "c", "task": "square", "args": [7]})
    assert wait_ended(r, ["c"], d)["c"]["result"] == "49"
    assert r.llen("prioqd:queue:low") == 1  # paused: not taken
    out = prioqd("status", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    d.assert_alive()
    assert not criticals(d)


def test_requeue_into_a_queue_of_the_wrong_type_loses_nothing(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    payload = json.dumps({"id": "x", "task": "square", "args": [2]})
    r.set("prioqd:payload:abc", payload)
    letter = {"reason": "r", "id": "x", "priority": "normal", "payload_key": "prioqd:payload:abc"}
    r.lpush("prioqd:dead", json.dumps(letter))
    r.set("prioqd:queue:normal", "x")
    out = prioqd("dead", "requeue", "x", "--config", str(cfg))
    assert [json.loads(x) for x in r.lrange("prioqd:dead", 0, -1)] == [letter]
    assert r.get("prioqd:payload:abc") == payload.encode()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "WRONGTYPE: prioqd:queue:normal holds a string, not a list" in out.stderr
    r.delete("prioqd:queue:normal")
    out = prioqd("dead", "requeue", "x", "--config", str(cfg))
    assert out.returncode == 0 and r.lrange("prioqd:queue:normal", 0, -1) == [payload.encode()]


@pytest.mark.slow
def test_redis_out_of_memory_backs_off_and_loses_nothing(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = make_config(tmp_path / "c.toml", server.url, workers={"slots": 2}, daemon={"lease_s": 30})
    ids = [f"m{i}" for i in range(8)]
    # Queued before the daemon starts: it claims them, never waiting in BLMOVE.
    push(r, "normal", *({"id": j, "task": "logrun", "args": [str(runs), j, 700]} for j in ids))
    d = daemon(cfg, env=env_for(mods))
    wait_for(
        lambda: sum(job_hash(r, j).get("status") == "running" for j in ids) == 2,
        10,
        what="2 jobs running",
    )
    # Out of memory by a clear margin (used memory moves by a few hundred KB on its
    # own): 4 MB of ballast, and a limit 1 MB under what is used.
    # (Made in Lua: a 4 MB SET would leave a 4 MB query buffer behind, freed later.)
    r.eval("redis.call('SET', KEYS[1], string.rep('x', ARGV[1]))", 1, "ballast", 4_000_000)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(used - 1_000_000))
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        r.lpush("prioqd:probe", "x")  # writes are refused now
    proc = psutil.Process(d.pid)
    cpu_before = sum(proc.cpu_times()[:2])
    logged_before = len(d.events("redis unavailable"))
    time.sleep(3)  # the running jobs end meanwhile: their outcomes cannot be written
    d.assert_alive()
    unavailable = len(d.events("redis unavailable")) - logged_before
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    assert 1 <= unavailable <= 40, f"{unavailable} 'redis unavailable' lines in 3 s"
    assert cpu < 0.5, f"the daemon spun while Redis was out of memory: {cpu:.2f}s CPU"
    r.config_set("maxmemory", "0")
    hashes = wait_ended(r, ids, d, timeout_s=30)
    assert all(h["status"] == "succeeded" and h["attempts"] == "1" for h in hashes.values())
    assert run_counts(runs) == Counter(ids)
    assert helpers.in_flight_count(r) == 0 and r.llen("prioqd:queue:normal") == 0
    r.close()


# --- 4. a drain longer than the lease ---------------------------------------------------


@pytest.mark.slow
def test_a_drain_longer_than_the_lease_does_not_let_another_daemon_rerun(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    cfg = make_config(
        tmp_path / "c.toml",
        redis_server.url,
        workers={"slots": 1},
        daemon={"lease_s": 3, "shutdown_grace_s": 10},
    )
    a = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "long", "task": "logrun", "args": [str(runs), "long", 6000]})
    wait_ended(r, ["long"], a, statuses=("running",))
    b = daemon(cfg, env=env_for(mods))
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0
    time.sleep(0.5)
    assert run_counts(runs)["long"] == 1
    assert not b.events("recovered jobs of daemons whose lease expired")
    h = job_hash(r, "long")
    assert h["status"] == "succeeded" and h["attempts"] == "1"
    assert h["daemon"] == a.daemon_id
    assert not b.events("job started")
    b.assert_alive()


# --- 5. a worker crash in a batch -------------------------------------------------------


def test_a_crash_in_a_batch_charges_exactly_the_job_that_was_running(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    cfg = make_config(
        tmp_path / "c.toml",
        redis_server.url,
        workers={"slots": 1},
        jobs={"max_retries": 1, **FAST_RETRY},
    )
    d = daemon(cfg, env=env_for(mods))
    # Teach the daemon that `quick` is short, so that a run of them goes to one
    # worker in one batch.
    warm = [f"w{i}" for i in range(6)]
    push(r, "normal", *({"id": j, "task": "quick", "args": [str(runs), j]} for j in warm))
    wait_ended(r, warm, d)
    wait_idle(r)
    # One LPUSH: the blocking wait takes x0, the next claim x1..x7 in one batch. How the
    # daemon batches them depends on how long it measured `quick` to be, which a loaded
    # machine stretches: up to three rounds, until a batch was put back behind the
    # culprit (the scenario); every round's outcomes are checked all the same.
    requeued: list[dict[str, Any]] = []
    for round_ in "bcd":
        ids = [f"{round_}{i}" for i in range(8)]
        culprit = f"{round_}3"
        r.lpush(
            "prioqd:queue:normal",
            *(
                json.dumps({"id": j, "task": "quick", "args": [str(runs), j, j == culprit]})
                for j in ids
            ),
        )
        hashes = wait_ended(r, ids, d)
        counts = run_counts(runs)
        innocent = [j for j in ids if j != culprit]
        for j in innocent:
            assert hashes[j]["status"] == "succeeded" and hashes[j]["attempts"] == "1", (
                j,
                hashes[j],
            )
            assert counts[j] == 1, (j, counts[j])
        assert hashes[culprit]["status"] == "dead" and hashes[culprit]["attempts"] == "2"
        assert hashes[culprit]["error"] == "worker process exited with code 13"
        assert counts[culprit] == 2
        # Those put back behind the culprit ran in their original (FIFO) order.
        order = [tag for tag in runs.read_text().split() if tag in innocent]
        assert order == innocent
        requeued = [e for e in d.events("job finished") if e.get("outcome") == "requeued"]
        if requeued:
            break
        wait_idle(r)
    assert requeued, "no batch was put back in three rounds: the scenario did not happen"


# --- 6. huge payloads, results and arguments ---------------------------------------------


def test_an_oversized_payload_goes_to_the_dead_letters_by_reference_and_can_be_requeued(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(
        tmp_path / "c.toml",
        redis_server.url,
        workers={"slots": 1},
        jobs={"max_payload_bytes": 1000},
    )
    d = daemon(cfg, env=env_for(mods))
    # Claim path: the daemon is busy, so the next cycle's claim meets the payload.
    push(r, "high", {"id": "blocker", "task": "nap", "args": [400]})
    wait_ended(r, ["blocker"], d, statuses=("running",))
    big = json.dumps({"id": "big", "task": "echo", "args": ["x" * 20_000]})
    push(r, "normal", big, {"id": "small", "task": "square", "args": [2]})
    assert wait_ended(r, ["small"], d)["small"]["result"] == "4"
    # Idle path: the blocking wait hands the payload over; it is dropped by reference.
    wait_idle(r)
    big2 = json.dumps({"id": "big2", "task": "echo", "args": ["y" * 30_000]})
    push(r, "normal", big2)
    wait_for(lambda: r.llen("prioqd:dead") == 2, 10, what="2 dead letters")
    raw_letters = r.lrange("prioqd:dead", 0, -1)
    for raw_letter, payload in zip(raw_letters, (big2, big), strict=True):
        letter = json.loads(raw_letter)
        assert len(raw_letter) < 1000, "the letter copies the payload"
        assert "payload" not in letter
        assert f"{len(payload)} bytes, over max_payload_bytes=1000" in letter["reason"]
        assert r.get(letter["payload_key"]) == payload.encode()
    d.assert_alive()
    assert d.stop() == 0
    out = prioqd("dead", "requeue", "--all", "--config", str(cfg), env=env_for(mods))
    assert out.returncode == 0 and "requeued 2" in out.stdout, out.stdout + out.stderr
    assert sorted(r.lrange("prioqd:queue:normal", 0, -1)) == sorted([big.encode(), big2.encode()])
    assert not r.llen("prioqd:dead") and not r.keys("prioqd:payload:*")


def test_a_result_over_max_result_bytes_fails_the_job_without_retry(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env_for(mods))
    push(r, "normal", {"id": "huge", "task": "big_result", "args": [1_100_000]})
    push(r, "normal", {"id": "fine", "task": "big_result", "args": [1000]})
    hashes = wait_ended(r, ["huge", "fine"], d)
    assert hashes["fine"]["status"] == "succeeded"
    huge = hashes["huge"]
    assert huge["status"] == "dead" and huge["attempts"] == "1", huge
    assert "max_result_bytes=1048576" in huge["error"]
    assert "result" not in huge
    d.assert_alive()


def test_a_task_error_of_megabytes_is_capped_and_marked_everywhere_it_is_copied(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url, jobs={"max_retries": 0})
    d = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "loud", "task": "loud", "args": [1_000_000]})
    h = wait_ended(r, ["loud"], d)["loud"]
    assert h["status"] == "dead"
    error, tb = h["error"], h["traceback"]
    assert error.startswith("ValueError: \u00e9\u00e9")
    assert "[error text truncated: 2000012 bytes, the first 4096 kept]" in error
    assert len(error.encode()) < 4096 + 200
    assert tb.startswith("Traceback (most recent call last):")
    assert "... [traceback truncated: " in tb and tb.rstrip().endswith("\u00e9")
    assert 60_000 < len(tb.encode()) < 64 * 1024 + 200
    (letter,) = dead_letters(r)
    assert letter["traceback"] == tb and letter["reason"].startswith(error)
    (done,) = r.lrange("prioqd:done:loud", 0, -1)
    assert json.loads(done)["error"] == error
    line = d.wait_log("job finished", job_id="loud")  # the log is written after Redis
    assert line["error"] == error and line["traceback"] == tb
    d.assert_alive()


def small_bulk_daemon(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon, **jobs: Any
) -> tuple[redis.Redis, DaemonProcess]:
    """One slot, on a Redis whose proto-max-bulk-len is 1 MB (the smallest it takes):
    one argument over that and Redis refuses the whole command."""
    r = server.client()
    r.config_set("proto-max-bulk-len", "1mb")
    cfg = make_config(tmp_path / "c.toml", server.url, workers={"slots": 1}, jobs=jobs)
    return r, daemon(cfg, env=env_for(mods))


def dead_letter_for(r: redis.Redis, d: DaemonProcess, reason: str) -> dict[str, Any]:
    """The dead letter whose reason has ``reason`` in it, the daemon alive meanwhile."""

    def letter() -> dict[str, Any] | None:
        d.assert_alive()
        found = letters_by_reason(r, reason)
        return found[0] if found else None

    return wait_for(letter, 20, what=f"a dead letter: {reason}")  # type: ignore[no-any-return]


def assert_serves_on(r: redis.Redis, d: DaemonProcess) -> None:
    """A job pushed now runs, and nothing was logged at critical."""
    push(r, "normal", {"id": "later", "task": "square", "args": [4]})
    assert wait_ended(r, ["later"], d)["later"]["result"] == "16"
    assert not criticals(d)
    r.close()


def test_an_argument_over_proto_max_bulk_len_dead_letters_the_job_not_the_daemon(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r, d = small_bulk_daemon(server, tmp_path, mods, daemon)
    # A payload under max_payload_bytes (1 MiB) of quotes: its dead letter escapes each
    # one again and comes to 1.4 MB, one argument over Redis's limit.
    payload = json.dumps({"id": "quotes", "task": "no_such_task", "args": ['"' * 350_000]})
    assert len(payload) < 1024 * 1024
    push(r, "normal", payload)
    push(r, "normal", {"id": "after", "task": "square", "args": [3]})
    assert wait_ended(r, ["after"], d)["after"]["result"] == "9"
    dead = dead_letter_for(r, d, "Protocol error")
    assert r.get(dead["payload_key"]) == payload.encode()
    assert_serves_on(r, d)


def test_a_result_over_proto_max_bulk_len_dead_letters_the_job_not_the_daemon(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r, d = small_bulk_daemon(server, tmp_path, mods, daemon, max_result_bytes=4 * 1024 * 1024)
    push(r, "normal", {"id": "big", "task": "big_result", "args": [1_500_000]})
    push(r, "normal", {"id": "after", "task": "square", "args": [3]})
    assert wait_ended(r, ["after"], d)["after"]["result"] == "9"
    dead = dead_letter_for(r, d, "Protocol error")
    assert json.loads(r.get(dead["payload_key"]))["id"] == "big"  # type: ignore[arg-type]
    assert helpers.in_flight_count(r) == 0
    assert_serves_on(r, d)


def test_a_landed_payload_whose_adopt_redis_refuses_is_dead_lettered_not_the_daemon(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    # max_payload_bytes above Redis's proto-max-bulk-len: the blocking wait hands the
    # daemon a payload (a server-side move) that Redis then refuses as an argument of
    # the adopt. It goes to the dead letters by reference; the daemon serves on.
    r, d = small_bulk_daemon(server, tmp_path, mods, daemon, max_payload_bytes=4 * 1024 * 1024)
    wait_idle(r)
    head, tail = '{"id": "wide", "task": "nap", "args": [1], "meta": {"pad": "', '"}}'
    payload = head + "x" * 1_500_000 + tail
    # (Made in Redis: pushed from here, it would be refused as an argument too.)
    r.eval(
        "redis.call('LPUSH', KEYS[1], ARGV[1] .. string.rep('x', tonumber(ARGV[2])) .. ARGV[3])",
        1, "prioqd:queue:normal", head, 1_500_000, tail,
    )  # fmt: skip
    dead = dead_letter_for(r, d, "redis refused to record it")
    assert r.get(dead["payload_key"]) == payload.encode()
    assert helpers.in_flight_count(r) == 0 and not r.llen("prioqd:queue:normal")
    assert_serves_on(r, d)


# --- 7. a Redis stall; a daemon stopped past its lease -----------------------------------


@pytest.mark.slow
def test_a_redis_stall_longer_than_the_lease_reruns_nothing(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    r = server.client()
    runs = tmp_path / "runs"
    cfg = make_config(tmp_path / "c.toml", server.url, workers={"slots": 1}, daemon={"lease_s": 3})
    a = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "a", "task": "logrun", "args": [str(runs), "a", 6000]})
    wait_ended(r, ["a"], a, statuses=("running",))
    b = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "b", "task": "logrun", "args": [str(runs), "b", 6000]})
    wait_ended(r, ["b"], b, statuses=("running",))
    assert job_hash(r, "a")["daemon"] == a.daemon_id
    assert job_hash(r, "b")["daemon"] == b.daemon_id
    r.execute_command("CLIENT", "PAUSE", "3500", "ALL")
    hashes = wait_ended(r, ["a", "b"], a, timeout_s=30)
    for job_id, d in (("a", a), ("b", b)):
        assert hashes[job_id]["attempts"] == "1" and hashes[job_id]["daemon"] == d.daemon_id
    assert run_counts(runs) == Counter({"a": 1, "b": 1})
    for d in (a, b):
        assert not d.events("recovered jobs of daemons whose lease expired")
        d.assert_alive()
    r.close()


@pytest.mark.slow
def test_a_daemon_resumed_after_its_jobs_were_rerun_never_overwrites_the_outcome(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 2}
    )
    a = daemon(cfg, env=env_for(mods))
    wait_idle(r)  # a blocks on the queues first, so Redis hands it the job, not b
    # b is up before the job starts: its start-up (a second on a loaded machine) must
    # not let the job end, and its outcome be written, before a is stopped.
    b = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "held", "task": "logrun", "args": [str(runs), "held", 1200]})
    running = wait_ended(r, ["held"], a, statuses=("running",))["held"]
    assert running["daemon"] == a.daemon_id, "b took the job: the scenario did not happen"
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # alive but silent; its worker finishes the job
    try:
        b.wait_log("recovered jobs of daemons whose lease expired", timeout_s=10)
        h = wait_ended(r, ["held"], b, timeout_s=15)["held"]
    finally:
        a.proc.send_signal(signal.SIGCONT)
    survivor = b.daemon_id
    assert h["status"] == "succeeded" and h["daemon"] == survivor and h["attempts"] == "2"
    done_before = r.lrange("prioqd:done:held", 0, -1)
    # The resumed daemon learns that its claim is gone and writes nothing.
    wait_for(lambda: [e for e in a.logs() if "lease" in str(e.get("event"))], 10)
    wait_for(lambda: events_like(a, "job finished"), 10, what="the resumed daemon's outcome")
    time.sleep(1.0)
    after = job_hash(r, "held")
    assert after["daemon"] == survivor and after["result"] == '"held"', after
    assert after["status"] == "succeeded" and after["attempts"] == "2"
    assert r.lrange("prioqd:done:held", 0, -1) == done_before
    assert run_counts(runs)["held"] == 2
    lease_lines = [e for e in a.logs() if "lease" in str(e.get("event"))]
    assert any(e.get("level") in ("warning", "error") for e in lease_lines)
    # ...and takes a lease again, to serve on.
    wait_for(lambda: r.zscore("prioqd:daemons", a.daemon_id) is not None, 10)
    a.assert_alive()


# --- 8. sd_notify injection -------------------------------------------------------------


def test_notify_values_are_one_line_without_control_characters(
    r: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    mods: Path,
    daemon: Daemon,
    notify: NotifyRecorder,
) -> None:
    d = daemon(
        make_config(tmp_path / "c.toml", redis_server.url),
        env=env_for(mods, NOTIFY_SOCKET=notify.path),
    )
    message = "x\nWATCHDOG=trigger\nSTATUS=pwned\x1b[2J" + "y" * 2000
    push(r, "normal", {"id": "inj", "task": "fail", "args": [message], "max_retries": 0})
    assert wait_ended(r, ["inj"], d)["inj"]["status"] == "dead"
    wait_for(
        lambda: any(b"WATCHDOG=trigger" in data for data in list(notify.datagrams)),
        15,
        what="a datagram carrying the last error",
    )
    for data in list(notify.datagrams):
        lines = data.decode(errors="replace").split("\n")
        assert "WATCHDOG=trigger" not in lines, data
        for line in lines:
            key, _, value = line.partition("=")
            assert key in ("READY", "STATUS", "STOPPING", "RELOADING", "MONOTONIC_USEC"), data
            assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value), data
            assert len(value) <= 300, len(value)
    d.assert_alive()


# --- 9. a reload while a deploy is half done ----------------------------------------------


def test_a_reload_whose_workers_cannot_import_is_rejected_and_serving_goes_on(
    r: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    mods: Path,
    daemon: Daemon,
    notify: NotifyRecorder,
) -> None:
    module = mods / "deploytasks.py"
    module.write_text("from prioqd import task\n\n\n@task\ndef deployed(x):\n    return x\n")
    modules = {"modules": [*MODULES, "deploytasks"]}
    cfg = make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, tasks=modules)
    d = daemon(cfg, env=env_for(mods, NOTIFY_SOCKET=notify.path))
    push(r, "normal", {"id": "running", "task": "nap", "args": [2500, "ok"]})
    wait_ended(r, ["running"], d, statuses=("running",))
    # Mid-deploy: the module now fails to import, and the new config asks for more
    # workers, which must import it.
    module.write_text("raise RuntimeError('half deployed')\n")
    shutil.rmtree(mods / "__pycache__", ignore_errors=True)
    make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 2}, tasks=modules)
    d.signal(signal.SIGHUP)
    rejected = d.wait_log("reload rejected; still running the previous configuration", 30)
    assert rejected["level"] == "error" and "half deployed" in rejected["error"]
    wait_for(lambda: any("reload rejected" in s for s in notify.statuses()), 10)
    h = wait_ended(r, ["running"], d)["running"]
    assert h["status"] == "succeeded" and h["attempts"] == "1" and h["result"] == '"ok"'
    push(r, "normal", {"id": "old_code", "task": "deployed", "args": [7]})
    assert wait_ended(r, ["old_code"], d)["old_code"]["result"] == "7"
    assert len(psutil.Process(d.pid).children()) == 1
    d.assert_alive()
    assert not criticals(d)


def test_a_replacement_worker_with_fewer_tasks_is_reported_not_silent(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    module = mods / "deploytasks.py"
    module.write_text(
        "from prioqd import task\n\n\n@task\ndef deployed(x):\n    return x\n\n\n"
        "@task\ndef gone(x):\n    return x\n"
    )
    modules = {"modules": [*MODULES, "deploytasks"]}
    cfg = make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, tasks=modules)
    d = daemon(cfg, env=env_for(mods))
    # A deploy removes a task while the daemon runs; then a worker dies and its
    # replacement imports the new code.
    module.write_text("from prioqd import task\n\n\n@task\ndef deployed(x):\n    return x\n")
    shutil.rmtree(mods / "__pycache__", ignore_errors=True)
    push(r, "normal", {"id": "crash", "task": "crash", "max_retries": 0})
    assert wait_ended(r, ["crash"], d)["crash"]["status"] == "dead"
    changed = wait_for(lambda: events_like(d, "different set of tasks"), 15, what="a report")[0]
    assert changed["level"] == "error" and changed["removed"] == ["gone"]
    push(r, "normal", {"id": "new_code", "task": "deployed", "args": [5]})
    assert wait_ended(r, ["new_code"], d)["new_code"]["result"] == "5"
    d.assert_alive()


def _fd_limit(pid: int, limit: int) -> tuple[int, int]:
    """Lower a process's RLIMIT_NOFILE (the fds it has stay open); the old limits."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    return old


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_a_worker_that_cannot_be_replaced_is_retried_and_reported_not_silent(
    r: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    mods: Path,
    daemon: Daemon,
    notify: NotifyRecorder,
) -> None:
    # The daemon cannot make a pipe for a new worker (EMFILE, as at a low LimitNOFILE,
    # or EAGAIN at TasksMax): the replacement of a worker that died must be retried
    # and reported, not end silently and leave claimed jobs waiting for ever.
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 30}
    )
    d = daemon(cfg, env=env_for(mods, NOTIFY_SOCKET=notify.path))
    (worker,) = d.worker_pids
    # Every connection made (a claim's, a wait's on each queue) before fds run out.
    push(r, "high", {"id": "warm", "task": "square", "args": [1]})
    wait_ended(r, ["warm"], d)
    wait_for(lambda: helpers.waits_blocked(r) == 3, 10, what="a wait on every queue")
    old = _fd_limit(d.pid, 3)  # 0, 1 and 2 are taken: no new fd at all
    try:
        os.kill(worker, signal.SIGKILL)
        d.wait_log("worker process failed to start")  # the death is seen: no worker
        # (High: it runs as it lands, no round trip on a new connection first.)
        push(r, "high", {"id": "waits", "task": "square", "args": [5]})
        failures = d.wait_count("worker process failed to start", 3, timeout_s=15)
        assert all("Too many open files" in e["error"] for e in failures), failures
        assert all(e["level"] == "error" and e["retry_in_s"] > 0 for e in failures)
        wait_for(lambda: any("Too many open files" in s for s in notify.statuses()), 10)
        assert job_hash(r, "waits").get("status") != "succeeded"
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, old)
    h = wait_ended(r, ["waits"], d, timeout_s=30)["waits"]
    assert h["status"] == "succeeded" and h["result"] == "25"
    assert len(psutil.Process(d.pid).children()) == 1
    d.assert_alive()
    assert not criticals(d)


def test_a_reload_that_cannot_make_workers_is_rejected_and_serving_goes_on(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 1})
    d = daemon(cfg, env=env_for(mods))
    push(r, "high", {"id": "warm", "task": "square", "args": [1]})
    wait_ended(r, ["warm"], d)
    wait_for(lambda: helpers.waits_blocked(r) == 3, 10, what="a wait on every queue")
    make_config(tmp_path / "c.toml", redis_server.url, workers={"slots": 2})
    # One fd left: the config file can be read, but a worker's pipe (two) cannot be made.
    old = _fd_limit(d.pid, _lowest_free_fd(d.pid) + 1)
    try:
        d.signal(signal.SIGHUP)
        rejected = d.wait_log("reload rejected; still running the previous configuration", 15)
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, old)
    assert "Too many open files" in rejected["error"], rejected
    push(r, "normal", {"id": "after", "task": "square", "args": [3]})
    assert wait_ended(r, ["after"], d)["after"]["result"] == "9"
    assert len(psutil.Process(d.pid).children()) == 1
    d.assert_alive()
    assert not criticals(d)


# --- 10. jobs nobody serves --------------------------------------------------------------


def test_unserved_queues_are_reported_by_status_and_at_start_up(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    push(r, "urgent", *({"id": f"u{i}", "task": "square", "args": [i]} for i in range(3)))
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    d = daemon(cfg, env=env_for(mods))
    warned = events_like(d, "does not serve")
    assert warned and warned[0]["level"] == "warning"
    assert warned[0]["queue"] == "urgent" and warned[0]["depth"] == 3
    out = prioqd("status", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("urgent")]
    assert "UNSERVED" in line and " 3 " in f"{line} "
    report = json.loads(prioqd("status", "--json", "--config", str(cfg)).stdout)
    assert report["unserved_queues"] == {"urgent": 3}
    assert r.llen("prioqd:queue:urgent") == 3  # reported, not touched


def test_due_scheduled_jobs_of_a_priority_nobody_serves_become_dead_letters(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    extra = make_config(
        tmp_path / "extra.toml",
        redis_server.url,
        queues={"priorities": ["high", "normal", "low", "extra"]},
    )
    x = daemon(extra, env=env_for(mods))
    push(r, "extra", {"id": "lonely", "task": "square", "args": [2], "delay_s": 2})
    wait_ended(r, ["lonely"], x, statuses=("scheduled",))
    assert x.stop() == 0  # the only daemon serving "extra" is gone
    y = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env_for(mods))

    def letter() -> dict[str, Any] | None:
        y.assert_alive()
        found = letters_by_reason(r, "no daemon serves priority extra")
        return found[0] if found else None

    dead = wait_for(letter, 15, what="the unserved due job in the dead letters")
    payload = dead.get("payload") or r.get(dead["payload_key"])
    assert json.loads(payload)["id"] == "lonely"  # type: ignore[arg-type]
    assert not r.llen("prioqd:queue:extra") and not r.zcard("prioqd:scheduled")


# --- 11. security ------------------------------------------------------------------------


def test_workers_and_their_children_do_not_inherit_the_redis_password(
    server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    server.client().config_set("requirepass", "s3cret")
    r = server.client(password="s3cret")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("s3cret\n")
    cfg = make_config(tmp_path / "c.toml", server.url)
    env = env_for(mods, PRIOQD_REDIS_PASSWORD="s3cret", CREDENTIALS_DIRECTORY=str(creds))
    d = daemon(cfg, env=env)
    push(r, "normal", {"id": "env", "task": "secrets"})
    h = wait_ended(r, ["env"], d)["env"]
    assert h["status"] == "succeeded", h
    nothing = {"PRIOQD_REDIS_PASSWORD": None, "CREDENTIALS_DIRECTORY": None}
    assert json.loads(h["result"]) == {"worker": nothing, "child": nothing}
    r.close()


def test_max_timeout_s_caps_the_timeout_a_producer_asks_for(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, jobs={"max_timeout_s": 1, "max_retries": 0}
    )
    d = daemon(cfg, env=env_for(mods))
    push(r, "normal", {"id": "greedy", "task": "sleep", "args": [3], "timeout_s": 1000})
    h = wait_ended(r, ["greedy"], d)["greedy"]
    assert h["status"] == "dead" and h["error"] == "timed out after 1s"
    assert float(h["finished_at"]) - float(h["started_at"]) < 2.5


def test_dead_list_escapes_control_characters(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    d = daemon(cfg, env=env_for(mods))
    evil = "\x1b[31mevil\x1b]0;title\x07"
    push(r, "normal", {"id": "esc", "task": evil})
    assert wait_ended(r, ["esc"], d)["esc"]["status"] == "dead"
    # And a letter written by hand, with control characters in every field.
    r.lpush(
        "prioqd:dead",
        json.dumps({"reason": "r\x1b[2J\rx", "id": "i\x9b1m", "task": evil, "priority": "\x08"}),
    )
    out = prioqd("dead", "list", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "evil" in out.stdout
    bad = [c for c in out.stdout if (ord(c) < 32 and c != "\n") or 127 <= ord(c) < 160]
    assert not bad, repr(out.stdout)


# --- 12. eta by Redis's clock ------------------------------------------------------------

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.slow
def test_eta_is_compared_with_redis_clock_not_the_daemon_hosts(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    if not LIBFAKETIME.exists():
        skip_or_fail("libfaketime is not installed (apt-get install faketime)")
    # The daemon's host clock runs an hour ahead of Redis's.
    env = env_for(mods, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="+1h", FAKETIME_NO_CACHE="1")
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env)
    ready = d.wait_log("daemon ready")
    skew = time.mktime(time.strptime(ready["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    skew -= time.mktime(time.gmtime())
    assert skew > 3000, f"faketime did not shift the daemon's clock ({skew:.0f} s)"
    seconds, micros = r.time()
    eta = seconds + micros / 1e6 + 3.0
    pushed = time.monotonic()
    push(r, "normal", {"id": "later", "task": "square", "args": [5], "eta": eta})
    wait_ended(r, ["later"], d, statuses=("scheduled", "running", "succeeded"))
    assert job_hash(r, "later")["status"] == "scheduled", "it ran at once"
    h = wait_ended(r, ["later"], d, timeout_s=15)["later"]
    waited = time.monotonic() - pushed
    assert h["status"] == "succeeded" and h["result"] == "25"
    assert 2.5 <= waited < 6.0, waited


@pytest.mark.slow
def test_a_cancel_is_heard_by_a_daemon_whose_clock_is_an_hour_off(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    """A cancel's expiry is Redis's clock (ten minutes, as `prioqd cancel` keeps it);
    a daemon compared it with its own and, an hour ahead, found every cancel expired."""
    if not LIBFAKETIME.exists():
        skip_or_fail("libfaketime is not installed (apt-get install faketime)")
    env = env_for(mods, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="+1h", FAKETIME_NO_CACHE="1")
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env)
    push(r, "normal", {"id": "long", "task": "nap", "args": [30_000]})
    wait_ended(r, ["long"], d, statuses=("running",))
    seconds, micros = r.time()
    r.zadd("prioqd:cancels", {"long": seconds * 1000 + micros // 1000 + 600_000})
    r.publish("prioqd:control", json.dumps({"op": "cancel", "ids": ["long"]}))
    h = wait_ended(r, ["long"], d, statuses=("cancelled",), timeout_s=10)["long"]
    assert h["status"] == "cancelled"


# --- 13. CLI ----------------------------------------------------------------------------


def test_dead_purge_counts_every_letter_it_deletes(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    letter = json.dumps({"reason": "r" * 200, "id": "x", "task": "t", "priority": "normal"})
    prefill = 20_000
    pipe = r.pipeline(transaction=False)
    for _ in range(prefill // 1000):
        pipe.lpush("prioqd:dead", *([letter] * 1000))
    pipe.execute()
    stop = threading.Event()
    pushed = [0]

    def producer() -> None:
        client = redis_server.client()
        while not stop.is_set():
            client.lpush("prioqd:dead", letter)
            pushed[0] += 1
        client.close()

    t = threading.Thread(target=producer)
    t.start()
    purged = 0
    try:
        for _ in range(3):
            out = prioqd("dead", "purge", "--config", str(cfg))
            assert out.returncode == 0, out.stderr
            purged += int(out.stdout.split()[1])
    finally:
        stop.set()
        t.join()
    assert pushed[0] > 0
    assert purged + r.llen("prioqd:dead") == prefill + pushed[0]


def test_dead_list_limit_reads_only_what_it_prints(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    letters = [
        json.dumps({"reason": f"reason {i}", "id": f"d{i}", "payload": "p" * 1000})
        for i in range(3000)
    ]
    r.lpush("prioqd:dead", *letters)  # d2999 is the newest
    sent_before = int(r.info("stats")["total_net_output_bytes"])
    out = prioqd("dead", "list", "--limit", "2", "--config", str(cfg))
    sent = int(r.info("stats")["total_net_output_bytes"]) - sent_before
    assert out.returncode == 0, out.stderr
    assert [x.strip() for x in out.stdout.splitlines() if "reason:" in x] == [
        "reason: reason 2999",
        "reason: reason 2998",
    ]
    assert sent < 100_000, f"Redis sent {sent} bytes for two letters"


def test_submit_wait_with_an_invalid_id_fails_at_once(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    t = time.monotonic()
    out = prioqd(
        "submit", "--config", str(cfg), "square", "2", "--id", "bad id", "--wait",
        "--wait-timeout-s", "20",
    )  # fmt: skip
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert time.monotonic() - t < 10
    assert "bad id" in out.stderr and "not valid" in out.stderr
    assert not r.keys("prioqd:queue:*")


def test_submit_wait_with_a_reused_id_waits_for_the_new_outcome(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    cfg = make_config(tmp_path / "c.toml", redis_server.url)
    stale = {"id": "again", "status": "succeeded", "result": "stale"}
    r.rpush("prioqd:done:again", json.dumps(stale))
    daemon(cfg, env=env_for(mods))
    out = prioqd(
        "submit", "--config", str(cfg), "square", "6", "--id", "again", "--wait",
        "--wait-timeout-s", "20",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    job_id, outcome = out.stdout.split("\n", 1)
    assert job_id == "again" and json.loads(outcome)["result"] == 36


# --- 14. config: inf and nan ---------------------------------------------------------------


def test_check_config_rejects_infinite_and_nan_numbers(r: redis.Redis, tmp_path: Path) -> None:
    for key, value in (
        ("daemon.lease_s", "inf"),
        ("daemon.lease_s", "+inf"),
        ("daemon.lease_s", "nan"),
        ("daemon.shutdown_grace_s", "inf"),
        ("jobs.timeout_s", "inf"),
    ):
        table, name = key.split(".")
        path = tmp_path / f"{table}-{name}-{value}.toml"
        path.write_text(f"[{table}]\n{name} = {value}\n")
        out = prioqd("check-config", "--config", str(path))
        assert out.returncode == 2, (key, value, out.stdout)
        assert key in out.stderr, (key, value, out.stderr)


def test_check_config_rejects_durations_too_large_for_a_timer(
    r: redis.Redis, tmp_path: Path
) -> None:
    # Finite, so they passed; then a timer set for them overflowed the event loop's
    # clock (an internal failure) or an EXPIRE refused them.
    keys = (
        "daemon.lease_s", "daemon.shutdown_grace_s", "jobs.timeout_s", "jobs.max_timeout_s",
        "jobs.retry_backoff_s", "jobs.retry_backoff_max_s", "jobs.result_ttl_s",
        "redis.socket_timeout_s", "redis.connect_timeout_s", "web.refresh_s",
        "web.session_max_age_s",
    )  # fmt: skip
    for key in keys:
        table, name = key.split(".")
        value = "1e300" if name not in ("result_ttl_s", "session_max_age_s") else str(2**53)
        path = tmp_path / f"{table}-{name}.toml"
        path.write_text(f"[{table}]\n{name} = {value}\n")
        out = prioqd("check-config", "--config", str(path))
        assert out.returncode == 2, (key, out.stdout, out.stderr)
        assert f"{key}: must be at most " in out.stderr, (key, out.stderr)
    path = tmp_path / "schedule.toml"
    path.write_text('[[schedule]]\nname = "s"\ntask = "square"\nevery_s = 1e300\n')
    out = prioqd("check-config", "--config", str(path))
    assert out.returncode == 2 and "schedule[0].every_s: must be at least 1" in out.stderr
    assert "at most 3.16224e+08" in out.stderr
    # A year of job timeout, a day of lease: long, but fine.
    path.write_text(
        "[jobs]\ntimeout_s = 31536000\nmax_timeout_s = 31536000\n[daemon]\nlease_s = 86400\n"
    )
    assert prioqd("check-config", "--config", str(path)).returncode == 0


# --- 15. same-id payloads scheduled together; FIFO after a recovery -------------------------


def test_identical_delayed_payloads_both_run(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    d = daemon(make_config(tmp_path / "c.toml", redis_server.url), env=env_for(mods))
    twin = json.dumps({"id": "twin", "task": "logrun", "args": [str(runs), "twin"], "delay_s": 0.5})
    r.lpush("prioqd:queue:normal", twin, twin)

    def both_ran() -> bool:
        d.assert_alive()
        return run_counts(runs)["twin"] >= 2

    wait_for(both_ran, 10, what="both delayed twins to run")
    # (A run writes to runs as it starts: its outcome is recorded once nothing is held.)
    wait_for(lambda: helpers.in_flight_count(r) == 0, 10, what="both outcomes recorded")
    assert job_hash(r, "twin")["status"] == "succeeded"
    assert not r.zcard("prioqd:scheduled") and not r.llen("prioqd:queue:normal")


@pytest.mark.slow
def test_recovered_jobs_go_back_to_the_head_in_their_original_order(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, mods: Path, daemon: Daemon
) -> None:
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    gate.touch()
    cfg = make_config(
        tmp_path / "c.toml", redis_server.url, workers={"slots": 4}, daemon={"lease_s": 1.5}
    )
    a = daemon(cfg, env=env_for(mods))
    held = [f"j{i}" for i in range(4)]
    for j in held:  # one by one: claimed in this order
        push(r, "normal", {"id": j, "task": "gated", "args": [str(runs), j, str(gate)]})
        wait_ended(r, [j], a, statuses=("running",))
    cfg_b = make_config(
        tmp_path / "b.toml", redis_server.url, workers={"slots": 1}, daemon={"lease_s": 1.5}
    )
    b = daemon(cfg_b, env=env_for(mods))
    push(r, "high", {"id": "busy", "task": "gated", "args": [str(runs), "busy", str(gate)]})
    wait_ended(r, ["busy"], b, statuses=("running",))
    queued = [f"q{i}" for i in range(2)]
    push(r, "normal", *({"id": j, "task": "square", "args": [1]} for j in queued))
    a.kill()
    b.wait_log("recovered jobs of daemons whose lease expired", timeout_s=10)
    # The head is the right end: the oldest claimed job first, then those never taken.
    order = [json.loads(x)["id"] for x in reversed(r.lrange("prioqd:queue:normal", 0, -1))]
    assert order == [*held, *queued]
    gate.unlink()
    hashes = wait_ended(r, [*held, *queued, "busy"], b, timeout_s=30)
    assert all(h["status"] == "succeeded" for h in hashes.values())
