"""prioqd.Client and prioqd.AsyncClient, as a producer uses them: against a real
redis-server, with real ``prioqd run`` daemons where a job must run."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    ROOT,
    TASKMODS,
    Config,
    Daemon,
    RedisServer,
    prioqd,
    wait_for,
)

from prioqd import AsyncClient, Client, JobFailed, jobs, task
from prioqd.errors import BrokerError
from prioqd.examples import echo, square

sys.path.insert(0, str(TASKMODS))  # a producer imports its task modules (never runs them)
from testtasks import async_square

TYPECHECK = Path(__file__).resolve().parent / "typecheck"


@pytest.fixture
def client(config: Config) -> Iterator[Client]:
    with Client.from_config(config()) as c:
        yield c


def queued(r: redis.Redis, priority: str) -> list[dict[str, Any]]:
    """The jobs waiting in a queue, as JSON, head (next to run) last."""
    return [json.loads(x) for x in r.lrange(f"prioqd:queue:{priority}", 0, -1)]  # type: ignore[union-attr]


def events(pubsub: Any, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """Messages published on a subscribed channel, until none comes for ``timeout_s``."""
    out = []
    while True:
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        if msg is None:
            return out
        out.append(json.loads(msg["data"]))


# --- what is pushed ------------------------------------------------------------------


def test_payload_is_exactly_the_documented_json(r: redis.Redis, client: Client) -> None:
    before = time.time()
    handle = client.enqueue(
        "echo", 1, "two", [3], k={"x": None},
        priority="low", id="job-1", timeout_s=60, max_retries=2, delay_s=5, meta={"who": "me"},
    )  # fmt: skip
    after = time.time()
    assert (handle.id, handle.duplicate) == ("job-1", False)
    (raw,) = r.lrange("prioqd:queue:low", 0, -1)  # type: ignore[misc]
    job = json.loads(raw)
    enqueued_at = job.pop("enqueued_at")
    assert before - 0.001 <= enqueued_at <= after + 0.001
    assert job == {
        "task": "echo", "args": [1, "two", [3]], "kwargs": {"k": {"x": None}}, "id": "job-1",
        "timeout_s": 60, "max_retries": 2, "delay_s": 5, "meta": {"who": "me"},
    }  # fmt: skip
    # The daemon's own parser takes it as it is.
    parsed = jobs.parse(raw, "low", known_tasks={"echo"}, max_payload_bytes=1 << 20, now=after)
    assert isinstance(parsed, jobs.Job) and parsed.enqueued_at == enqueued_at

    # A task function: its name; the middle priority, a generated id, no options.
    typed = client.enqueue(square, 7)
    (job2,) = queued(r, "normal")
    assert re.fullmatch(r"[0-9a-f]{32}", typed.id)
    assert job2 == {
        "task": "square", "args": [7], "kwargs": {}, "id": typed.id,
        "enqueued_at": job2["enqueued_at"],
    }  # fmt: skip

    # The client only reads a task function's name: it never runs it.
    calls: list[int] = []

    @task(name="tests.not_here")
    def not_here(x: int) -> int:
        calls.append(x)
        return x

    client.enqueue(not_here, 1)
    assert calls == [] and queued(r, "normal")[0]["task"] == "tests.not_here"

    # unique only when true; eta instead of delay_s. The lock outlives the delay.
    eta = round(time.time() + 30, 3)
    client.enqueue("square", 2, priority="high", id="u-1", unique=True, eta=eta)
    (job3,) = queued(r, "high")
    assert job3["unique"] is True and job3["eta"] == eta and "delay_s" not in job3
    assert r.get("prioqd:unique:u-1") == b"q"
    assert 86400 + 28 <= r.ttl("prioqd:unique:u-1") <= 86400 + 31  # type: ignore[operator]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.enqueue("square", 2, priority="urgent"),
         "unknown priority 'urgent'; configured: high, normal, low"),
        (lambda c: c.enqueue("square", 2, id="has space"), "job id 'has space' is not valid"),
        (lambda c: c.enqueue("square", 2, id=""), "job id '' is not valid"),
        (lambda c: c.enqueue("square", 2, id="x" * 201), "1-200 printable characters"),
        (lambda c: c.enqueue("square", 2, unique=True), "unique=True needs an id"),
        (lambda c: c.enqueue("square", object()), "args[0] is a object, which is not JSON"),
        (lambda c: c.enqueue("square", x=math.nan), "kwargs['x'] is nan, which JSON cannot"),
        (lambda c: c.enqueue("echo", {1: 2}), "args[0] has a key 1 that is not a string"),
        (lambda c: c.enqueue("echo", meta={"when": time}), "meta['when'] is a module"),
        (lambda c: c.enqueue("echo", meta=[1]), "meta must be a mapping"),
        (lambda c: c.enqueue("echo", _deep(120)), "nests deeper than 100"),
        (lambda c: c.enqueue("echo", "x" * (1 << 20)), "over max_payload_bytes=1048576"),
        (lambda c: c.enqueue("square", 2, delay_s=1, eta=2), "give 'delay_s' or 'eta', not both"),
        (lambda c: c.enqueue("square", 2, delay_s=1e12), "'delay_s' must be a number from 0"),
        (lambda c: c.enqueue("square", 2, timeout_s=0), "'timeout_s' must be a number greater"),
        (lambda c: c.enqueue("square", 2, timeout_s="5"), "'timeout_s' must be a number greater"),
        (lambda c: c.enqueue("square", 2, max_retries=-1), "'max_retries' must be a whole number"),
        (lambda c: c.enqueue("square", 2, max_retries=True), "'max_retries' must be a whole"),
        (lambda c: c.enqueue("square", 2, unique="yes", id="u"), "unique must be True or False"),
        (lambda c: c.enqueue("", 2), "'task' must be a non-empty string"),
        # Options json cannot encode: refused before the daemon's own checks run.
        (lambda c: c.enqueue("square", 2, timeout_s=object()),
         "task 'square': the job is not JSON-serialisable: Object of type object"),
        (lambda c: c.enqueue("square", 2, delay_s=math.nan),
         "task 'square': the job is not JSON-serialisable: Out of range float values"),
        (lambda c: c.options(eta=math.inf).enqueue(square, 2),
         "task 'square': the job is not JSON-serialisable: Out of range float values"),
    ],
)  # fmt: skip
def test_a_job_the_daemon_would_reject_raises_and_pushes_nothing(
    r: redis.Redis, client: Client, call: Callable[[Client], Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call(client)
    assert message in str(info.value)
    assert r.keys("*") == []


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


def test_a_lone_surrogate_in_the_arguments_goes_as_an_ascii_escape_and_comes_back(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    cfg = config()
    with Client.from_config(cfg) as client:
        plain = client.enqueue("echo", "caf\u00e9", priority="high")
        odd = client.enqueue("echo", "caf\u00e9 \ud800", priority="low")
        # UTF-8 as it is; a lone surrogate cannot be UTF-8, so that payload is ASCII
        # with JSON escapes (the daemon reads it as the same text).
        (raw_plain,) = r.lrange("prioqd:queue:high", 0, -1)  # type: ignore[misc]
        (raw_odd,) = r.lrange("prioqd:queue:low", 0, -1)  # type: ignore[misc]
        assert b'"caf\xc3\xa9"' in raw_plain
        assert raw_odd.isascii() and b'"caf\\u00e9 \\ud800"' in raw_odd
        daemon(cfg)  # started only now: the payloads were read as pushed
        assert plain.result(timeout_s=30) == {"args": ["caf\u00e9"], "kwargs": {}}
        assert odd.result(timeout_s=30) == {"args": ["caf\u00e9 \ud800"], "kwargs": {}}


def test_task_functions_take_options_through_options(r: redis.Redis, client: Client) -> None:
    high = client.options(priority="high", id="o-1", timeout_s=5).enqueue(square, 3)
    assert high.id == "o-1"
    (job,) = queued(r, "high")
    assert (job["task"], job["args"], job["id"], job["timeout_s"]) == ("square", [3], "o-1", 5)
    # With options(), every keyword is the task's, by name too.
    client.options().enqueue("echo", priority=1, id=2)
    # A task function that takes **kwargs gets them; square has no 'priority'.
    client.enqueue(echo, priority="p")
    kwargs = [j["kwargs"] for j in queued(r, "normal")]
    assert kwargs == [{"priority": "p"}, {"priority": 1, "id": 2}]
    with pytest.raises(TypeError, match=r"set job options through client\.options\(priority="):
        client.enqueue(square, 3, priority="high")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"a task name or a function decorated with @prioqd\.task"):
        client.enqueue(print, 1)  # type: ignore[call-overload]
    assert r.llen("prioqd:queue:normal") == 2 and r.llen("prioqd:queue:high") == 1


def test_unique_push_is_one_atomic_step(
    r: redis.Redis, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Producers racing to push one unique id: exactly one job is queued; every other
    push is dropped with 'duplicate' on the events channel and in the log."""
    cfg = config()
    n = 12
    clients = [Client.from_config(cfg) for _ in range(n)]
    pubsub = r.pubsub()
    pubsub.subscribe("prioqd:events")
    pubsub.get_message(timeout=5)  # the subscription's confirmation
    start = threading.Barrier(n)
    handles: list[Any] = []

    def produce(c: Client) -> None:
        start.wait()
        handles.append(c.enqueue("square", 4, id="report-1", unique=True))

    with caplog.at_level(logging.INFO, logger="prioqd.client"):
        threads = [threading.Thread(target=produce, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(handles) == n and {h.id for h in handles} == {"report-1"}
    assert sorted(h.duplicate for h in handles) == [False] + [True] * (n - 1)
    assert len(queued(r, "normal")) == 1
    assert events(pubsub) == [{"id": "report-1", "status": "duplicate"}] * (n - 1)
    dupes = [rec for rec in caplog.records if "duplicate" in rec.getMessage()]
    assert len(dupes) == n - 1 and "report-1" in dupes[0].getMessage()
    for c in clients:
        c.close()


def test_a_key_of_the_wrong_type_fails_the_push_and_writes_nothing(
    r: redis.Redis, client: Client
) -> None:
    r.set("prioqd:queue:normal", "not a list")
    with pytest.raises(BrokerError, match="WRONGTYPE: prioqd:queue:normal holds a string"):
        client.enqueue("square", 1, id="w-1", unique=True)
    assert sorted(r.keys("*")) == [b"prioqd:queue:normal"]  # no lock left behind


# --- following a job without a daemon ------------------------------------------------


def test_status_timeout_and_cancel_of_a_queued_job(r: redis.Redis, client: Client) -> None:
    handle = client.enqueue("square", 4)
    assert handle.status() == "queued"
    assert client.job(handle.id).status() == "queued"  # found by reading the queue
    assert client.job("never-pushed").status() == "unknown"

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {handle.id}: no outcome within 0.5 s"):
        handle.result(timeout_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 3
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.result(timeout_s=0)
    assert time.monotonic() - t0 < 1

    assert handle.cancel() is True
    assert r.llen("prioqd:queue:normal") == 0
    assert handle.status() == "cancelled"
    with pytest.raises(JobFailed) as info:
        handle.result(timeout_s=5)
    assert (info.value.job_id, info.value.status) == (handle.id, "cancelled")
    assert str(info.value) == f"job {handle.id} cancelled: cancelled while queued"
    assert handle.cancel() is False  # it has ended
    assert client.job("never-pushed").cancel() is False

    # A handle from the id alone finds the job in its queue.
    other = client.enqueue("square", 5, priority="low")
    assert client.job(other.id).cancel() is True
    assert r.llen("prioqd:queue:low") == 0

    # A cancelled unique job gives up its lock: the id can be pushed again at once.
    unique = client.enqueue("square", 1, id="u-2", unique=True)
    assert unique.cancel() is True and r.exists("prioqd:unique:u-2") == 0
    assert client.enqueue("square", 1, id="u-2", unique=True).duplicate is False

    # An id pushed again is a new job: the old outcome no longer answers.
    again = client.enqueue("square", 6, id=handle.id)
    assert again.status() == "queued"
    with pytest.raises(TimeoutError):
        again.result(timeout_s=0.2)


def test_a_job_pushed_by_another_producer_is_found_however_its_json_spells_the_id(
    r: redis.Redis, client: Client
) -> None:
    # Any JSON encoder may escape characters: "\u0061bc" is the id "abc".
    raw = '{"task": "square", "args": [3], "id": "\\u0061bc"}'
    r.lpush("prioqd:queue:normal", raw)
    r.lpush("prioqd:queue:normal", '[' * 5000 + ']' * 5000)  # no object; too deep to parse
    assert client.job("abc").status() == "queued"
    assert client.job("abc").cancel() is True
    assert r.lrange("prioqd:queue:normal", 0, -1) == [b"[" * 5000 + b"]" * 5000]
    assert r.hget("prioqd:job:abc", "status") == b"cancelled"


# --- against daemons ---------------------------------------------------------------


def test_sync_client_gets_results(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config()
    daemon(cfg)
    with Client.from_config(cfg) as client:
        handle = client.enqueue(square, 7)
        assert handle.result(timeout_s=30) == 49
        assert handle.status() == "succeeded"
        # The outcome stays for every waiter: the same handle, or another one.
        assert handle.result(timeout_s=1) == 49
        assert client.job(handle.id).result(timeout_s=1) == 49
        assert r.llen(f"prioqd:done:{handle.id}") == 1
        by_name = client.enqueue("echo", [1, 2], k="v", priority="high")
        assert by_name.result(timeout_s=30) == {"args": [[1, 2]], "kwargs": {"k": "v"}}
        assert client.enqueue(async_square, 1.5).result(timeout_s=30) == 2.25  # awaited
        assert client.enqueue(square, 1).progress() is None  # never reported
        steps = client.enqueue("progressing", 20, 100)
        first = wait_for(steps.progress, 20, 0.05, what="progress")
        assert first["of"] == 20 and 1 <= first["done"] < 20
        assert steps.result(timeout_s=30) == 20 and steps.progress() == {"done": 20, "of": 20}
        outcome = client.enqueue(square, 3).outcome(timeout_s=30)
        assert (outcome["status"], outcome["result"], outcome["attempts"]) == ("succeeded", 9, 1)


def test_async_client_gets_results(
    r: redis.Redis, config: Config, daemon: Daemon, redis_server: RedisServer
) -> None:
    daemon(config())

    async def main() -> None:
        async with AsyncClient(redis_server.url, prefix="prioqd") as client:
            handles = [await client.enqueue(square, i) for i in range(8)]
            results = await asyncio.gather(*(h.result(timeout_s=30) for h in handles))
            assert results == [i * i for i in range(8)]
            assert await handles[0].status() == "succeeded"
            high = await client.options(priority="high", id="a-1").enqueue(square, 5)
            assert (high.id, await high.result(timeout_s=30)) == ("a-1", 25)
            failing = await client.enqueue("fail", "async boom", max_retries=0)
            with pytest.raises(JobFailed) as info:
                await failing.result(timeout_s=30)
            assert info.value.error == "RuntimeError: async boom"
            assert "RuntimeError: async boom" in (info.value.traceback or "")
            slow = await client.enqueue("nap", 60_000)
            for _ in range(400):
                if await slow.status() == "running":
                    break
                await asyncio.sleep(0.05)
            assert await slow.cancel() is True
            with pytest.raises(JobFailed, match="cancelled"):
                await slow.result(timeout_s=5)
            with pytest.raises(TimeoutError):
                await (await client.enqueue("nap", 5000)).result(timeout_s=0.3)

    asyncio.run(main())


#: A client whose sockets time out after 0.3 s waits for an outcome in slices of
#: 0.15 s (a blocking read must end before its socket's timeout): a job of a second
#: outlives several of them.
SHORT_SOCKET_TIMEOUT_S = 0.3


@pytest.mark.timeout(60)  # a wait that never returns fails here, not after 300 s
def test_result_and_outcome_without_a_timeout_wait_for_the_job_to_end(
    r: redis.Redis, config: Config, daemon: Daemon, redis_server: RedisServer
) -> None:
    """``result()`` and ``outcome()`` with no timeout (the default) on jobs that have
    not ended: each waits, across many slices of its blocking read, and returns the
    job's outcome once it has ended; never ``None``, ``TimeoutError`` or early."""
    daemon(config())
    with Client(redis_server.url, socket_timeout_s=SHORT_SOCKET_TIMEOUT_S) as client:
        first = client.enqueue("nap", 1000, "first")
        second = client.enqueue("nap", 1600, "second")
        wait_for(lambda: first.status() == "running", 20, 0.02, what="the first job to run")
        t0 = time.monotonic()
        assert first.result() == "first"
        assert r.hget(f"prioqd:job:{first.id}", "status") == b"succeeded"
        assert second.status() == "running"  # not ended: the next wait has to wait
        outcome = second.outcome()
        waited = time.monotonic() - t0
        assert (outcome["id"], outcome["status"], outcome["result"]) == (
            second.id, "succeeded", "second",
        )  # fmt: skip
        assert r.hget(f"prioqd:job:{second.id}", "status") == b"succeeded"
        # Many 0.15 s slices: a wait that gave up after one would have returned by now.
        assert waited >= 0.9, waited


@pytest.mark.timeout(60)
def test_async_result_and_outcome_without_a_timeout_wait_for_the_job_to_end(
    r: redis.Redis, config: Config, daemon: Daemon, redis_server: RedisServer
) -> None:
    """As above, for ``AsyncJobHandle``: two waits with no timeout at once."""
    daemon(config())

    async def main() -> None:
        async with AsyncClient(redis_server.url, socket_timeout_s=SHORT_SOCKET_TIMEOUT_S) as client:
            first = await client.enqueue("nap", 1000, "first")
            second = await client.enqueue("nap", 1600, "second")
            for _ in range(400):
                if await first.status() == "running":
                    break
                await asyncio.sleep(0.02)
            assert await second.status() in ("queued", "running")  # not ended
            t0 = time.monotonic()
            result, outcome = await asyncio.gather(first.result(), second.outcome())
            waited = time.monotonic() - t0
            assert result == "first"
            assert (outcome["id"], outcome["status"], outcome["result"]) == (
                second.id, "succeeded", "second",
            )  # fmt: skip
            assert await first.status() == await second.status() == "succeeded"
            assert waited >= 0.9, waited

    asyncio.run(main())


def test_failing_task_raises_job_failed_with_the_traceback(
    r: redis.Redis, client: Client, config: Config, daemon: Daemon
) -> None:
    daemon(config())
    handle = client.enqueue("fail", "boom", max_retries=0)
    with pytest.raises(JobFailed) as info:
        handle.result(timeout_s=30)
    failed = info.value
    assert (failed.job_id, failed.status, failed.error) == (handle.id, "dead", "RuntimeError: boom")
    assert str(failed) == f"job {handle.id} dead: RuntimeError: boom"
    assert failed.traceback is not None
    assert failed.traceback.startswith("Traceback (most recent call last)")
    assert "examples.py" in failed.traceback and "RuntimeError: boom" in failed.traceback
    assert any("RuntimeError: boom" in note for note in failed.__notes__)  # printed if uncaught
    assert failed.outcome["status"] == "dead" and failed.outcome["attempts"] == 1
    # Arguments the task's signature refuses: dead without running, so no traceback.
    with pytest.raises(JobFailed) as info:
        client.enqueue("square", 1, 2, 3).result(timeout_s=30)
    assert info.value.status == "dead" and info.value.traceback is None


def test_cancel_running_and_scheduled_jobs(
    r: redis.Redis, client: Client, config: Config, daemon: Daemon
) -> None:
    daemon(config())
    running = client.enqueue("nap", 60_000)
    wait_for(lambda: running.status() == "running", 20, 0.05, what="the job to run")
    t0 = time.monotonic()
    assert running.cancel() is True
    assert time.monotonic() - t0 < 5
    with pytest.raises(JobFailed) as info:
        running.result(timeout_s=5)
    assert info.value.status == "cancelled"

    later = client.enqueue("square", 2, delay_s=120)
    wait_for(lambda: later.status() == "scheduled", 20, 0.05, what="the job to be scheduled")
    assert later.cancel() is True
    assert r.zcard("prioqd:scheduled") == 0
    with pytest.raises(JobFailed, match="cancelled while scheduled"):
        later.result(timeout_s=5)

    done = client.enqueue(square, 2)
    assert done.result(timeout_s=30) == 4
    assert done.cancel() is False


def test_unique_job_runs_once_across_two_daemons(
    r: redis.Redis, client: Client, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = config()
    daemon(cfg)
    daemon(cfg)
    runs = tmp_path / "runs.txt"
    first = client.enqueue("logrun", str(runs), "first", 1500, id="report-7", unique=True)
    wait_for(lambda: first.status() == "running", 20, 0.02, what="the unique job to run")
    second = client.enqueue("logrun", str(runs), "second", 0, id="report-7", unique=True)
    assert (first.duplicate, second.duplicate, second.id) == (False, True, "report-7")
    # Another producer: the CLI, in its own process, waits for the live job's outcome.
    cli = prioqd(
        "submit", "--config", str(cfg), "logrun", str(runs), "third", "0",
        "--id", "report-7", "--unique", "--wait", "--wait-timeout-s", "30",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "duplicate: unique job report-7 is already queued or running" in cli.stderr
    assert cli.stdout.startswith("report-7\n")
    assert json.loads(cli.stdout.split("\n", 1)[1])["result"] == "first"
    assert first.result(timeout_s=30) == "first" and second.result(timeout_s=30) == "first"
    assert runs.read_text().splitlines() == ["first"]
    # Once it has ended, the id may run again.
    again = client.enqueue("logrun", str(runs), "again", 0, id="report-7", unique=True)
    assert not again.duplicate and again.result(timeout_s=30) == "again"
    assert runs.read_text().splitlines() == ["first", "again"]


def test_client_around_an_existing_redis_client(
    r: redis.Redis, config: Config, daemon: Daemon, redis_server: RedisServer
) -> None:
    """A redis.Redis of the caller's (here one that decodes replies to str) is used as
    it is, and not closed with the prioqd client."""
    daemon(config())
    mine = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    client = Client(redis=mine, prefix="prioqd")
    handle = client.enqueue("square", 9)
    assert handle.result(timeout_s=30) == 81 and handle.status() == "succeeded"
    # No daemon serves this prefix: the job waits, and is found and cancelled by id.
    other = Client(redis=mine, prefix="elsewhere")
    waiting = other.enqueue("square", 1)
    assert other.job(waiting.id).status() == "queued"
    assert other.job(waiting.id).cancel() is True
    assert r.llen("elsewhere:queue:normal") == 0
    client.close()
    other.close()
    assert mine.ping() is True
    mine.close()


def test_password_as_the_daemon_gets_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        server.client().config_set("requirepass", "pw-123")
        admin = server.client(password="pw-123")
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        monkeypatch.delenv("PRIOQD_REDIS_PASSWORD", raising=False)
        with pytest.raises(BrokerError, match=r"(?i)auth"):
            Client(server.url).enqueue("square", 1)

        monkeypatch.setenv("PRIOQD_REDIS_PASSWORD", "pw-123")
        Client(server.url).enqueue("square", 1)
        assert admin.llen("prioqd:queue:normal") == 1

        monkeypatch.delenv("PRIOQD_REDIS_PASSWORD")
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "redis-password").write_text("pw-123\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        cfg = tmp_path / "prioqd.toml"
        cfg.write_text(f'[redis]\nurl = "{server.url}"\n[queues]\npriorities = ["only"]\n')
        with Client.from_config(cfg) as client:
            assert client.priorities == ("only",)
            client.enqueue("square", 2)
        assert admin.llen("prioqd:queue:only") == 1
    finally:
        server.stop()


# --- typing ------------------------------------------------------------------------------


def test_mypy_flags_wrong_arguments_to_a_task_function() -> None:
    """``mypy --strict`` over two example producers: the correct one passes, and the
    wrong one is flagged on exactly the lines marked ``# E`` (wrong argument types and
    counts for a @task function, options given the wrong way, the result's type)."""
    ok, bad = TYPECHECK / "producer_ok.py", TYPECHECK / "producer_bad.py"
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--show-error-codes",
         "--no-incremental", str(ok), str(bad)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    errors = [line for line in out.stdout.splitlines() if ": error: " in line]
    assert errors, out.stdout + out.stderr
    assert not [e for e in errors if ok.name in e], out.stdout
    flagged = {int(e.split(":")[1]) for e in errors if bad.name in e}
    marked = {n for n, line in enumerate(bad.read_text().splitlines(), 1) if line.endswith("# E")}
    assert flagged == marked, out.stdout
    assert any('"Task[[int], int]", "str"' in e for e in errors), out.stdout
