"""Example tasks, loaded by the default configuration and used by the demo.

``square`` is the classic job from prioqd's origin: square a number after a delay.
``burn_cpu`` keeps a core busy in pure Python, for benchmarks and slot tests.
"""

from __future__ import annotations

import os
import time

from prioqd import task

#: Seconds ``square`` sleeps before answering when the job gives no ``delay_s``
#: argument; the demo sets it through the environment.
SQUARE_DELAY_S = float(os.environ.get("PRIOQD_SQUARE_DELAY_S", "0"))


@task
def square(x: float, delay_s: float | None = None) -> float:
    delay = SQUARE_DELAY_S if delay_s is None else delay_s
    if delay != 0:  # (sleep(0) is a system call: tens of microseconds of timer slack)
        time.sleep(delay)
    return x * x


@task
def burn_cpu(ms: float) -> int:
    """Spin for ``ms`` milliseconds of CPU time; returns the loop count."""
    deadline = time.process_time() + ms / 1000
    n = 0
    while time.process_time() < deadline:
        n += 1
    return n


@task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task
def fail(message: str = "failed on purpose") -> None:
    raise RuntimeError(message)


@task
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}
