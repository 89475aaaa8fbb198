"""Wrong uses of the client that mypy --strict must flag, each on the line marked
"# E" (tests/test_client.py type-checks this file; it is never run)."""

from __future__ import annotations

from prioqd import AsyncClient, Client, task


@task
def square(x: int) -> int:
    return x * x


@task
async def fetch(url: str) -> bytes:
    return b""


def plain(x: int) -> int:
    return x


def produce(client: Client) -> None:
    client.enqueue(square, "not an int")  # E
    client.enqueue(square)  # E
    client.enqueue(square, 1, 2)  # E
    client.enqueue(square, y=1)  # E
    client.enqueue(square, 7, priority="high")  # E
    client.options(priority="high").enqueue(square, "7")  # E
    client.enqueue(fetch, 1)  # E
    client.enqueue(plain, 1)  # E
    client.enqueue("square", 1, priority=1)  # E
    client.options(priority=1)  # E
    wrong: str = client.enqueue(square, 7).result()  # E
    awaited: str = client.enqueue(fetch, "https://example.org").result()  # E
    print(wrong, awaited)


async def produce_async(client: AsyncClient) -> None:
    await client.enqueue(square, "7")  # E
    wrong: str = await (await client.enqueue(square, 7)).result()  # E
    print(wrong)
