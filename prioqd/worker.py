"""The worker process: runs the jobs the daemon sends it, one at a time.

Started by ``prioqd.pool`` as ``python -m prioqd.worker CMD_FD RESULT_FD AREA_FD MODULE...``.
A fresh interpreter (not a fork of the daemon, which holds an event loop and Redis
sockets) imports the task modules and then serves frames on two pipes:

    daemon -> worker   ("run", max_result_bytes, [(seq, task, args, kwargs, context), ...])
    worker -> daemon   ("ready", pid, [task names]) | ("error", message)
                       ("done", [(seq, status, result_json, error, traceback,
                                  started_at, finished_at)])
                       ("preempted", [seq, ...]) | ("progress", seq, json)

AREA_FD is 16 bytes of memory shared with the daemon: two seqs, lo and hi. Before
each job (the first of a batch included), the worker checks whether its seq lies in
[lo, hi]; if so, the daemon wants that job and the rest of the batch back (a
higher-priority job is waiting), and they are handed back unstarted ("preempted").
A shared word costs a few hundred nanoseconds a job; reading the command pipe
between jobs would cost a system call.

A frame is a 4-byte big-endian length and a pickle. EOF on the command pipe means
"exit". Each result is written before the next job starts: if a job kills the
worker, every job before it is already reported, and the one it was running is the
first unreported one, so exactly that job is charged. Only the standard library and
the task modules are imported here, so a respawn costs little.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import mmap
import os
import pickle
import signal
import struct
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

from prioqd import context

_HEADER = struct.Struct("!I")
_PREEMPT = struct.Struct("=qq")
#: A task's error text and traceback are copied into the outcome, the job hash, the
#: dead letter, the log and the cycle's arguments: a task that raises with a message
#: of megabytes (or a traceback through a huge repr) must not make them that large.
MAX_ERROR_BYTES = 4 * 1024
MAX_TRACEBACK_BYTES = 64 * 1024
#: A result's JSON: compact, UTF-8 kept as is, NaN refused. (Built once: json.dumps
#: with options builds an encoder at every call.)
_RESULT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_RESULT_JSON_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    if body is None:
        return None
    return pickle.loads(body)


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the daemon dies, so no orphan keeps burning
    CPU on a job whose result nobody will record (the job is recovered elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def _cancel_left_running(loop: Any) -> None:
    """Cancel the tasks a job started and left running, and wait for them to finish
    cancelling, as ``asyncio.run`` does: the loop serves the next job, and work of
    this one (with this job's context) must not carry on into it. One that raised
    something else than its cancellation is reported as ``asyncio.run`` would."""
    import asyncio

    left = asyncio.all_tasks(loop)
    if not left:
        return
    for t in left:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    for t in left:
        if not t.cancelled() and t.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception in a task the job left running",
                    "exception": t.exception(),
                    "task": t,
                }
            )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")  # (a lone surrogate stays visible)


def cap_error(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, saying so at its end."""
    if len(text) * 4 <= limit:  # (at most 4 bytes a character: most texts end here)
        return text
    data = _utf8(text)
    if len(data) <= limit:
        return text
    marker = f" [error text truncated: {len(data)} bytes, the first {limit} kept]"
    return data[:limit].decode("utf-8", "ignore") + marker


def cap_traceback(text: str, limit: int = MAX_TRACEBACK_BYTES) -> str:
    """A traceback cut to at most ``limit`` bytes of UTF-8: its first quarter (where
    it entered the task) and the rest from its end (where it was raised), with a
    line between them saying what was left out."""
    if len(text) * 4 <= limit:
        return text
    data = _utf8(text)
    if len(data) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    left_out = len(data) - head - tail
    marker = f"\n... [traceback truncated: {left_out} of {len(data)} bytes left out] ...\n"
    return data[:head].decode("utf-8", "ignore") + marker + data[-tail:].decode("utf-8", "ignore")


def _binds_first(fn: Callable[..., Any]) -> bool:
    """Whether a task's arguments must be bound before the call. A plain function
    (``def`` or ``async def``) raises TypeError for arguments that do not fit before its
    body runs, so binding only after a TypeError tells the same thing at no cost to the
    calls that succeed. Anything else (a wrapper whose signature is its inner
    function's, a callable object, a ``__signature__``) could run code, or swallow the
    error, before the mismatch shows: it is bound first."""
    plain = (
        isinstance(fn, types.FunctionType)
        and not hasattr(fn, "__wrapped__")
        and "__signature__" not in fn.__dict__
    )
    return not plain


class Runner:
    def __init__(
        self, tasks: dict[str, Callable[..., Any]], send: Callable[[Any], None] | None = None
    ) -> None:
        self.tasks = tasks
        self._send = send or (lambda frame: None)
        self._signatures: dict[str, inspect.Signature | None] = {}
        #: Tasks whose arguments are bound before the call (see ``_binds_first``).
        self._bind_first = {name for name, fn in tasks.items() if _binds_first(fn)}
        self._loop: Any = None

    def _await(self, awaitable: Any) -> Any:
        """Run an ``async def`` task to its end on this worker's own event loop (uvloop).
        A timeout or a cancel kills the whole process, as for a sync task."""
        if self._loop is None:
            import uvloop

            self._loop = uvloop.new_event_loop()
        try:
            return self._loop.run_until_complete(awaitable)
        finally:
            _cancel_left_running(self._loop)

    def _signature(self, name: str, fn: Callable[..., Any]) -> inspect.Signature | None:
        if name not in self._signatures:
            try:
                self._signatures[name] = inspect.signature(fn)
            except (TypeError, ValueError):
                self._signatures[name] = None
        return self._signatures[name]

    def _wrong_arguments(
        self, name: str, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> str:
        """Why the job's arguments do not fit the task's signature, or "" if they do
        (see ``_binds_first``): "the job's arguments are wrong" (no retry can help), not
        a TypeError raised inside the task (which may be retried)."""
        sig = self._signature(name, fn)
        if sig is None:
            return ""
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            return f"task {name!r} rejected its arguments: {exc}"
        return ""

    def run(
        self,
        seq: int,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: tuple[Any, ...] | None = None,
        max_result_bytes: int = 1 << 62,
    ) -> tuple[Any, ...]:
        started = time.time()

        def out(status: str, result: str = "", error: str = "", tb: str = "") -> tuple[Any, ...]:
            return (seq, status, result, cap_error(error), cap_traceback(tb), started, time.time())

        fn = self.tasks.get(name)
        if fn is None:
            return out("rejected", error=f"unknown task {name!r}")
        bind_first = name in self._bind_first
        if bind_first and (why := self._wrong_arguments(name, fn, args, kwargs)):
            return out("rejected", error=why)
        token = None
        if ctx is not None:
            job_id, priority, attempt, max_retries, meta, enqueued_at, timeout_s = ctx
            fields = (
                job_id, name, priority, attempt, max_retries, meta, enqueued_at,
                started + timeout_s,
            )  # fmt: skip
            token = context.enter(fields, self._send, seq)
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = self._await(value)
        except BaseException as exc:  # a task's SystemExit must not end the worker
            if (
                isinstance(exc, TypeError)
                and not bind_first
                and (why := self._wrong_arguments(name, fn, args, kwargs))
            ):
                return out("rejected", error=why)
            return out("error", error=_error_line(exc), tb=traceback.format_exc())
        finally:
            if token is not None:
                context.leave(token)
        try:
            result = _RESULT_JSON.encode(value)
            try:
                result.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: keep it as an ASCII escape
                result = _RESULT_JSON_ASCII.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            return out(
                "bad_result",
                error=f"task {name!r} returned a value that is not JSON-serialisable: {exc}",
            )
        # (At most 4 bytes a character: only a long result is worth encoding to count.)
        if len(result) * 4 > max_result_bytes and len(result.encode()) > max_result_bytes:
            return out(
                "bad_result",
                error=f"task {name!r} returned {len(result.encode())} bytes of JSON, "
                f"over max_result_bytes={max_result_bytes}",
            )
        return out("ok", result=result)


def main(argv: list[str]) -> int:
    cmd_fd, result_fd, area_fd = int(argv[0]), int(argv[1]), int(argv[2])
    modules = argv[3:]
    area = mmap.mmap(area_fd, _PREEMPT.size)
    os.close(area_fd)
    # The daemon handles Ctrl-C and systemd's SIGTERM, once; a worker must not die
    # of a signal sent to the whole process group and lose the job it runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(int(os.environ.get("PRIOQD_PARENT_PID", os.getppid())))

    from prioqd import registry
    from prioqd.errors import TaskRegistryError

    try:
        tasks = registry.load(modules)
    except TaskRegistryError as exc:
        write_frame(result_fd, ("error", str(exc)))
        return 3
    write_frame(result_fd, ("ready", os.getpid(), sorted(tasks)))
    runner = Runner(tasks, lambda frame: write_frame(result_fd, frame))
    while True:
        msg = read_frame(cmd_fd)
        if msg is None:
            return 0
        if msg[0] == "run":
            _, max_result_bytes, batch = msg
            for i, (seq, name, args, kwargs, ctx) in enumerate(batch):
                # The first job too: the daemon may have learnt of a higher one while
                # this batch was on its way here.
                lo, hi = _PREEMPT.unpack_from(area)
                if lo <= seq <= hi:
                    write_frame(result_fd, ("preempted", [b[0] for b in batch[i:]]))
                    break
                result = runner.run(seq, name, args, kwargs, ctx, max_result_bytes)
                write_frame(result_fd, ("done", [result]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
