"""The task bodies every system of the peers benchmark runs: the very same functions,
wrapped by each system's own decorator (see ``peer_*.py``).

Standard library only: this module is imported by prioqd's workers and by the
workers of every peer, each in its own venv.

Each body takes ``time.time()`` as its first statement (the job's start, on the
worker's clock) and, as its last, appends one line ``<id> <start> <end> <pid>`` to
the file named by ``$PEERBENCH_MARKS`` (O_APPEND: one ``write`` per line, so lines
from several processes never interleave). The benchmark reads that file: the same
start and end marks for every system, whatever its own bookkeeping.
"""

from __future__ import annotations

import os
import sys
import time

MARKS_ENV = "PEERBENCH_MARKS"

_fd = -1
_fd_pid = 0


def _mark(job_id: str, started: float) -> None:
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd_pid != pid:  # first job of this process (or of a fork)
        _fd = os.open(os.environ[MARKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fd_pid = pid
    os.write(_fd, f"{job_id} {started:.6f} {time.time():.6f} {pid}\n".encode())


def trivial(job_id: str) -> None:
    """A job that does nothing but mark its start and end."""
    started = time.time()
    _mark(job_id, started)


def burn(job_id: str, iters: int) -> None:
    """CPU-bound pure Python: ``iters`` loop iterations (calibrated by the benchmark,
    one count for every system), then the marks."""
    started = time.time()
    x = 0
    for i in range(iters):
        x ^= i  # stays below 2**30: the same cost per iteration for any count
    _mark(job_id, started)


def calibrate(iters: int = 20_000, runs: int = 300) -> float:
    """Iterations of ``burn`` per millisecond in this process: the fastest of ``runs``
    timed calls of ``burn`` itself (its marks go to /dev/null). Many short calls (about
    0.4 ms each, well inside a scheduler time slice), so that on a busy shared machine
    some of them still run unpreempted and the burns are not made shorter than meant."""
    os.environ[MARKS_ENV] = os.devnull
    best = float("inf")
    for k in range(runs):
        t = time.perf_counter()
        burn(f"calibrate{k}", iters)
        best = min(best, time.perf_counter() - t)
    return iters / (best * 1000)


def bare(prefix: str, first: int, n: int, iters: int, start_at: float) -> None:
    """The bare ceiling: burns run one after another by this plain process, no queue;
    jobs ``prefix-{first}`` .. ``prefix-{first + n - 1}``, from ``start_at`` (wall)."""
    while (left := start_at - time.time()) > 0:
        time.sleep(min(left, 0.01))
    for k in range(first, first + n):
        burn(f"{prefix}-{k}", iters)


if __name__ == "__main__":
    # python peerbench_common.py calibrate
    # python peerbench_common.py bare PREFIX FIRST N ITERS START_AT
    if sys.argv[1:] == ["calibrate"]:
        print(f"{calibrate():.3f}")
    elif len(sys.argv) == 7 and sys.argv[1] == "bare":
        bare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    else:
        sys.exit("usage: peerbench_common.py calibrate | bare PREFIX FIRST N ITERS START_AT")
