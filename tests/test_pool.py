"""The worker pool on its own, with real worker processes and no Redis: what it does
with batches that wait for a worker when a higher one arrives."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest
from helpers import env_with_taskmods

from prioqd import jobs
from prioqd.pool import Pool


def job(job_id: str, task: str, *args: object, timeout_s: float | None = None) -> jobs.Job:
    fields = {"id": job_id, "task": task, "args": list(args)}
    if timeout_s is not None:
        fields["timeout_s"] = timeout_s
    raw = json.dumps(fields).encode()
    parsed = jobs.parse(
        raw, "normal", known_tasks={"nap", "crash"}, max_payload_bytes=1 << 20, now=time.time()
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


def test_short_batches_waiting_for_a_worker_go_to_it_at_once_and_run_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A burst of higher jobs lands one by one while the worker is busy: each waits as a
    # batch of its own. When the worker frees, those the daemon calls short enough
    # (joinable) go to it in one write and run back to back, in the order they came.
    async def scenario(pool: Pool) -> tuple[str, str]:
        asked: list[list[str]] = []

        def joinable(batch: Sequence[jobs.Job]) -> bool:
            asked.append([j.id for j in batch])
            return len(batch) <= 3

        pool.joinable = joinable
        (busy,) = pool.submit([job("busy", "nap", 200)], rank=2)
        burst = [pool.submit([job(f"h{i}", "nap", 1, i)], rank=0)[0] for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(busy, *burst), 10)
        order = sorted(range(4), key=lambda i: results[1 + i].started_at)
        # Three joined the first (the fourth was refused), and all ran in order.
        return f"{order}", f"{asked}"

    assert on_one_worker(monkeypatch, scenario) == (
        "[0, 1, 2, 3]",
        "[['h0', 'h1'], ['h0', 'h1', 'h2'], ['h0', 'h1', 'h2', 'h3']]",
    )


def test_a_higher_job_gets_back_every_unstarted_job_of_batches_sent_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lower batches joined on their way to the worker (one write, several frames): a
    # higher job arriving while the first runs takes the worker next, and each joined
    # batch comes back unstarted (the worker hands back each frame's rest on its own).
    async def scenario(pool: Pool) -> tuple[str, str]:
        pool.joinable = lambda batch: True
        (busy,) = pool.submit([job("busy", "nap", 100)], rank=2)
        lows = [pool.submit([job(f"lo{i}", "nap", 200)], rank=2)[0] for i in range(3)]
        await asyncio.wait_for(busy, 10)  # the three went to the worker together
        await asyncio.sleep(0.05)  # the first of them is running
        (high,) = pool.submit([job("hi", "nap", 1)], rank=0)
        results = await asyncio.wait_for(asyncio.gather(*lows, high), 10)
        statuses = [r.status for r in results]
        ran_before_high = results[0].finished_at <= results[3].started_at
        return " ".join(statuses), f"lo0 ended before hi started: {ran_before_high}"

    assert on_one_worker(monkeypatch, scenario) == (
        "ok not_run not_run ok",
        "lo0 ended before hi started: True",
    )


def test_a_worker_dying_in_joined_batches_charges_its_job_and_gives_back_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Batches joined on their way to the worker, the second of which kills it: the
    # first ran, the one that crashed is charged, and every job behind it (in its
    # frame and in the frame after) comes back unrun, for the daemon to put back.
    async def scenario(pool: Pool) -> tuple[str, str]:
        pool.joinable = lambda batch: True
        (busy,) = pool.submit([job("busy", "nap", 100)], rank=0)
        joined = [
            *pool.submit([job("a", "nap", 1)], rank=0),
            *pool.submit([job("boom", "crash"), job("b", "nap", 1)], rank=0),
            *pool.submit([job("c", "nap", 1)], rank=0),
        ]
        results = await asyncio.wait_for(asyncio.gather(busy, *joined), 20)
        return " ".join(r.status for r in results), str(results[2].error)

    statuses, error = on_one_worker(monkeypatch, scenario)
    assert statuses == "ok ok crashed not_run not_run"
    assert "exited with code 13" in error


def test_a_job_timer_that_fires_while_its_worker_is_idle_kills_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The deadline timer is lazy: a job that ends before its timeout leaves it armed.
    # Firing with no job on the worker, it must leave the worker be.
    async def scenario(pool: Pool) -> tuple[str, str]:
        quick = job("quick", "nap", 1, timeout_s=0.3)
        (done,) = pool.submit([quick])
        first = await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.5)  # past quick's deadline, the worker idle meanwhile
        after = job("after", "nap", 1)
        (second,) = pool.submit([after])
        ran = await asyncio.wait_for(second, 10)
        same = after.worker_pid == quick.worker_pid and pool.pids == [quick.worker_pid]
        return f"{first.status} {ran.status}", f"same worker: {same}"

    assert on_one_worker(monkeypatch, scenario) == ("ok ok", "same worker: True")


def test_a_job_timer_firing_early_while_a_later_job_of_the_batch_runs_waits_for_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The timer armed for the first job of a batch (0.4 s) is kept for the next one,
    # whose deadline is later: it fires while that job runs, and must re-arm for the
    # job's own deadline instead of killing it. Then that deadline kills as usual.
    async def scenario(pool: Pool) -> tuple[str, str]:
        pool.joinable = lambda batch: True
        # 0.05 s, then 0.6 s of a 2 s timeout: the first job's timer fires at 0.4 s.
        fits = pool.submit([job("a", "nap", 50, timeout_s=0.4), job("b", "nap", 600, timeout_s=2)])
        a, b = await asyncio.wait_for(asyncio.gather(*fits), 10)
        # 0.05 s, then 3 s of a 0.8 s timeout: killed 0.8 s into its run, not at 0.4 s.
        over = pool.submit(
            [job("c", "nap", 50, timeout_s=0.4), job("d", "nap", 3000, timeout_s=0.8)]
        )
        c, d = await asyncio.wait_for(asyncio.gather(*over), 10)
        ran_s = d.finished_at - d.started_at
        return (
            f"{a.status} {b.status} {c.status} {d.status}: {d.error}",
            f"d ran 0.8 s or more: {ran_s >= 0.79} (and under 2 s: {ran_s < 2})",
        )

    assert on_one_worker(monkeypatch, scenario) == (
        "ok ok ok timeout: timed out after 0.8s",
        "d ran 0.8 s or more: True (and under 2 s: True)",
    )
