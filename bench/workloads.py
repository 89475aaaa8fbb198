"""The workloads of the benchmark. Each returns a ``Report``: table rows and notes.

Every workload runs against redis-servers of its own (never the shared one) and a
real ``prioqd run`` process with the default configuration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import re
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    WAIT_S,
    Daemon,
    RedisServer,
    cmdstats,
    daemon,
    job,
    job_fields,
    log,
    outcomes,
    percentile,
    push,
    queue_key,
    redis_server,
    statuses,
    succeeded_fields,
    w2_floor,
)

DEFAULT_PRIORITIES = ["high", "normal", "low"]
MB = 1e6


@dataclass
class Row:
    key: str
    what: str
    value: str
    target: str = ""
    #: "ok", "MISS" or "" (no target)
    verdict: str = ""
    other_load: float | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: machine-readable figures, for RESULTS.md and for other workloads (W1 / ceiling)
    figures: dict[str, Any] = field(default_factory=dict)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """Median, and the range when there are several runs."""
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} (n={len(values)}: {fmt.format(min(values))}-{fmt.format(max(values))})"


def check_daemon(d: Daemon, name: str, notes: list[str]) -> None:
    """A note if the daemon logged anything at warning or above, or a non-JSON line."""
    if problems := d.problems():
        notes.append(f"{name}: daemon log has {problems}")


def _wait_until(t: float) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05) if left > 0.002 else 0)


# --- ceiling ---------------------------------------------------------------------------


def _noop() -> None:
    return None


async def _ceiling_once(n: int, workers: int, in_flight: int | None) -> float:
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        # Warm up: every worker started and has run something.
        await asyncio.gather(*(loop.run_in_executor(pool, _noop) for _ in range(workers * 50)))
        if in_flight is None:
            t = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(pool, _noop) for _ in range(n)))
            return n / (time.perf_counter() - t)
        sem = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with sem:
                await loop.run_in_executor(pool, _noop)

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t)


def ceiling(reps: int, n: int = 5000) -> Report:
    """Raw ``run_in_executor`` round trips of a no-op through a ProcessPoolExecutor
    (forkserver, max_workers = CPUs), no Redis: all ``n`` outstanding at once, and one
    in flight per worker."""
    workers = os.cpu_count() or 1
    rep = Report()
    burst: list[float] = []
    paced: list[float] = []
    for _ in range(reps):
        burst.append(asyncio.run(asyncio.wait_for(_ceiling_once(n, workers, None), WAIT_S)))
        paced.append(asyncio.run(asyncio.wait_for(_ceiling_once(n, workers, workers), WAIT_S)))
    rep.figures["ceiling"] = statistics.median(burst)
    rep.figures["ceiling_paced"] = statistics.median(paced)
    rep.rows.append(Row(
        "ceiling",
        f"no-op run_in_executor, ProcessPool({workers}) forkserver, {n:,} at once: /s",
        spread(burst),
    ))  # fmt: skip
    rep.rows.append(Row(
        "ceiling1",
        f"  same, one in flight per worker ({workers} at a time): /s",
        spread(paced),
    ))  # fmt: skip
    return rep


# --- W1 and its scale variants ---------------------------------------------------------


@dataclass
class W1Run:
    jobs_per_s: float
    seconds: float
    daemon_cpu_us: float  # per job, daemon main process
    worker_cpu_us: float  # per job, all workers
    redis_cpu_us: float  # per job, redis-server
    #: last outcome's arrival - the latest finished_at in the job hashes (worker clock)
    tail_ms: float
    #: jobs / EVALSHA calls up to the last outcome (about jobs per cycle)
    jobs_per_call: float


def w1_once(
    server: RedisServer,
    name: str,
    prefix: str,
    n: int,
    priorities: list[str] | None,
    notes: list[str],
) -> W1Run:
    """``n`` trivial jobs put at the head of the lowest queue, then a daemon started;
    from its registration to the arrival of the n-th outcome on prioqd:events."""
    client = server.client
    assert client is not None
    low = (priorities or DEFAULT_PRIORITIES)[-1]
    ids = [f"{prefix}{i}" for i in range(n)]
    # RPUSH: the right end is the head, so any backlog already queued stays behind.
    push(client, low, (job(i, "square", k) for k, i in enumerate(ids)), head=True)
    calls0 = cmdstats(client.info("commandstats"))["evalsha"]
    with outcomes(server, prefix) as out, daemon(server, name, priorities) as d:
        ready = d.wait_ready()
        c0, r0 = d.cpu_ns(), server.cpu_ns()
        end = out.wait(n)
        c1, r1 = d.cpu_ns(), server.cpu_ns()
        calls = cmdstats(client.info("commandstats"))["evalsha"] - calls0
    assert d.proc is not None
    main = d.proc.pid
    workers_ns = sum(c1.get(pid, ns) - ns for pid, ns in c0.items() if pid != main)
    rows = job_fields(client, ids, "status", "finished_at")
    st = Counter(s for s, _ in rows)
    if st.get("succeeded") != n:
        raise RuntimeError(f"{name}: job statuses {dict(st)}")
    check_daemon(d, name, notes)
    took = end - ready
    last_finished = max(float(f or 0) for _, f in rows)
    return W1Run(
        n / took,
        took,
        (c1[main] - c0[main]) / n / 1e3,
        workers_ns / n / 1e3,
        (r1 - r0) / n / 1e3,
        (end - last_finished) * 1000,
        n / max(1, calls),
    )


def _cpu_note(label: str, runs: list[W1Run]) -> str:
    def med(get: Callable[[W1Run], float]) -> float:
        return statistics.median(get(r) for r in runs)

    return (
        f"{label}: CPU per job (median) - daemon process {med(lambda r: r.daemon_cpu_us):.0f} us,"
        f" workers {med(lambda r: r.worker_cpu_us):.0f} us,"
        f" redis-server {med(lambda r: r.redis_cpu_us):.0f} us;"
        f" wall per job {1e6 / statistics.median(r.jobs_per_s for r in runs):.0f} us;"
        f" last job finished -> its outcome received {med(lambda r: r.tail_ms):.1f} ms;"
        f" jobs per EVALSHA {med(lambda r: r.jobs_per_call):.1f}"
    )


def w1(work: Path, reps: int, ceiling_rate: float | None, n: int = 5000) -> Report:
    rep = Report()
    runs = []
    for r in range(reps):
        with redis_server(work, f"w1-{r}") as server:
            runs.append(w1_once(server, f"w1-{r}", f"w1r{r}-", n, None, rep.notes))
        log(f"W1 run {r + 1}/{reps}: {runs[-1].jobs_per_s:,.0f} jobs/s")
    rates = [x.jobs_per_s for x in runs]
    med = statistics.median(rates)
    rep.figures["w1"] = med
    rep.rows.append(Row(
        "W1",
        f"{n:,} x*x queued, start; ready -> last outcome on prioqd:events: jobs/s",
        spread(rates), ">= 8,000", verdict(med >= 8000),
    ))  # fmt: skip
    if ceiling_rate:
        rep.rows.append(Row(
            "W1/ceil", "  W1 / ceiling (5,000 at once)",
            f"{med / ceiling_rate:.2f}",
        ))  # fmt: skip
    rep.notes.append(_cpu_note("W1", runs))
    return rep


def _flat_rows(
    rep: Report, key: str, labels: list[str], runs: list[list[W1Run]], unit: str
) -> None:
    """One row per variant: jobs/s, us/job and its cost relative to the first variant,
    as the median of per-round ratios (the variants of a round run back to back, so
    a drift in the machine's load hits both sides of each ratio alike)."""
    base = runs[0]
    spreads = []
    for label, mine in zip(labels, runs, strict=True):
        rates = [x.jobs_per_s for x in mine]
        ratios = [b.jobs_per_s / m.jobs_per_s for m, b in zip(mine, base, strict=True)]
        ratio = statistics.median(ratios)
        if mine is not base:
            spreads.append(f"{label}: {', '.join(f'{r:.2f}' for r in ratios)}")
        us = 1e6 / statistics.median(rates)
        rep.rows.append(Row(
            key, f"{label}: jobs/s [us/job; cost x {unit}]",
            f"{spread(rates)} [{us:.0f} us; {ratio:.2f}x]",
            "flat (<= 1.10x)", verdict(ratio <= 1.10),
        ))  # fmt: skip
    rep.notes.append(f"{key}: cost ratios x {unit}, round by round: " + "; ".join(spreads))


def scale(work: Path, reps: int, backlogs: list[int], n: int = 5000) -> Report:
    """W1 with a backlog already queued behind the measured jobs (same low queue).

    One redis-server per backlog size, filled once; the rounds interleave the sizes
    (10, 100k, 1M, 10, 100k, 1M, ...) so that the machine's load drifts evenly."""
    rep = Report()
    with ExitStack() as stack:
        servers: list[RedisServer] = []
        fills: list[str] = []
        for backlog in backlogs:
            server = stack.enter_context(redis_server(work, f"scale-b{backlog}"))
            assert server.client is not None
            t = time.perf_counter()
            push(
                server.client,
                "low",
                (job(f"b{i}", "square", i) for i in range(backlog)),
                chunk=10_000,
                per_round_trip=20,
            )
            fill_s = time.perf_counter() - t
            used = int(server.client.info("memory")["used_memory"])
            fills.append(
                f"scale backlog {backlog:,}: filled in {fill_s:.1f} s,"
                f" redis used_memory {used / MB:.0f} MB"
            )
            servers.append(server)
        runs: list[list[W1Run]] = [[] for _ in backlogs]
        for r in range(reps):
            for i, (backlog, server) in enumerate(zip(backlogs, servers, strict=True)):
                name = f"scale-b{backlog}-{r}"
                runs[i].append(w1_once(server, name, f"s{r}-", n, None, rep.notes))
            log(
                f"scale round {r + 1}/{reps}: "
                + ", ".join(
                    f"{b:,}: {x[-1].jobs_per_s:,.0f}" for b, x in zip(backlogs, runs, strict=True)
                )
                + " jobs/s"
            )
        for i, server in enumerate(servers):
            assert server.client is not None
            left = server.client.llen(queue_key("low"))
            rep.notes.append(f"{fills[i]}, {left:,} still queued at the end")
    labels = [f"W1, {b:,} queued behind" for b in backlogs]
    _flat_rows(rep, "scale", labels, runs, f"{backlogs[0]:,}")
    for backlog, mine in zip(backlogs, runs, strict=True):
        rep.notes.append(_cpu_note(f"scale backlog {backlog:,}", mine))
    return rep


def levels(work: Path, reps: int, counts: list[int], n: int = 5000) -> Report:
    """W1 with 3 (the default high/normal/low) and 10 priority levels, the jobs in the
    lowest; interleaved rounds, a fresh redis-server for every run."""
    rep = Report()
    runs: list[list[W1Run]] = [[] for _ in counts]
    for r in range(reps):
        for i, levels_n in enumerate(counts):
            prios = None if levels_n == 3 else [f"p{k}" for k in range(levels_n)]
            name = f"levels{levels_n}-{r}"
            with redis_server(work, name) as server:
                runs[i].append(w1_once(server, name, f"l{r}-", n, prios, rep.notes))
        log(
            f"levels round {r + 1}/{reps}: "
            + ", ".join(f"{c}: {x[-1].jobs_per_s:,.0f}" for c, x in zip(counts, runs, strict=True))
            + " jobs/s"
        )
    labels = [
        f"W1, {c} levels ({'high/normal/low' if c == 3 else f'p0..p{c - 1}'}), jobs in the lowest"
        for c in counts
    ]
    _flat_rows(rep, "levels", labels, runs, f"{counts[0]} levels")
    for c, mine in zip(counts, runs, strict=True):
        rep.notes.append(_cpu_note(f"levels {c}", mine))
    return rep


# --- W2 --------------------------------------------------------------------------------


def w2(work: Path, reps: int, n: int = 400, ms: float = 5.0) -> Report:
    """CPU-bound jobs: ideal time (n x ms / slots) / measured time."""
    rep = Report()
    effs: list[float] = []
    busy: list[float] = []
    mean_dur: list[float] = []
    p90_dur: list[float] = []
    daemon_us: list[float] = []
    redis_us: list[float] = []
    floors: list[dict[str, float]] = []
    frames: list[dict[str, float]] = []
    slots = 0
    workers = os.cpu_count() or 1  # as the daemon's slots = "auto"
    for r in range(reps):
        name = f"w2-{r}"
        prefix = f"c{r}-"
        with redis_server(work, name) as server:
            # The floor of the shape first, on the same redis-server (see w2floor.py).
            floors.append(w2_floor(server.port, n, ms, workers, "full"))
            frames.append(w2_floor(server.port, n, ms, workers, "frames"))
            client = server.client
            assert client is not None
            ids = [f"{prefix}{i}" for i in range(n)]
            push(client, "normal", (job(i, "burn_cpu", ms) for i in ids))
            with outcomes(server, prefix) as out, daemon(server, name) as d:
                ready = d.wait_ready()
                c0, r0 = d.cpu_ns(), server.cpu_ns()
                end = out.wait(n)
                c1, r1 = d.cpu_ns(), server.cpu_ns()
            slots = d.slots
            assert d.proc is not None
            daemon_us.append((c1[d.proc.pid] - c0[d.proc.pid]) / 1e3 / n)
            redis_us.append((r1 - r0) / 1e3 / n)
            check_daemon(d, name, rep.notes)
            durations = [float(v or 0) for v in succeeded_fields(client, ids, "duration_s", "W2")]
        took = end - ready
        effs.append(n * ms / 1000 / slots / took)
        busy.append(sum(durations) / (slots * took))
        mean_dur.append(statistics.mean(durations) * 1000)
        p90_dur.append(percentile(durations, 90) * 1000)
        log(f"W2 run {r + 1}/{reps}: efficiency {effs[-1]:.3f}")
    med = statistics.median(effs)
    rep.figures["w2"] = med
    rep.rows.append(Row(
        "W2",
        f"{n} x burn_cpu {ms:g} ms: ({n} x {ms:g} ms / {slots} slots) / measured",
        spread(effs, "{:.3f}"), ">= 0.92", verdict(med >= 0.92),
    ))  # fmt: skip
    floor_eff = statistics.median(f["efficiency"] for f in floors)
    floor_us = statistics.median(f["cpu_us"] for f in floors)
    rep.rows.append(Row(
        "W2 floor",
        "  a bare uvloop process of the same shape (a frame to a worker and back, one"
        " Redis round trip, two log lines a job; bench/w2floor.py): efficiency"
        " [its CPU a job]",
        f"{spread([f['efficiency'] for f in floors], '{:.3f}')} [{floor_us:.0f} us]",
    ))  # fmt: skip
    rep.rows.append(Row(
        "W2/floor", "  W2 / that floor (medians; every round runs both, the floor first)",
        f"{med / floor_eff:.2f}",
    ))  # fmt: skip
    rep.notes.append(
        f"W2 floor (medians): the bare shape with frames only (no Redis, no logs):"
        f" efficiency {statistics.median(f['efficiency'] for f in frames):.3f}, CPU a job"
        f" {statistics.median(f['cpu_us'] for f in frames):.0f} us; with the Redis round trip"
        f" and the two log lines: {floor_eff:.3f}, {floor_us:.0f} us. prioqd's daemon"
        f" {statistics.median(daemon_us):.0f} us a job does that and the rest (the job's"
        f" Lua ops, its bookkeeping, the priority waits)"
    )
    rep.notes.append(
        f"W2 (medians): workers were running a job {statistics.median(busy):.1%} of the"
        f" measured time (sum of job durations / slots / time); job wall duration mean"
        f" {statistics.median(mean_dur):.2f} ms, p90 {statistics.median(p90_dur):.2f} ms for"
        f" {ms:g} ms of CPU; CPU per job: daemon process {statistics.median(daemon_us):.0f} us,"
        f" redis-server {statistics.median(redis_us):.0f} us (jobs this long go one per cycle)"
    )
    return rep


# --- W3 --------------------------------------------------------------------------------


def w3(
    work: Path, variant: str, backlog: int = 2000, highs: int = 20, every_s: float = 0.01
) -> Report:
    """Priority preemption: a low backlog of ~2 ms jobs (``cpu``: burn_cpu(2),
    ``sleep``: sleep(0.002)); 0.5 s after the start ``highs`` trivial high jobs, one
    every ``every_s``. Wait = started_at (job hash) - push time."""
    rep = Report()
    name = f"w3-{variant}"
    with redis_server(work, name) as server:
        client = server.client
        assert client is not None
        if variant == "cpu":
            payloads = (job(f"b{i}", "burn_cpu", 2) for i in range(backlog))
        else:
            payloads = (job(f"b{i}", "sleep", 0.002) for i in range(backlog))
        push(client, "low", payloads)
        ids = [f"h{i}" for i in range(highs)]
        pushed: list[float] = []
        low_left: list[int] = []
        with outcomes(server, "h") as out, daemon(server, name) as d:
            ready = d.wait_ready()
            for k, job_id in enumerate(ids):
                _wait_until(ready + 0.5 + k * every_s)
                pipe = client.pipeline(transaction=False)
                pipe.lpush(queue_key("high"), job(job_id, "square", k))
                pipe.llen(queue_key("low"))
                pushed.append(time.time())
                low_left.append(int(pipe.execute()[1]))
            out.wait(highs)
        check_daemon(d, name, rep.notes)
        started = succeeded_fields(client, ids, "started_at", "W3")
    waits = [(float(st or 0) - t) * 1000 for st, t in zip(started, pushed, strict=True)]
    p50, worst = statistics.median(waits), max(waits)
    rep.figures[f"w3_{variant}"] = (p50, worst)
    what = "burn_cpu 2 ms" if variant == "cpu" else "sleep 2 ms"
    key = "W3" if variant == "cpu" else "W3 sleep"
    rep.rows.append(Row(
        key,
        f"{highs} high (1/{every_s * 1000:g} ms) over {backlog:,} low {what}:"
        " push->start p50 / max ms",
        f"{p50:.2f} / {worst:.2f}", "<= 3 / <= 5", verdict(p50 <= 3 and worst <= 5),
    ))  # fmt: skip
    rep.notes.append(
        f"{key}: waits ms sorted {[round(w, 2) for w in sorted(waits)]}; low backlog left"
        f" at the pushes {low_left[0]:,}..{low_left[-1]:,}"
    )
    if min(low_left) == 0:
        rep.notes.append(f"{key}: the low backlog ran out before the last high push!")
    return rep


# --- W4 --------------------------------------------------------------------------------


class Monitor:
    """A raw MONITOR connection collecting (time, source, command) lines on a thread."""

    _LINE = re.compile(rb'^\+(\d+\.\d+) \[\d+ ([^\]]+)\] "([^"]*)"')

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.sendall(b"MONITOR\r\n")
        buf = b""
        while b"\r\n" not in buf:
            buf += self._sock.recv(4096)
        self._buf = buf.split(b"\r\n", 1)[1]
        self._sock.settimeout(0.2)
        self.lines: list[tuple[float, str, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            self._buf += chunk
            *complete, self._buf = self._buf.split(b"\r\n")
            for line in complete:
                m = self._LINE.match(line)
                if m:
                    self.lines.append(
                        (float(m[1]), m[2].decode(), m[3].decode(errors="replace").lower())
                    )

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._sock.close()


def w4(work: Path, window_s: float = 20.0, settle_s: float = 2.0) -> Report:
    """An idle daemon: CPU seconds of its process tree and the Redis commands it issued."""
    rep = Report()
    with redis_server(work, "w4") as server, daemon(server, "w4") as d:
        client = server.client
        assert client is not None
        d.wait_ready()
        time.sleep(settle_s)
        mon = Monitor(server.port)
        try:
            me = str(client.client_info()["addr"])
            pids0 = sorted(p.pid for p in d.tree())
            t0 = time.time()
            before = cmdstats(client.info("commandstats"))
            c0, ns0 = d.cpu_s(), d.cpu_ns()
            time.sleep(window_s)
            c1, ns1 = d.cpu_s(), d.cpu_ns()
            after = cmdstats(client.info("commandstats"))
            t1 = time.time()
            pids1 = sorted(p.pid for p in d.tree())
            threads = [len(os.listdir(f"/proc/{pid}/task")) for pid in pids1]
            time.sleep(0.1)  # let the monitor read the last lines
        finally:
            mon.close()
    check_daemon(d, "W4", rep.notes)
    diff = after - before
    # Our own: the first INFO completes after its own snapshot, so the second counts it.
    diff -= Counter({"info": 1})
    total = sum(diff.values())
    ticks = (c1[0] - c0[0]) + (c1[1] - c0[1])
    main = d.proc.pid if d.proc else 0
    per = {pid: (ns1.get(pid, 0) - ns) / 1e9 for pid, ns in ns0.items()}
    cpu = sum(per.values())
    main_s = per.get(main, 0.0)
    sent = Counter(c for t, src, c in mon.lines if t0 <= t <= t1 and src not in (me, "lua"))
    inner = Counter(c for t, src, c in mon.lines if t0 <= t <= t1 and src == "lua")
    rep.figures["w4"] = (cpu, total)
    rep.rows.append(Row(
        "W4 cpu", f"idle {window_s:g} s: CPU s of daemon + workers",
        f"{cpu:.4f} s (daemon {main_s:.4f}, workers {cpu - main_s:.4f})",
        "<= 0.02 s", verdict(cpu <= 0.02),
    ))  # fmt: skip
    rep.rows.append(Row(
        "W4 redis",
        f"idle {window_s:g} s: Redis commands (commandstats diff minus ours)",
        f"{total} ({sum(sent.values())} sent, {sum(inner.values())} inside Lua)",
        "<= 10", verdict(total <= 10),
    ))  # fmt: skip
    rep.notes.append(
        f"W4: CPU from the scheduler's per-thread runtimes (/proc/PID/task/*/schedstat);"
        f" the 10 ms-tick figure from /proc/PID/stat is {ticks:.2f} s; threads per process"
        f" {threads} (daemon first)"
    )
    rep.notes.append(
        f"W4: commandstats diff {dict(sorted(diff.items()))}; MONITOR: sent by the daemon"
        f" {dict(sorted(sent.items()))}, run inside its Lua script {dict(sorted(inner.items()))}"
    )
    if pids0 != pids1:
        rep.notes.append(f"W4: the process tree changed during the window: {pids0} -> {pids1}")
    return rep


# --- W5 --------------------------------------------------------------------------------


def w5(work: Path, n: int = 200, every_s: float = 0.01) -> Report:
    """Pickup latency: one trivial job every ``every_s`` to an idle daemon."""
    rep = Report()
    with redis_server(work, "w5") as server:
        client = server.client
        assert client is not None
        ids = [f"p{i}" for i in range(n)]
        pushed: list[float] = []
        with outcomes(server, "p") as out, daemon(server, "w5") as d:
            d.wait_ready()
            time.sleep(1.0)
            t0 = time.time()
            for k, job_id in enumerate(ids):
                _wait_until(t0 + k * every_s)
                payload = job(job_id, "square", k)
                pushed.append(time.time())
                client.lpush(queue_key("normal"), payload)
            out.wait(n)
        check_daemon(d, "W5", rep.notes)
        started = succeeded_fields(client, ids, "started_at", "W5")
    lat = [(float(st or 0) - t) * 1000 for st, t in zip(started, pushed, strict=True)]
    p50, p99 = statistics.median(lat), percentile(lat, 99)
    rep.figures["w5"] = (p50, p99)
    rep.rows.append(Row(
        "W5", f"1 x*x job per {every_s * 1000:g} ms x {n}, idle daemon:"
        " push->start p50 / p99 ms",
        f"{p50:.2f} / {p99:.2f}", "<= 1 / <= 2", verdict(p50 <= 1 and p99 <= 2),
    ))  # fmt: skip
    top = sorted(lat)[-5:]
    rep.notes.append(
        f"W5 (push time = just before the LPUSH; start = started_at written by the worker):"
        f" min {min(lat):.2f} ms, p90 {percentile(lat, 90):.2f} ms,"
        f" 5 slowest {[round(x, 2) for x in top]} ms"
    )
    return rep


# --- starvation -------------------------------------------------------------------------


def starve(work: Path, loads: tuple[float, ...] = (0.5, 0.9, 1.0), seconds: float = 6.0) -> Report:
    """Strict priority's cost: how long a low job waits under a sustained stream of high
    jobs at a share of capacity. High jobs sleep 5 ms (2 slots: capacity 400 jobs/s);
    a low job is pushed every 0.25 s. Sleeping jobs keep CPU contention out of it."""
    rep = Report()
    job_s, slots = 0.005, 2
    for load in loads:
        name = f"starve-{int(load * 100)}"
        with redis_server(work, name) as server:
            client = server.client
            assert client is not None
            rate = load * slots / job_s
            highs, lows, pushed = 0, [], {}
            with daemon(server, name) as d:
                d.wait_ready()
                t0 = time.time()
                next_low = t0
                while time.time() - t0 < seconds:
                    now = time.time()
                    due = int((now - t0) * rate) - highs
                    if due > 0:
                        pipe = client.pipeline(transaction=False)
                        for _ in range(due):
                            pipe.lpush(queue_key("high"), job(f"h{highs}", "sleep", job_s))
                            highs += 1
                        pipe.execute()
                    if now >= next_low:
                        job_id = f"l{len(lows)}"
                        pushed[job_id] = time.time()
                        client.lpush(queue_key("low"), job(job_id, "sleep", job_s))
                        lows.append(job_id)
                        next_low += 0.25
                    time.sleep(0.001)
                stream_end = time.time()
                # The stream ends: every low job runs now (bounded wait).
                deadline = time.time() + WAIT_S
                while time.time() < deadline:
                    if all(
                        s == "succeeded"
                        for s, _ in job_fields(client, lows, "status", "started_at")
                    ):
                        break
                    time.sleep(0.05)
            started = succeeded_fields(client, lows, "started_at", "starve")
        waits = [(float(st or 0) - pushed[j]) * 1000 for j, st in zip(lows, started, strict=True)]
        during = [w for j, w in zip(lows, waits, strict=True) if pushed[j] + w / 1000 < stream_end]
        p50 = statistics.median(waits)
        rep.figures[name] = (p50, max(waits), len(during), len(lows))
        rep.rows.append(Row(
            "starve", f"low job's wait under a high stream at {load:.0%} of capacity"
            f" (5 ms jobs, {seconds:g} s): p50 / max ms [lows started during the stream]",
            f"{p50:,.1f} / {max(waits):,.1f} [{len(during)} of {len(lows)}]",
        ))  # fmt: skip
    return rep


# --- memory ----------------------------------------------------------------------------


def memory(work: Path, per_round: int, rounds: int = 2) -> Report:
    """RSS of the daemon's process tree at idle and after each round of trivial jobs."""
    rep = Report()
    points: list[tuple[int, int, int, int]] = []  # (jobs done, rss, pss, processes)
    rates: list[float] = []
    with redis_server(work, "mem") as server, daemon(server, "mem") as d:
        client = server.client
        assert client is not None
        d.wait_ready()
        time.sleep(1.0)
        points.append((0, *d.rss()))
        for r in range(rounds):
            prefix = f"m{r}-"
            with outcomes(server, prefix) as out:
                t = time.time()
                push(client, "normal", (job(f"{prefix}{i}", "square", i) for i in range(per_round)))
                end = out.wait(per_round, max(WAIT_S, per_round / 500))
            rates.append(per_round / (end - t))
            time.sleep(1.0)
            points.append(((r + 1) * per_round, *d.rss()))
            log(f"memory round {r + 1}/{rounds}: {points[-1][1] / MB:.1f} MB")
        st = statuses(client, [f"m{rounds - 1}-{i}" for i in range(0, per_round, 97)])
        if set(st) != {"succeeded"}:
            raise RuntimeError(f"memory: statuses {st}")
        redis_used = int(client.info("memory")["used_memory"])
    check_daemon(d, "memory", rep.notes)
    idle = points[0][1]
    rep.figures["rss"] = [p[1] for p in points]
    rep.rows.append(Row(
        "RSS idle", f"daemon + workers ({points[0][3]} processes) at idle: RSS sum",
        f"{idle / MB:.1f} MB (PSS {points[0][2] / MB:.1f})", "<= 80 MB", verdict(idle <= 80 * MB),
    ))  # fmt: skip
    for (done, rss, pss, _), (prev_done, prev, _, _) in zip(points[1:], points, strict=False):
        rep.rows.append(Row(
            "RSS",
            f"  after {done:,} jobs [growth since {prev_done:,}]",
            f"{rss / MB:.1f} MB [{(rss - prev) / MB:+.1f} MB] (PSS {pss / MB:.1f})",
            "growth <= 2 MB", verdict(rss - prev <= 2 * MB),
        ))  # fmt: skip
    rep.notes.append(
        "memory: sustained rate while pushing (push start -> last outcome) "
        + ", ".join(f"{x:,.0f}" for x in rates)
        + f" jobs/s; redis used_memory at the end {redis_used / MB:.0f} MB (job hashes and"
        " done lists live there, not in the daemon)"
    )
    return rep
