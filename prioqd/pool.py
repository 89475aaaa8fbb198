"""A process pool that loses one job, not all of them, when a worker dies.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its children dies
(a timeout kill, a segfault, ``os._exit``, the OOM killer) it marks the whole pool
broken and fails every job in flight with ``BrokenProcessPool``, and it cannot tell
which child runs which job, so a timeout cannot kill the right process. Here each
worker is a child of its own with two pipes (see ``prioqd.worker``); the daemon
knows what every worker runs, kills exactly the one that overran, and replaces
exactly the one that died. Its siblings never notice.

``submit`` returns asyncio futures; the daemon adds a done-callback to each that
releases the job's slot, as it would for ``loop.run_in_executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import mmap
import os
import pickle
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prioqd.errors import WorkerStartError
from prioqd.jobs import Job, RunResult
from prioqd.systemd import PRIVATE_ENV
from prioqd.timing import Backoff

_HEADER = struct.Struct("!I")
#: Shared with each worker: "do not start a job whose seq is in [lo, hi]" (see
#: ``Pool.preempt``). Seqs only grow, so a torn read can only widen the range over
#: seqs the worker has already run.
_PREEMPT = struct.Struct("=qq")
_START_TIMEOUT_S = 120.0
#: A batch held back because a higher job is arriving is looked at again this soon.
_RECHECK_S = 0.0005


@dataclass(slots=True)
class _Running:
    job: Job
    seq: int
    future: asyncio.Future[RunResult]
    rank: int = 0
    started_mono: float = 0.0
    started_wall: float = 0.0
    on_start: Callable[[], object] | None = None


class _FrameReader(asyncio.Protocol):
    def __init__(self, on_frame: Callable[[Any], None]) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            end = _HEADER.size + n
            if len(buf) < end:
                break
            frame = pickle.loads(bytes(buf[_HEADER.size : end]))
            del buf[:end]
            self._on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "worker process vanished"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"worker process was killed by {name}"
    return f"worker process exited with code {returncode}"


class _Worker:
    def __init__(self, pool: Pool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.transport: asyncio.WriteTransport | None = None
        self.read_transport: asyncio.ReadTransport | None = None
        self.reader: _FrameReader | None = None
        #: Ready and handed to the pool: from now on its exit calls for a replacement.
        self.started = False
        self.ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self.batch: deque[_Running] = deque()
        self.deadline: asyncio.TimerHandle | None = None
        self.deadline_at = 0.0  # loop time by which the running job must end
        # Why we killed it, so its exit is not reported as a crash.
        self.kill_reason: str | None = None
        self.jobs_done = 0
        self.retiring = False
        self.preempt_area: mmap.mmap | None = None

    @property
    def busy(self) -> bool:
        return bool(self.batch)

    def preempt(self) -> bool:
        """Ask the worker to hand back the jobs of its batch it has not started (the
        first too, if it is still on its way: a batch sent a moment ago). True if it
        may hand back any."""
        if not self.batch or self.preempt_area is None:
            return False
        _PREEMPT.pack_into(self.preempt_area, 0, self.batch[0].seq, self.batch[-1].seq)
        return True

    def on_frame(self, frame: Any) -> None:
        kind = frame[0]
        if kind == "ready":
            self.pid = frame[1]
            if not self.ready.done():
                self.ready.set_result(list(frame[2]))
        elif kind == "error":
            if not self.ready.done():
                self.ready.set_exception(WorkerStartError(frame[1]))
        elif kind == "done":
            for result in frame[1]:
                self.pool._on_done(self, result)
        elif kind == "preempted":
            self.pool._on_preempted(self, frame[1])
        elif kind == "progress":
            for r in self.batch:
                if r.seq == frame[1]:
                    self.pool.on_progress(r.job, frame[2])
                    break

    def send(self, frames: Sequence[bytes]) -> None:
        """Frames in one write: the worker runs them one after another."""
        assert self.transport is not None
        self.transport.write(b"".join(_HEADER.pack(len(f)) + f for f in frames))

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class Pool:
    """``size`` worker processes; one batch of jobs per worker at a time."""

    def __init__(
        self,
        size: int,
        modules: Sequence[str],
        *,
        default_timeout_s: float,
        max_jobs_per_worker: int = 0,
        max_result_bytes: int = 1024 * 1024,
        default_max_retries: int = 3,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.size = size
        self.modules = list(modules)
        self.default_timeout_s = default_timeout_s
        self.max_jobs_per_worker = max_jobs_per_worker
        self.max_result_bytes = max_result_bytes
        self.default_max_retries = default_max_retries
        #: Asked before a waiting batch of this rank starts: False holds it back a moment
        #: (a higher job is arriving; see Watch.may_start).
        self.may_start: Callable[[int], bool] = lambda rank: True
        #: Asked when a worker takes a waiting batch: whether these jobs (it and the
        #: batches of its rank queued behind it) are short enough to go to the worker
        #: at once, as one batch would (see Dispatcher.joinable).
        self.joinable: Callable[[Sequence[Job]], bool] = lambda jobs: False
        self._kick_handle: asyncio.TimerHandle | None = None
        #: Called with (job, progress JSON) when a task reports progress.
        self.on_progress: Callable[[Job, str], None] = lambda job, text: None
        self.task_names: frozenset[str] = frozenset()
        self._on_event = on_event or (lambda *a, **k: None)
        #: Told of an exception no part of the pool expected (a bug): the daemon
        #: cannot rely on its workers any more.
        self.on_failure: Callable[[BaseException], None] = lambda exc: None
        #: The one task that brings the pool back to its size after workers died.
        self._replacer: asyncio.Task[None] | None = None
        self._workers: set[_Worker] = set()
        self._idle: deque[_Worker] = deque()
        # Batches waiting for a worker: (rank, seq, batch, frame), lowest rank first,
        # FIFO within a rank. A higher-priority batch overtakes a prefetched lower one.
        self._pending: list[tuple[int, int, list[_Running], bytes]] = []
        self._seq = 0
        #: Ids to cancel when their worker hands them back unstarted.
        self._cancelled: set[str] = set()
        self._next_index = 0
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle_event = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> frozenset[str]:
        """Start every worker; raises ``WorkerStartError`` if the task modules fail."""
        workers = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        errors = [w for w in workers if isinstance(w, BaseException)]
        if errors:
            for w in workers:
                if isinstance(w, _Worker):
                    w.kill("start failed")
            raise errors[0]
        return self.task_names

    async def _spawn(self) -> _Worker:
        """A new worker, ready and idle. Raises ``WorkerStartError`` (the task modules
        fail, the start times out) or ``OSError`` (no fds, no processes left: EMFILE,
        EAGAIN), and then leaves nothing of the worker behind."""
        worker = _Worker(self, self._next_index)
        self._next_index += 1
        try:
            await self._launch(worker)
            try:
                names = await asyncio.wait_for(asyncio.shield(worker.ready), _START_TIMEOUT_S)
            except TimeoutError:
                raise WorkerStartError(
                    f"worker process did not start within {_START_TIMEOUT_S:.0f}s"
                ) from None
        except BaseException:
            self._abandon(worker)
            raise
        worker.started = True
        self._set_tasks(frozenset(names), worker)
        self._make_idle(worker)
        self._on_event("worker_started", pid=worker.pid, index=worker.index)
        return worker

    async def _launch(self, worker: _Worker) -> None:
        """Start the worker's process and connect its pipes; on failure, every fd
        opened here is closed (``_abandon`` does the rest)."""
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            cmd_r, cmd_w = os.pipe()
            fds += (cmd_r, cmd_w)
            res_r, res_w = os.pipe()
            fds += (res_r, res_w)
            area_fd = os.memfd_create("prioqd-preempt", os.MFD_CLOEXEC)
            fds.append(area_fd)
            os.ftruncate(area_fd, _PREEMPT.size)
            worker.preempt_area = mmap.mmap(area_fd, _PREEMPT.size)
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "prioqd.worker",
                str(cmd_r),
                str(res_w),
                str(area_fd),
                *self.modules,
                pass_fds=(cmd_r, res_w, area_fd),
                stdin=asyncio.subprocess.DEVNULL,
                # Task output goes to stderr: the daemon's stdout carries only its logs.
                stdout=sys.stderr.fileno(),
                env=self._child_env(),
            )
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        # The child holds its ends now; closing ours makes EOF mean "the other side is
        # gone".
        for fd in (cmd_r, res_w, area_fd):
            os.close(fd)
        self._workers.add(worker)
        pipes = [os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(res_r, "rb", buffering=0)]
        try:
            worker.transport, _ = await loop.connect_write_pipe(asyncio.Protocol, pipes[0])
            worker.read_transport, worker.reader = await loop.connect_read_pipe(
                lambda: _FrameReader(worker.on_frame), pipes[1]
            )
        except BaseException:
            for pipe in pipes:
                pipe.close()
            raise
        self._track(asyncio.ensure_future(self._watch(worker)))

    def _abandon(self, worker: _Worker) -> None:
        """A worker that failed to start: killed, and forgotten by the pool (its exit
        calls for no replacement: whoever started it handles the failure)."""
        worker.kill("start failed")
        self._workers.discard(worker)
        for transport in (worker.transport, worker.read_transport):
            if transport is not None:
                transport.close()
        if worker.preempt_area is not None:
            worker.preempt_area.close()
            worker.preempt_area = None
        if not worker.ready.done():
            worker.ready.cancel()

    def _set_tasks(self, names: frozenset[str], worker: _Worker) -> None:
        if self.task_names and names != self.task_names:
            # The task modules changed on disk (a deploy under a running daemon): say
            # so, loudly, rather than let jobs of a vanished task die quietly.
            self._on_event(
                "tasks_changed",
                pid=worker.pid,
                added=sorted(names - self.task_names),
                removed=sorted(self.task_names - names),
            )
        self.task_names = names

    @staticmethod
    def _child_env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env["PRIOQD_PARENT_PID"] = str(os.getpid())
        return env

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.on_failure(task.exception())  # type: ignore[arg-type]

    async def _watch(self, worker: _Worker) -> None:
        assert worker.proc is not None and worker.reader is not None
        returncode = await worker.proc.wait()
        # Results the worker wrote before it died are still in the pipe: read them
        # first so a job that did finish is not reported as crashed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(worker.reader.closed), 1.0)
        self._on_exit(worker, returncode)

    def _on_exit(self, worker: _Worker, returncode: int | None) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        if worker.deadline is not None:
            worker.deadline.cancel()
        if worker.transport is not None:
            worker.transport.close()
        if worker.preempt_area is not None:
            worker.preempt_area.close()
            worker.preempt_area = None
        if not worker.ready.done():
            worker.ready.set_exception(
                WorkerStartError(f"{_describe_exit(returncode)} before it was ready")
            )
        now = time.time()
        reason = worker.kill_reason
        if worker.batch:
            head = worker.batch.popleft()
            if reason == "timeout":
                timeout = head.job.timeout_s or self.default_timeout_s
                result = RunResult("timeout", error=f"timed out after {timeout:g}s")
            elif reason == "shutdown":
                result = RunResult("not_run", error="stopped by shutdown")
            elif reason == "cancelled":
                result = RunResult("cancelled", error="cancelled")
            else:
                result = RunResult("crashed", error=_describe_exit(returncode))
            result.started_at, result.finished_at = head.started_wall, now
            self._resolve(head, result)
            # The rest of the batch never started: they go back without charge.
            if worker.batch:
                while worker.batch:
                    self._resolve(worker.batch.popleft(), RunResult("not_run"))
                # So do the batches of its priority claimed after it and waiting here:
                # the whole run goes back to the head of its queue in claim order,
                # instead of a later batch running before the rest of this one.
                self._evict_pending(head.rank - 1)
            if reason not in ("timeout", "shutdown", "cancelled"):
                exit_text = _describe_exit(returncode)
                self._on_event("worker_died", pid=worker.pid, exit=exit_text, job_id=head.job.id)
        if worker.started and not self._closing and len(self._workers) < self.size:
            self._on_event("worker_restart", reason=reason or "crashed")
            if self._replacer is None or self._replacer.done():
                self._replacer = asyncio.ensure_future(self._replace())
                self._track(self._replacer)
        self._idle_event.set()

    async def _replace(self) -> None:
        """Start workers until the pool has its size again, retrying whatever stops a
        start (task modules that fail mid-deploy, no fds or processes left) with
        backoff: the jobs claimed meanwhile wait here, and the lease keeps them ours."""
        backoff = Backoff(base_s=0.1, cap_s=10.0)
        while not self._closing and len(self._workers) < self.size:
            try:
                await self._spawn()
            except Exception as exc:
                delay = backoff.next_delay()
                error = str(exc) if isinstance(exc, WorkerStartError) else repr(exc)
                self._on_event("worker_start_failed", error=error, retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
            else:
                backoff.reset()

    # --- running jobs ----------------------------------------------------------

    def submit(
        self,
        jobs: Sequence[Job],
        on_start: Callable[[], object] | None = None,
        rank: int = 0,
    ) -> list[asyncio.Future[RunResult]]:
        """Run ``jobs`` one after another in one worker; one future per job.

        ``on_start`` is called when a worker starts the first of them (which, if every
        worker is busy, is later than now). If they must wait for a worker, a lower
        ``rank`` (a higher priority) goes first.
        """
        loop = asyncio.get_running_loop()
        first = self._seq + 1
        batch = [_Running(job, first + i, loop.create_future(), rank) for i, job in enumerate(jobs)]
        # Pickled first: arguments that cannot be (nested too deep, say) raise here,
        # before the pool has recorded anything.
        frame = self._frame(batch)
        self._seq += len(batch)
        if batch:
            batch[0].on_start = on_start
        idle = bool(self._idle)
        if idle and self.may_start(rank):
            self._run(self._idle.popleft(), batch, [frame])
        else:
            heapq.heappush(self._pending, (rank, batch[0].seq, batch, frame))
            if idle:
                self._kick_later()
        if idle:
            # Lower batches waiting here go back even though a worker is free: more of
            # this priority may follow (a burst), and each token they hold is one the
            # daemon can claim the rest with, instead of a lower job taking a worker.
            self._evict_pending(rank)
        else:
            # Every worker is busy (or being replaced after a crash): also send back
            # every lower job the workers have not started, so that this one waits for
            # one running job at most.
            self.evict(rank)
        return [r.future for r in batch]

    def _frame(self, batch: list[_Running]) -> bytes:
        work = [(r.seq, r.job.task, r.job.args, r.job.kwargs, self._context(r.job)) for r in batch]
        return pickle.dumps(("run", self.max_result_bytes, work), protocol=pickle.HIGHEST_PROTOCOL)

    def _context(self, job: Job) -> tuple[Any, ...]:
        """What ``prioqd.current_job()`` tells the task (see prioqd.context)."""
        max_retries = job.max_retries if job.max_retries is not None else self.default_max_retries
        return (
            job.id, job.priority, job.attempt, max_retries, job.meta, job.enqueued_at,
            job.timeout_s or self.default_timeout_s,
        )  # fmt: skip

    def evict(self, rank: int) -> int:
        """Give up every job of a lower priority (a higher ``rank``) that has not
        started: batches waiting here, and the unstarted rest of the batches workers
        run, which they hand back at the end of their current job. Those jobs end as
        ``not_run`` (the daemon puts them back, uncharged). Returns how many batches."""
        evicted = self._evict_pending(rank)
        for w in self._workers:
            if w.batch and w.batch[0].rank > rank and w.preempt():
                evicted += 1
        return evicted

    def _evict_pending(self, rank: int) -> int:
        """Give up the batches waiting here of a lower priority than ``rank``."""
        if not any(entry[0] > rank for entry in self._pending):
            return 0
        keep = []
        evicted = 0
        for entry in self._pending:
            if entry[0] > rank:
                for r in entry[2]:
                    self._resolve(r, RunResult("not_run", error="preempted"))
                evicted += 1
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self._pending = keep
        return evicted

    def lowest_rank(self, *, unstarted: bool) -> int | None:
        """The highest rank (lowest priority) of a job held here: of those not started
        yet if ``unstarted``, else of all, running ones included."""
        ranks = [entry[0] for entry in self._pending]
        least = 2 if unstarted else 1
        ranks += [w.batch[0].rank for w in self._workers if len(w.batch) >= least]
        return max(ranks) if ranks else None

    def _on_preempted(self, worker: _Worker, seqs: list[int]) -> None:
        """The worker handed back the unstarted rest of a frame it holds (it hands back
        each frame's own rest: several frames may be queued in its pipe)."""
        handed = set(seqs)
        back = [r for r in worker.batch if r.seq in handed]
        if back:
            worker.batch = deque(r for r in worker.batch if r.seq not in handed)
        for r in back:
            if r.job.id in self._cancelled:
                self._cancelled.discard(r.job.id)
                self._resolve(r, RunResult("cancelled", error="cancelled"))
            else:
                self._resolve(r, RunResult("not_run", error="preempted"))
        if not worker.batch:
            self._make_idle(worker)

    def _run(self, worker: _Worker, batch: list[_Running], frames: list[bytes]) -> None:
        for r in batch:
            r.job.worker_pid = worker.pid
        worker.batch.extend(batch)
        worker.send(frames)
        self._arm(worker)

    def _next_pending(self) -> tuple[list[_Running], list[bytes]]:
        """The first waiting batch, with the batches of its rank queued behind it as
        long as ``joinable`` says they are short: higher jobs that landed one by one
        while every worker was busy (a burst) then run back to back on the first
        worker that frees, instead of one per round trip to it."""
        _, _, batch, frame = heapq.heappop(self._pending)
        frames = [frame]
        rank = batch[0].rank
        while self._pending and self._pending[0][0] == rank:
            if not self.joinable([r.job for r in (*batch, *self._pending[0][2])]):
                break
            _, _, more, more_frame = heapq.heappop(self._pending)
            batch = [*batch, *more]
            frames.append(more_frame)
        return batch, frames

    def _arm(self, worker: _Worker) -> None:
        """Start the clock on the job at the head of the worker's batch.

        The timer is lazy: in a run of short jobs each deadline is later than the
        last, so the one timer stays as it is and, when it fires early, re-arms for
        the job then running. (A timer per job cost more than the jobs.)
        """
        if not worker.batch:
            return
        head = worker.batch[0]
        loop = asyncio.get_running_loop()
        head.started_mono = loop.time()
        head.started_wall = time.time()
        timeout = head.job.timeout_s or self.default_timeout_s
        worker.deadline_at = head.started_mono + timeout
        if worker.deadline is not None and worker.deadline.when() > worker.deadline_at:
            worker.deadline.cancel()
            worker.deadline = None
        if worker.deadline is None:
            worker.deadline = loop.call_at(worker.deadline_at, self._check_deadline, worker)
        if head.on_start is not None:
            on_start, head.on_start = head.on_start, None
            on_start()

    def _check_deadline(self, worker: _Worker) -> None:
        worker.deadline = None
        if not worker.batch:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= worker.deadline_at - 0.001:  # timers may fire a tick early
            worker.kill("timeout")
        else:
            worker.deadline = loop.call_at(worker.deadline_at, self._check_deadline, worker)

    def _on_done(self, worker: _Worker, result: Any) -> None:
        seq, status, result_json, error, tb, started, finished = result
        if not worker.batch or worker.batch[0].seq != seq:
            return  # a late result for a job already given up on
        head = worker.batch.popleft()
        self._resolve(head, RunResult(status, result_json, error, tb, started, finished))
        worker.jobs_done += 1
        self._arm(worker)
        if not worker.batch:
            self._make_idle(worker)

    def _make_idle(self, worker: _Worker) -> None:
        if worker.kill_reason is not None:
            return
        if self.max_jobs_per_worker and worker.jobs_done >= self.max_jobs_per_worker:
            self._retire(worker)
            return
        if len(self._workers) - len(self._retiring()) > self.size:
            self._retire(worker)
            return
        if self._pending and self.may_start(self._pending[0][0]):
            self._run(worker, *self._next_pending())
        else:
            self._idle.append(worker)
            self._idle_event.set()
            if self._pending:
                self._kick_later()

    def _kick_later(self) -> None:
        """Look again in a moment at batches held back by ``may_start``."""
        if self._kick_handle is None:
            self._kick_handle = asyncio.get_running_loop().call_later(_RECHECK_S, self._kick)

    def _kick(self) -> None:
        self._kick_handle = None
        idle, self._idle = list(self._idle), deque()
        for worker in idle:
            self._make_idle(worker)

    def _retiring(self) -> list[_Worker]:
        return [w for w in self._workers if w.retiring]

    def _retire(self, worker: _Worker) -> None:
        """Let an idle worker exit by closing its command pipe (EOF)."""
        worker.retiring = True
        worker.kill_reason = "retired"
        if worker.transport is not None:
            worker.transport.close()

    @staticmethod
    def _resolve(running: _Running, result: RunResult) -> None:
        if not running.future.done():
            running.future.set_result(result)

    # --- size and shutdown -------------------------------------------------------

    @property
    def busy_count(self) -> int:
        return sum(1 for w in self._workers if w.busy) + len(self._pending)

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers if w.pid)

    async def resize(self, size: int) -> None:
        """Grow at once; shrink as workers become idle. If new workers cannot start
        (task modules that fail to import mid-deploy), the pool goes back to its old
        size and ``WorkerStartError`` is raised."""
        old, self.size = self.size, size
        missing = size - (len(self._workers) - len(self._retiring()))
        if missing > 0:
            spawned = await asyncio.gather(
                *(self._spawn() for _ in range(missing)), return_exceptions=True
            )
            errors = [w for w in spawned if isinstance(w, BaseException)]
            if errors:
                self.size = old
                for w in spawned:
                    if isinstance(w, _Worker) and w in self._idle:
                        self._idle.remove(w)
                        self._retire(w)
                raise errors[0]
        while self._idle and len(self._workers) - len(self._retiring()) > size:
            self._retire(self._idle.pop())

    async def wait_idle(self) -> None:
        """Return once no worker runs a job."""
        while self.busy_count:
            self._idle_event.clear()
            await self._idle_event.wait()

    def cancel(self, job_id: str) -> int:
        """Stop every job of this id held here: a running one by killing its worker
        (the worker is replaced), one not started by giving it up. Each ends as
        ``cancelled``. Returns how many."""
        n = 0
        pending = []
        for rank, seq, batch, frame in self._pending:
            keep = [r for r in batch if r.job.id != job_id]
            for r in batch:
                if r.job.id == job_id:
                    self._resolve(r, RunResult("cancelled", error="cancelled"))
                    n += 1
            if keep:
                pending.append(
                    (rank, seq, keep, frame if len(keep) == len(batch) else self._frame(keep))
                )
        if n:
            heapq.heapify(pending)
            self._pending = pending
        for w in list(self._workers):
            if any(r.job.id == job_id for r in w.batch):
                if w.batch[0].job.id == job_id:
                    w.kill("cancelled")  # the rest of its batch goes back unrun
                else:
                    # Not started: take it out of the batch the worker holds (it is
                    # handed back with the rest, see _on_preempted).
                    self._cancelled.add(job_id)
                    w.preempt()
                n += 1
        return n

    def kill_busy(self, reason: str = "shutdown") -> int:
        """Kill every worker that is running something; their jobs end as not_run."""
        busy = [w for w in self._workers if w.busy]
        for w in busy:
            w.kill(reason)
        while self._pending:
            for r in heapq.heappop(self._pending)[2]:
                self._resolve(r, RunResult("not_run"))
        return len(busy)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker: idle ones exit on EOF, the rest are killed."""
        self._closing = True
        for w in list(self._workers):
            if w.busy:
                w.kill("shutdown")
            elif w.transport is not None:
                w.kill_reason = w.kill_reason or "closed"
                w.transport.close()
        procs = [w.proc for w in self._workers if w.proc is not None]
        if procs:
            waits = asyncio.gather(*(p.wait() for p in procs))
            try:
                await asyncio.wait_for(waits, timeout_s)
            except TimeoutError:
                for w in list(self._workers):
                    w.kill("closed")
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2.0)
