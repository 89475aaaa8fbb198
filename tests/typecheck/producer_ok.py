"""Correct uses of the client that mypy --strict must accept (tests/test_client.py
type-checks this file; it is never run)."""

from __future__ import annotations

from typing import Any

from prioqd import AsyncClient, AsyncJobHandle, Client, JobHandle, task


@task
def square(x: int) -> int:
    return x * x


@task(name="pages.fetch")
async def fetch(url: str, *, retries: int = 0) -> bytes:
    return b""


@task
def takes_priority(priority: int) -> int:
    return priority


def produce(client: Client) -> None:
    handle: JobHandle[int] = client.enqueue(square, 7)
    n: int = handle.result(timeout_s=5)
    m: int = client.options(priority="high", id="sq-7", unique=True).enqueue(square, x=7).result()
    body: bytes = client.enqueue(fetch, "https://example.org", retries=2).result()
    p: int = client.enqueue(takes_priority, priority=3).result()
    anything: Any = client.enqueue("square", 7, priority="high", id="sq-8", delay_s=1.5).result()
    client.options(timeout_s=60, meta={"who": "me"}).enqueue("echo", priority=1)
    status: str = handle.status()
    progress: object = handle.progress()
    cancelled: bool = handle.cancel(wait_s=1)
    outcome: dict[str, Any] = handle.outcome(timeout_s=1)
    again: JobHandle[Any] = client.job(handle.id)
    print(n, m, body, p, anything, status, progress, cancelled, outcome, again, square(3))


async def produce_async(client: AsyncClient) -> None:
    handle: AsyncJobHandle[int] = await client.enqueue(square, 7)
    n: int = await handle.result(timeout_s=5)
    body: bytes = await (await client.enqueue(fetch, "https://example.org")).result()
    high = await client.options(priority="high").enqueue(square, 8)
    status: str = await high.status()
    print(n, body, status, await high.cancel())


def from_config() -> None:
    with Client.from_config("/etc/prioqd/config.toml") as client:
        client.enqueue(square, 1)
