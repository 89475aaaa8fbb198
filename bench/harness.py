"""The benchmark's plumbing: throwaway redis-servers, daemon processes, outcome
counting, process-tree CPU and memory.

Every process started here is stopped by its pid in a ``finally``: a failed or
interrupted workload leaves nothing running. Every wait has a timeout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import redis

#: Default bound on any single wait (a daemon becoming ready, a set of outcomes...).
WAIT_S = 120.0
#: The shared Redis that the benchmark must never touch.
SHARED_PORT = 6379
#: Where the daemon imports prioqd from: None for the installed (editable) package,
#: or a directory holding an exported ``prioqd/`` (see ``run.py --rev``).
CODE_DIR: Path | None = None
#: Environment a daemon must not inherit: systemd hand-offs (notify socket,
#: watchdog, journald stream, credentials) and knobs that change the tasks.
_DROP_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "PRIOQD_REDIS_PASSWORD",
    "PRIOQD_SQUARE_DELAY_S",
)


def log(msg: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != SHARED_PORT:
            return port


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty sample")
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def job(job_id: str, task: str, *args: Any, **kwargs: Any) -> str:
    body: dict[str, Any] = {"id": job_id, "task": task, "args": list(args)}
    if kwargs:
        body["kwargs"] = kwargs
    return json.dumps(body, separators=(",", ":"))


def queue_key(priority: str) -> str:
    return f"prioqd:queue:{priority}"


def push(
    client: redis.Redis,
    priority: str,
    payloads: Iterable[str],
    *,
    head: bool = False,
    chunk: int = 2000,
    per_round_trip: int = 50,
) -> int:
    """Push payloads in pipelined chunks: LPUSH (the tail, as producers do), or RPUSH
    with ``head=True`` (the right end, which the daemon takes first). Returns count."""
    key = queue_key(priority)
    pipe = client.pipeline(transaction=False)
    batch: list[str] = []
    n = 0
    queued = 0

    def flush() -> None:
        nonlocal queued
        if batch:
            (pipe.rpush if head else pipe.lpush)(key, *batch)
            batch.clear()
            queued += 1
        if queued >= per_round_trip:
            pipe.execute()
            queued = 0

    for payload in payloads:
        batch.append(payload)
        n += 1
        if len(batch) >= chunk:
            flush()
    flush()
    pipe.execute()
    return n


def statuses(client: redis.Redis, ids: list[str]) -> dict[str, int]:
    """How many of the jobs ended in each status (from their job hashes)."""
    counts: dict[str, int] = {}
    for i in range(0, len(ids), 5000):
        pipe = client.pipeline(transaction=False)
        for job_id in ids[i : i + 5000]:
            pipe.hget(f"prioqd:job:{job_id}", "status")
        for raw in pipe.execute():
            key = raw.decode() if raw else "missing"
            counts[key] = counts.get(key, 0) + 1
    return counts


def job_fields(client: redis.Redis, ids: list[str], *fields: str) -> list[list[str | None]]:
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"prioqd:job:{job_id}", list(fields))
    return [[v.decode() if v is not None else None for v in row] for row in pipe.execute()]


def succeeded_fields(
    client: redis.Redis, ids: list[str], field: str, workload: str
) -> list[str | None]:
    """``field`` of every job; RuntimeError (no figure) unless every one succeeded."""
    rows = job_fields(client, ids, "status", field)
    if any(s != "succeeded" for s, _ in rows):
        raise RuntimeError(f"{workload}: statuses {Counter(s for s, _ in rows)}")
    return [v for _, v in rows]


def cmdstats(info: dict[str, Any]) -> Counter[str]:
    """``INFO commandstats`` as calls per command."""
    return Counter(
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if "calls" in v}
    )


# --- processes -----------------------------------------------------------------------


def _stop_pid(proc: subprocess.Popen[bytes], term_wait_s: float) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(term_wait_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, own dir."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        assert self.port != SHARED_PORT
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: redis.Redis | None = None

    def start(self) -> redis.Redis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return self.client
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not start; "
                        f"see {self.dir / 'redis.log'}"
                    ) from None
                time.sleep(0.01)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            _stop_pid(self.proc, 10)

    def cpu_ns(self) -> int:
        """On-CPU nanoseconds of redis-server so far (all its threads)."""
        assert self.proc is not None
        return task_cpu_ns(self.proc.pid)


@contextmanager
def redis_server(workdir: Path, name: str) -> Iterator[RedisServer]:
    server = RedisServer(workdir, name)
    try:
        server.start()
        yield server
    finally:
        server.stop()


#: The benchmark's task module (bench/benchtasks.py), the same for every ``--rev``.
BENCH_TASKS = "benchtasks"


class Daemon:
    """``python -m prioqd.cli run`` with the default configuration: only the Redis URL,
    the task module (the benchmark's own, ``benchtasks``) and, if given, the
    priorities set. Logs at the default level (info) as JSON lines (``format =
    "auto"`` with stdout to a file) into the workload's directory."""

    def __init__(
        self,
        server: RedisServer,
        name: str,
        priorities: list[str] | None = None,
        *,
        modules: list[str] | None = None,
        path: list[Path] | None = None,
        env: dict[str, str] | None = None,
    ):
        """``modules``: task modules instead of ``benchtasks``, found on ``path`` (put
        on PYTHONPATH); ``env``: extra environment (inherited by the workers)."""
        self.server = server
        self.dir = server.dir
        lines = ["[redis]", f'url = "redis://127.0.0.1:{server.port}/0"']
        if priorities is not None:
            lines += ["", "[queues]", f"priorities = {json.dumps(priorities)}"]
        if modules is None:
            modules, path = [BENCH_TASKS], [Path(__file__).resolve().parent, *(path or [])]
        lines += ["", "[tasks]", f"modules = {json.dumps(modules)}"]
        if os.environ.get("BENCH_DAEMON_LOG_LEVEL"):  # to look into a run, not for figures
            lines += ["", "[log]", f'level = "{os.environ["BENCH_DAEMON_LOG_LEVEL"]}"']
        self.path = list(path or [])
        self.extra_env = dict(env or {})
        self.config = self.dir / f"{name}.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = self.dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []
        self.id = ""
        self.slots = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        path = [str(p) for p in ([CODE_DIR] if CODE_DIR is not None else []) + self.path]
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        else:
            env.pop("PYTHONPATH", None)
        env.update(self.extra_env)
        with open(self.log_path, "wb") as out:
            # cwd: the workload's dir, so that ``-m`` does not import a prioqd/ that
            # happens to be in the current directory instead of the one meant.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prioqd.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
            )

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Block until this daemon is registered in ``prioqd:daemons``; returns the
        registration moment as the daemon wrote it (``started_at`` of its info hash,
        set as it registers, just before its first cycle)."""
        assert self.proc is not None and self.server.client is not None
        client: Any = self.server.client  # redis-py types its replies loosely
        deadline = time.monotonic() + timeout_s
        pid = str(self.proc.pid).encode()
        while True:
            for raw in client.zrange("prioqd:daemons", 0, -1):
                info = client.hgetall(b"prioqd:daemon:" + raw)
                if info.get(b"pid") == pid:
                    self.id = raw.decode()
                    self.slots = int(info[b"slots"])
                    self.worker_pids = [c.pid for c in self._children()]
                    return float(info[b"started_at"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not ready within {timeout_s:.0f}s: {self.log_path}")
            time.sleep(0.001)

    def _children(self) -> list[psutil.Process]:
        assert self.proc is not None
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return children

    def tree(self) -> list[psutil.Process]:
        """The daemon and all its descendants (its worker processes)."""
        assert self.proc is not None
        return [psutil.Process(self.proc.pid), *self._children()]

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) so far of (the daemon process, its workers);
        reaped children's time is in the daemon's ``children_*`` and counted too."""
        main, *workers = self.tree()
        t = main.cpu_times()
        own = t.user + t.system + t.children_user + t.children_system
        rest = 0.0
        for p in workers:
            with suppress(psutil.NoSuchProcess):
                w = p.cpu_times()
                rest += w.user + w.system
        return own, rest

    def cpu_ns(self) -> dict[int, int]:
        """On-CPU nanoseconds so far of each process of the tree, from the scheduler
        (``/proc/PID/task/*/schedstat``): ``cpu_s`` counts 10 ms clock ticks, too
        coarse for an idle daemon."""
        return {p.pid: task_cpu_ns(p.pid) for p in self.tree()}

    def rss(self) -> tuple[int, int, int]:
        """(RSS sum, PSS sum, process count) of the process tree, in bytes."""
        rss = pss = n = 0
        for p in self.tree():
            with suppress(psutil.NoSuchProcess):
                m = p.memory_full_info()
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
                n += 1
        return rss, pss, n

    def stop(self) -> None:
        if self.proc is None:
            return
        with suppress(psutil.NoSuchProcess):
            self.worker_pids = sorted({*self.worker_pids, *(c.pid for c in self._children())})
        _stop_pid(self.proc, 60)
        # Workers die with the daemon (PR_SET_PDEATHSIG); make sure, by pid.
        for pid in self.worker_pids:
            with suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if "prioqd.worker" in " ".join(p.cmdline()):
                    p.kill()
                    p.wait(10)

    def log_summary(self) -> tuple[dict[str, int], list[str]]:
        """Log lines by level (``not_json``: lines that are not JSON), and the first few
        lines at warning or above."""
        counts: dict[str, int] = {}
        bad: list[str] = []
        with open(self.log_path, "rb") as fh:
            for line in fh:
                try:
                    level = str(json.loads(line).get("level", "?"))
                except ValueError:
                    level = "not_json"
                counts[level] = counts.get(level, 0) + 1
                if level in ("warning", "error", "critical", "not_json") and len(bad) < 3:
                    bad.append(line.decode(errors="replace").strip()[:400])
        return counts, bad

    def problems(self) -> str:
        """'' or what its log says went wrong: lines at warning or above, or not JSON."""
        counts, lines = self.log_summary()
        bad = {k: v for k, v in counts.items() if k in ("warning", "error", "critical", "not_json")}
        return f"{bad}, first: {' | '.join(lines)}" if bad else ""


