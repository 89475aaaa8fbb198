"""The benchmark's own tasks, loaded by every daemon it starts (``[tasks] modules``).

They live here, not in ``prioqd.examples``, so that ``bench/run.py --rev REV`` runs
the very same task bodies whatever revision of prioqd it measures: a change to the
examples must not read as a change of the daemon.
"""

from __future__ import annotations

import time

from prioqd import task


@task
def square(x: float) -> float:
    """The trivial job: no system call, nothing but the multiplication."""
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
