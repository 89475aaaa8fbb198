"""W2's floor: the shape of a lone job, with nothing of prioqd in it.

A bare uvloop process drives ``--workers`` worker processes (children of its own,
each burning ``--ms`` ms of CPU a job as ``benchtasks.burn_cpu`` does, or ``--iters``
loop iterations as the peers benchmark's burn does) and, for
every job, does what any asyncio daemon of prioqd's shape must do at the least:

- ``frames``: a pickled frame to a worker's pipe, and its result frame back;
- ``full``: that, plus one round trip to Redis (an EVALSHA of a one-line script,
  through redis.asyncio with hiredis) and two log lines (structlog, JSON by orjson,
  into a buffered file), as prioqd logs a job's start and end.

The next job goes to the worker as soon as its last result is read, before that
result's round trip and log lines: the worker never waits for them (prioqd claims a
lone job's successor ahead for the same reason). So this is a floor for the daemon's
CPU, and close to a ceiling for the efficiency, of any asyncio daemon of this shape.

It prints one JSON line: the CPU this process used per job (getrusage, its own
threads only) and the efficiency (n x ms / workers / wall time). Run by
``workloads.w2`` beside each prioqd run, so both are measured on the same machine at
the same moment: what the daemon costs beyond this is prioqd's own.

    python bench/w2floor.py --port 6399 --n 400 --ms 5 --workers 2 --mode full
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from typing import Any

_HEADER = struct.Struct("!I")

_WORKER = r"""
import os, pickle, struct, sys, time
H = struct.Struct("!I")
def read(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(0)
        b += c
    return b
def burn(ms, iters):
    # (In a function: the loop's names are locals, as in the burns it stands for.)
    if iters:  # the peers benchmark's burn (peerbench_common.burn)
        x = 0
        for i in range(iters):
            x ^= i
    else:  # benchtasks.burn_cpu's
        deadline = time.process_time() + ms / 1000
        while time.process_time() < deadline:
            pass
def main():
    while True:
        (n,) = H.unpack(read(4))
        ms, iters = pickle.loads(read(n))
        started = time.time()
        burn(ms, iters)
        out = pickle.dumps((started, time.time()))
        os.write(1, H.pack(len(out)) + out)
main()
"""


class _Frames(asyncio.Protocol):
    def __init__(self, on_frame: Any) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + n:
                break
            frame = pickle.loads(bytes(buf[_HEADER.size : _HEADER.size + n]))
            del buf[: _HEADER.size + n]
            self._on_frame(frame)


async def _run(
    port: int,
    n: int,
    ms: float,
    iters: int,
    procs: list[subprocess.Popen[bytes]],
    sink: Any,
    full: bool,
) -> dict[str, float]:
    import orjson
    import redis.asyncio as aredis
    import structlog

    workers = len(procs)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o)),
        ],
        logger_factory=structlog.BytesLoggerFactory(sink),
    )
    log = structlog.get_logger()
    loop = asyncio.get_running_loop()
    r = aredis.Redis(port=port)
    sha = await r.script_load("return 1")
    await r.evalsha(sha, 0)
    done = asyncio.Event()
    left, sent = [n], [0]
    pipes: list[asyncio.WriteTransport] = []
    tasks: set[asyncio.Task[None]] = set()

    def send(k: int) -> None:
        sent[0] += 1
        data = pickle.dumps((ms, iters))
        pipes[k].write(_HEADER.pack(len(data)) + data)

    async def ended(job: int, frame: tuple[float, float]) -> None:
        if full:
            await r.evalsha(sha, 0)
            log.info("job started", job_id=str(job), task="burn_cpu", queue="normal", attempt=1)
            log.info(
                "job finished", job_id=str(job), task="burn_cpu", queue="normal", attempt=1,
                outcome="succeeded", duration_s=round(frame[1] - frame[0], 6),
            )  # fmt: skip
        left[0] -= 1
        if not left[0]:
            done.set()

    for k, proc in enumerate(procs):
        assert proc.stdin is not None and proc.stdout is not None
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        pipes.append(transport)
        counter = iter(range(k, 10**9, workers))

        def on_frame(frame: Any, k: int = k, counter: Any = counter) -> None:
            # The next job goes first, the record of this one after: the best a
            # daemon of this shape can do (prioqd claims the next job ahead too).
            if sent[0] < n:
                send(k)
            task = loop.create_task(ended(next(counter), frame))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await loop.connect_read_pipe(functools.partial(_Frames, on_frame), proc.stdout)
    try:
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for k in range(min(workers, n)):
            send(k)
        await done.wait()
        after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        for pipe in pipes:
            pipe.close()
        await r.aclose()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_us": cpu / n * 1e6, "efficiency": n * ms / 1000 / workers / (t1 - t0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--iters", type=int, default=0, help="burn this many loop iterations a job, not --ms of CPU"
    )
    parser.add_argument("--mode", choices=["frames", "full"], default="full")
    args = parser.parse_args()
    import uvloop

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(args.workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
        with open(os.devnull, "wb", buffering=1 << 16) as sink:
            result = uvloop.run(
                _run(args.port, args.n, args.ms, args.iters, procs, sink, args.mode == "full")
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
