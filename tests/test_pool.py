"""The worker pool on its own, with real worker processes and no Redis: what it does
with batches that wait for a worker when a higher one arrives."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from helpers import env_with_taskmods

from prioqd import jobs
from prioqd.pool import Pool


def job(job_id: str, task: str, *args: object) -> jobs.Job:
    raw = json.dumps({"id": job_id, "task": task, "args": list(args)}).encode()
    parsed = jobs.parse(
        raw, "normal", known_tasks={"nap"}, max_payload_bytes=1 << 20, now=time.time()
    )
    assert isinstance(parsed, jobs.Job), parsed
    return parsed


def on_one_worker(
    monkeypatch: pytest.MonkeyPatch, scenario: Callable[[Pool], Awaitable[tuple[str, str]]]
) -> tuple[str, str]:
    """Run ``scenario`` against a started pool of one worker (the test task modules),
    closed afterwards."""
    monkeypatch.setenv("PYTHONPATH", env_with_taskmods()["PYTHONPATH"])

    async def run() -> tuple[str, str]:
        pool = Pool(1, ["testtasks"], default_timeout_s=10)
        await pool.start()
        try:
            return await scenario(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def test_a_higher_batch_on_a_free_worker_sends_back_the_lower_ones_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lower batch can wait beside a free worker: the daemon held it back because a
    # higher reply was arriving (Watch.may_start). When the higher batch comes and takes
    # that worker, the lower one goes back (not_run: the daemon requeues it, uncharged)
    # instead of running next, ahead of the rest of a higher burst still in Redis.
    async def scenario(pool: Pool) -> tuple[str, str]:
        pool.may_start = lambda rank: rank == 0  # a higher job is on its way
        (low,) = pool.submit([job("lo", "nap", 1)], rank=2)
        (high,) = pool.submit([job("hi", "nap", 1)], rank=0)
        ran = await asyncio.wait_for(high, 10)
        pool.may_start = lambda rank: True  # arrived: the pool looks again soon
        back = await asyncio.wait_for(low, 10)
        return back.status, ran.status

    assert on_one_worker(monkeypatch, scenario) == ("not_run", "ok")


def test_a_lower_job_still_on_its_way_to_its_worker_is_handed_back_for_a_higher_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lower job is sent to the worker, but the worker has not read it yet (stopped
    # here with SIGSTOP; in life, the microseconds a pipe takes) when a higher job
    # arrives. The worker checks the hand-back range before the first job of a batch
    # too: the lower job comes back unstarted and the higher one runs first.
    async def scenario(pool: Pool) -> tuple[str, str]:
        first = job("first", "nap", 1)
        (done,) = pool.submit([first], rank=2)
        await asyncio.wait_for(done, 10)
        os.kill(first.worker_pid, signal.SIGSTOP)
        try:
            (low,) = pool.submit([job("lo", "nap", 1)], rank=2)
            (high,) = pool.submit([job("hi", "nap", 1)], rank=0)
        finally:
            os.kill(first.worker_pid, signal.SIGCONT)
        back, ran = await asyncio.wait_for(asyncio.gather(low, high), 10)
        return back.status, ran.status

    assert on_one_worker(monkeypatch, scenario) == ("not_run", "ok")
