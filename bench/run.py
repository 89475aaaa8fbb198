"""prioqd benchmark: one command, a table of figures.

    make bench                 # or: .venv/bin/python bench/run.py [--only W1,W5]

Starts a throwaway redis-server on a free loopback port (never the shared one) and
the daemon as a real ``prioqd run`` process with the default configuration (only
the Redis URL and the log level differ), exactly as a user runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path) -> Iterator[redis.Redis]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    try:
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


class Daemon:
    def __init__(self, client: redis.Redis, workdir: Path, **sections: dict[str, Any]) -> None:
        port = client.connection_pool.connection_kwargs["port"]
        cfg: dict[str, dict[str, Any]] = {
            "redis": {"url": f"redis://127.0.0.1:{port}/0"},
            "log": {"level": "warning", "format": "json"},
        }
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        path = workdir / "bench.toml"
        path.write_text(
            "\n".join(
                f"[{t}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in kv.items())
                for t, kv in cfg.items()
            )
        )
        self.client = client
        self.log = open(workdir / "daemon.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prioqd.cli", "run", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> float:
        """Block until the daemon is registered in Redis; returns that moment."""
        while not self.client.zcard("prioqd:daemons"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.name}")
            time.sleep(0.002)
        return time.time()

    def pids(self) -> list[int]:
        import psutil

        p = psutil.Process(self.proc.pid)
        return [p.pid] + [c.pid for c in p.children(recursive=True)]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def push_many(client: redis.Redis, priority: str, jobs: list[dict[str, Any]]) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(jobs), 1000):
        pipe.lpush(f"prioqd:queue:{priority}", *(json.dumps(j) for j in jobs[i : i + 1000]))
    pipe.execute()


def count_outcomes(client: redis.Redis, n: int, ready: threading.Event) -> Callable[[], float]:
    """Subscribe to the outcome channel; the returned callable waits for ``n`` outcomes
    and returns the time the last one arrived."""
    pubsub = client.pubsub()
    pubsub.subscribe("prioqd:events")
    result: dict[str, float] = {}

    def listen() -> None:
        seen = 0
        ready.set()
        for msg in pubsub.listen():
            if msg["type"] == "message":
                seen += 1
                if seen >= n:
                    result["t"] = time.time()
                    break
        pubsub.close()

    t = threading.Thread(target=listen, daemon=True)
    t.start()

    def wait() -> float:
        t.join(600)
        return result["t"]

    return wait


def w1_throughput(workdir: Path, jobs_n: int = 5000, backlog: int = 0, levels: int = 3) -> float:
    """Jobs/s for ``jobs_n`` trivial jobs queued before the daemon starts."""
    priorities = [f"p{i}" for i in range(levels)] if levels != 3 else ["high", "normal", "low"]
    with redis_server(workdir) as client:
        low = priorities[-1]
        if backlog:
            # The backlog sits at a lower priority than nothing: same queue, behind.
            filler = [{"id": f"b{i}", "task": "square", "args": [i]} for i in range(backlog)]
            push_many(client, low, filler)
        measured = [{"id": f"w{i}", "task": "square", "args": [i]} for i in range(jobs_n)]
        # The measured jobs go to the head (right end) of the queue: RPUSH.
        pipe = client.pipeline(transaction=False)
        for i in range(0, jobs_n, 1000):
            pipe.rpush(
                f"prioqd:queue:{low}", *(json.dumps(j) for j in reversed(measured[i : i + 1000]))
            )
        pipe.execute()
        ready = threading.Event()
        wait = count_outcomes(client, jobs_n, ready)
        ready.wait()
        daemon = Daemon(client, workdir, queues={"priorities": priorities})
        try:
            start = daemon.wait_ready()
            end = wait()
        finally:
            daemon.stop()
        return jobs_n / (end - start)


def w5_pickup(workdir: Path, n: int = 200, every_s: float = 0.01) -> tuple[float, float]:
    """Push one trivial job every 10 ms to an idle daemon: push-to-start p50, p99 (ms)."""
    with redis_server(workdir) as client:
        daemon = Daemon(client, workdir)
        try:
            daemon.wait_ready()
            time.sleep(1.0)
            pushed: dict[str, float] = {}
            for i in range(n):
                job_id = f"l{i}"
                pushed[job_id] = time.time()
                client.lpush(
                    "prioqd:queue:normal", json.dumps({"id": job_id, "task": "square", "args": [i]})
                )
                time.sleep(every_s)
            lat = []
            deadline = time.time() + 30
            for job_id, t in pushed.items():
                while True:
                    started = client.hget(f"prioqd:job:{job_id}", "started_at")
                    if started or time.time() > deadline:
                        break
                    time.sleep(0.01)
                lat.append((float(started) - t) * 1000)  # type: ignore[arg-type]
        finally:
            daemon.stop()
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def _noop() -> None:
    return None


def ceiling(n: int = 5000) -> float:
    """Raw ProcessPoolExecutor round trips/s of a no-op, no Redis: the one-job-per-call bound."""
    import asyncio

    async def run() -> float:
        loop = asyncio.get_running_loop()
        workers = os.cpu_count() or 1
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("forkserver")
        ) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, _noop) for _ in range(workers * 4)))
            sem = asyncio.Semaphore(workers)

            async def one() -> None:
                async with sem:
                    await loop.run_in_executor(pool, _noop)

            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return n / (time.perf_counter() - t)

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W5")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is required", file=sys.stderr)
        return 1
    only = set(args.only.upper().split(",")) if args.only else None
    rows: list[tuple[str, str, str]] = []

    def want(name: str) -> bool:
        return only is None or name in only

    with tempfile.TemporaryDirectory(prefix="prioqd-bench-") as tmp:
        work = Path(tmp)
        ceil = None
        if want("CEILING") or want("W1"):
            ceil = ceiling()
            rows.append(("ceiling", "raw run_in_executor no-op round trips/s", f"{ceil:,.0f}"))
        if want("W1"):
            w1 = w1_throughput(work)
            frac = f" ({w1 / ceil:.2f} of ceiling)" if ceil else ""
            rows.append(("W1", "5,000 trivial jobs, jobs/s", f"{w1:,.0f}{frac}"))
        if want("W5"):
            p50, p99 = w5_pickup(work)
            rows.append(
                ("W5", "pickup latency push->start, p50 / p99 ms", f"{p50:.2f} / {p99:.2f}")
            )

    print(f"\nprioqd benchmark on {platform.node()} ({os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {platform.machine()})")  # fmt: skip
    width = max(len(r[1]) for r in rows)
    print(f"{'':<8} {'workload':<{width}}  result")
    for name, what, value in rows:
        print(f"{name:<8} {what:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