def task_cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of ``pid`` (0 if it is gone)."""
    total = 0
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
    return total


@contextmanager
def daemon(
    server: RedisServer, name: str, priorities: list[str] | None = None, **kwargs: Any
) -> Iterator[Daemon]:
    d = Daemon(server, name, priorities, **kwargs)
    try:
        d.start()
        yield d
    finally:
        d.stop()


# --- outcomes --------------------------------------------------------------------------


class Outcomes:
    """Counts outcomes on the ``prioqd:events`` channel whose job id starts with a prefix,
    and remembers when each count was reached.

    A raw RESP subscriber on a thread of its own: it counts occurrences of
    ``\\r\\n{"id":"<prefix>`` in the byte stream (every outcome JSON starts with its id,
    JSON never holds a raw CR LF) instead of parsing each message, so it keeps up with
    the daemon at little CPU cost. Subscribed before the constructor returns.
    """

    def __init__(self, port: int, prefix: str) -> None:
        self._pattern = b'\r\n{"id":"' + prefix.encode()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$13\r\nprioqd:events\r\n")
        confirm = b""
        while not confirm.endswith(b":1\r\n"):
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError("subscriber connection closed")
            confirm += chunk
        self._sock.settimeout(0.2)
        self._marks: list[tuple[float, int]] = []  # (arrival time, count so far)
        self.count = 0
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tail = b""
        keep = len(self._pattern) - 1
        try:
            while not self._stop:
                try:
                    chunk = self._sock.recv(1 << 20)
                except TimeoutError:
                    continue
                now = time.time()
                if not chunk:
                    raise RuntimeError("subscriber connection closed")
                data = tail + chunk
                hits = data.count(self._pattern)
                tail = data[-keep:]
                if hits:
                    with self._cond:
                        self.count += hits
                        self._marks.append((now, self.count))
                        self._cond.notify_all()
        except BaseException as exc:  # reported by wait()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def wait(self, n: int, timeout_s: float = WAIT_S) -> float:
        """Block until ``n`` outcomes arrived; returns the arrival time of the n-th."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.count < n:
                if self._error is not None:
                    raise RuntimeError(f"subscriber failed: {self._error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.count} of {n} outcomes within {timeout_s:.0f}s")
                self._cond.wait(min(left, 0.5))
            return next(t for t, c in self._marks if c >= n)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._sock.close()


