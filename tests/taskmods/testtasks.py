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


@task
async def async_whoami() -> dict[str, object]:
    """The job's own context, as an ``async def`` task sees it (after an await)."""
    import asyncio
    from dataclasses import asdict

    from prioqd import current_job

    await asyncio.sleep(0)
    return asdict(current_job())


@task
def progress_misuse() -> dict[str, str]:
    """Calls ``set_progress`` with values it refuses; returns what each call raised, by
    case. Then sends the largest value allowed (4096 bytes of JSON) and, within half a
    second, gives a value that is not JSON: a throttled call only keeps it, so it is
    found bad when the job ends (dropped, with a warning on stderr)."""
    import math

    from prioqd import set_progress

    cases: dict[str, object] = {
        "text": "50%",
        "bool": True,
        "list": [1, 2],
        "nan": math.nan,
        "inf": -math.inf,
        "not_json": {"when": object()},
        "nan_inside": {"x": math.nan},
        "too_big": {"pad": "x" * 5000},
    }
    got: dict[str, str] = {}
    for name, value in cases.items():
        try:
            set_progress(value)  # type: ignore[arg-type]
        except Exception as exc:
            got[name] = f"{type(exc).__name__}: {exc}"
        else:
            got[name] = "accepted"
    at_limit = {"pad": "x" * (4096 - len('{"pad":""}'))}
    while True:
        set_progress(at_limit)  # sent: no value was sent before (or over 0.5 s ago)
        try:
            set_progress({"last": object()})  # within 0.5 s: kept, not encoded
        except ValueError:
            continue  # over half a second between the two calls (a loaded machine)
        return got


#: Strong references to the tasks ``async_leaky_bad`` starts.
_left_failing: set[object] = set()


@task
async def async_leaky_bad() -> str:
    """Starts a task it never awaits, which raises RuntimeError (naming the job) instead
    of its cancellation when the worker cancels it at the job's end; returns at once."""
    import asyncio

    from prioqd import current_job

    job_id = current_job().id

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError(f"cleanup of {job_id} failed") from None

    _left_failing.add(asyncio.get_running_loop().create_task(stubborn()))
    await asyncio.sleep(0)  # it starts, and waits
    return "started"


@task
def raise_long(text: str, times: int) -> None:
    """Raises ValueError whose message is ``text`` repeated ``times`` times."""
    raise ValueError(text * times)
