"""Tasks the tests run: misbehaving ones included."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

from prioqd import task


@task
def nap(ms: float, tag: object = None) -> object:
    time.sleep(ms / 1000)
    return tag


@task
def held_once(path: str, delay_s: float) -> None:
    """Sleeps ``delay_s``. If ``path`` exists, the first run to see it takes it (renames
    it to ``<path>.held``) and runs on until the test removes that file: one job of a
    run held in the middle, the rest of its batch waiting behind it in the worker."""
    held = f"{path}.held"
    try:
        os.rename(path, held)
    except FileNotFoundError:
        pass
    else:
        while os.path.exists(held):
            time.sleep(0.001)
    time.sleep(delay_s)


@task(name="custom.name")
def renamed() -> str:
    return "renamed"


@task
def crash(code: int = 13) -> None:
    os._exit(code)


@task
def segfault() -> None:
    ctypes.string_at(0)


@task
def spin(seconds: float = 3600.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@task
def flaky(counter_path: str, failures: int) -> int:
    """Fails the first ``failures`` calls (counted in a file), then succeeds."""
    path = Path(counter_path)
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    if n < failures:
        raise ValueError(f"flaky failure {n + 1}")
    return n + 1


@task
def unserialisable() -> object:
    return object()


@task
def pid() -> int:
    return os.getpid()


@task
def selfkill() -> None:
    """Dies the way the OOM killer kills: SIGKILL."""
    os.kill(os.getpid(), 9)


@task
def logrun(path: str, tag: str, ms: float = 0.0) -> str:
    """Appends ``tag`` to ``path`` (one O_APPEND write, so runs can be counted), then naps."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    if ms:
        time.sleep(ms / 1000)
    return tag


@task
def whoami() -> dict[str, object]:
    """The job's own context, as the task sees it."""
    from dataclasses import asdict

    from prioqd import current_job

    return asdict(current_job())


@task
def progressing(steps: int, ms: float) -> int:
    """Reports progress on every step; the daemon writes at most two a second."""
    from prioqd import set_progress

    for i in range(1, steps + 1):
        set_progress({"done": i, "of": steps})
        time.sleep(ms / 1000)
    return steps


@task
async def async_square(x: float, delay_s: float = 0.0) -> float:
    import asyncio

    from prioqd import current_job

    await asyncio.sleep(delay_s)
    assert current_job().task == "async_square"
    return x * x


@task
async def async_fail(message: str) -> None:
    import asyncio

    await asyncio.sleep(0)
    raise RuntimeError(message)


@task
async def async_flaky(counter_path: str, failures: int) -> int:
    return flaky(counter_path, failures)


@task
def shout(text: str) -> str:
    """Prints to stdout and to stderr: both must reach the daemon's stderr."""
    print(f"stdout says {text}", flush=True)
    print(f"stderr says {text}", file=sys.stderr, flush=True)
    return text


@task
def napping_pid(ms: float = 0.0) -> int:
    """Naps, then returns the pid of the worker that ran it."""
    time.sleep(ms / 1000)
    return os.getpid()


@task
def logjob(path: str) -> str:
    """Appends the running job's own id to ``path`` (one O_APPEND write)."""
    from prioqd import current_job

    job_id = current_job().id
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job_id}\n".encode())
    finally:
        os.close(fd)
    return job_id


@task
def kill_my_daemon(path: str, tag: str, ms: float = 0.0) -> None:
    """Appends ``tag`` to ``path``, naps, then SIGKILLs the daemon running it."""
    import signal

    logrun(path, tag, ms)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


@task
async def async_crash(code: int = 13) -> None:
    """Kills its worker from inside the event loop."""
    import asyncio

    await asyncio.sleep(0)
    os._exit(code)


@task
async def async_nap_pid(path: str, seconds: float) -> int:
    """Writes its worker's pid to ``path``, then sleeps on the event loop."""
    import asyncio

    logrun(path, str(os.getpid()))
    await asyncio.sleep(seconds)
    return os.getpid()


#: Strong references to the tasks ``async_leaky`` starts (the loop keeps weak ones).
_left_running: set[object] = set()


@task
async def async_leaky(path: str, ms: float) -> str:
    """Starts a task it never awaits, which would append ``late:<job id>`` to ``path``
    ``ms`` later (``cancelled`` if it is cancelled first), and returns at once."""
    import asyncio

    from prioqd import current_job

    async def later() -> None:
        try:
            await asyncio.sleep(ms / 1000)
        except asyncio.CancelledError:
            logrun(path, "cancelled")
            raise
        logrun(path, f"late:{current_job().id}")

    _left_running.add(asyncio.get_running_loop().create_task(later()))
    return "started"


@task
def progress_spam(seconds: float) -> int:
    """Reports progress as fast as it can for ``seconds``, then a last value at once
    (throttled: it must arrive all the same); returns how many calls it made."""
    from prioqd import set_progress

    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        n += 1
        set_progress({"calls": n})
    set_progress({"calls": n, "last": True})
    return n