@contextmanager
def outcomes(server: RedisServer, prefix: str) -> Iterator[Outcomes]:
    o = Outcomes(server.port, prefix)
    try:
        yield o
    finally:
        o.close()


# --- CPU used by everything else on the machine -----------------------------------------


def _own_tree_cpu_s() -> float:
    """CPU seconds of this process and all its descendants, live or reaped."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _busy_s() -> float:
    t = psutil.cpu_times()
    # guest time is already inside user/nice; steal is CPU the hypervisor gave others.
    return float(
        t.user
        + t.nice
        + t.system
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
        + getattr(t, "steal", 0.0)
    )


class OtherLoad:
    """How many CPUs processes other than the benchmark's own kept busy, on average,
    between ``start`` and ``stop``: a noise indicator on a shared machine."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _busy_s()
        self._own0 = _own_tree_cpu_s()

    def stop(self) -> float:
        dt = time.monotonic() - self._t0
        other = (_busy_s() - self._busy0) - (_own_tree_cpu_s() - self._own0)
        return max(0.0, other / dt) if dt > 0 else 0.0


def w2_floor(
    port: int, n: int, ms: float, workers: int, mode: str, iters: int = 0
) -> dict[str, float]:
    """W2's floor (``bench/w2floor.py``) against the redis-server on ``port``:
    {"cpu_us": its CPU a job, "efficiency": n x ms / workers / wall time}."""
    cmd = [
        sys.executable, str(Path(__file__).resolve().parent / "w2floor.py"), "--port", str(port),
        "--n", str(n), "--ms", str(ms), "--workers", str(workers), "--mode", mode,
        "--iters", str(iters),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S, check=True).stdout
    result: dict[str, float] = json.loads(out)
    return result
