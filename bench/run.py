"""prioqd benchmark: one command, a table of figures.

    make bench                            # or: .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --only W1,W3 --quick
    .venv/bin/python bench/run.py --write-results   # also rewrites bench/RESULTS.md
    make bench-peers                      # or: .venv/bin/python bench/run.py --peers
    .venv/bin/python bench/run.py --peers dramatiq,huey,rq --only W3 --quick

Every workload starts throwaway redis-servers of its own on free loopback ports
(never the shared one on 6379) and the daemon as a real ``prioqd run`` process with
the default configuration (only the Redis URL, the task module - bench/benchtasks.py,
the same bodies for every --rev - and the priorities for the levels runs are set),
exactly as a user runs it. Workloads: CEILING, W1..W5, MEM, SCALE
(backlogs), LEVELS (3 and 10 priority levels).

``--peers`` runs prioqd beside Dramatiq and Huey (and RQ) instead: see peers.py.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import harness
import peers
import workloads as wl
from harness import OtherLoad, log

HERE = Path(__file__).resolve().parent
WORKLOADS = ["CEILING", "W1", "W2", "W3", "W4", "W5", "STARVE", "MEM", "SCALE", "LEVELS"]
ALIASES = {"MEMORY": "MEM", "CEIL": "CEILING", "BACKLOG": "SCALE"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def redis_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def machine() -> str:
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu_model()}), Python "
        f"{platform.python_version()}, {platform.machine()}, {platform.system()} "
        f"{platform.release()}, redis-server {redis_version()}"
    )


#: Other processes keeping more CPU than this busy during a workload disturb it.
NOISY_CPU = 0.25
LEGEND = (
    f"other load: CPUs kept busy by processes outside the benchmark during the workload;"
    f" '!' above {NOISY_CPU} - that figure is disturbed by them"
)


def load_cell(load: float | None) -> str:
    if load is None:
        return ""
    return f"{load:.2f} CPU{' !' if load > NOISY_CPU else ''}"


def table(rows: list[wl.Row]) -> list[str]:
    heads = ("", "workload", "result", "target", "", "other load")
    cells = [
        (
            r.key,
            r.what,
            r.value,
            r.target,
            r.verdict,
            load_cell(r.other_load),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [heads, *cells]) for i in range(len(heads))]
    out = []
    for c in [heads, *cells]:
        out.append("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    return out


def markdown(rows: list[wl.Row]) -> list[str]:
    out = [
        "| | workload | result | target | | other load |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = load_cell(r.other_load)
        what = r.what.strip().replace("*", "\\*")
        out.append(f"| {r.key} | {what} | {r.value} | {r.target} | {r.verdict} | {load} |")
    return out


METHOD = [
    '- Every workload starts its own redis-server (`--save "" --appendonly no`) on a free',
    "  loopback port and stops it by pid; the daemon is `python -m prioqd.cli run --config",
    "  F` where F sets only `[redis] url` (and `[queues] priorities` for 10 levels).",
    "- Time origin (W1, W2, scale, levels): the `started_at` the daemon writes into its",
    "  info hash as it registers in `prioqd:daemons` (jobs are queued before it starts).",
    "  End: arrival of the last outcome on `prioqd:events` at a subscriber that was",
    "  subscribed before the daemon started. Every job's status is checked afterwards.",
    "- W2 ideal time: 400 x 5 ms / slots (slots as the daemon registered them).",
    "- W3, W5 wait: `started_at` from the job hash (the worker's clock) minus the time",
    "  taken just before the LPUSH; same host, same clock.",
    "- W4: ready, 2 s to settle, then INFO commandstats, 20 s, INFO commandstats; the",
    "  diff minus our own first INFO. Commands that the daemon's Lua scripts run are",
    "  counted by commandstats too; a MONITOR connection splits sent from in-script.",
    "  CPU: on-CPU time of every thread of the daemon and its workers from",
    "  /proc/PID/task/*/schedstat (ns), the clock-tick figure in the notes.",
    "- Memory: RSS (and PSS) summed over the daemon's process tree (psutil), 1 s after",
    "  ready, then 1 s after the last outcome of each round of trivial jobs pushed in",
    "  pipelined LPUSH chunks.",
    "- Ceiling: `loop.run_in_executor(pool, noop)` with a ProcessPoolExecutor of",
    "  CPU-count forkserver workers, warmed up, no Redis, on the stock asyncio loop.",
    "- Scale: the backlog is LPUSHed into `low` first, the 5,000 measured jobs RPUSHed",
    "  to its head; the rounds interleave the sizes (and the level counts), and the",
    "  cost ratio is the median of per-round ratios.",
    "- CPU per job in the notes: on-CPU time (schedstat) over the measured window.",
]


def write_results(
    path: Path, command: str, started: datetime.datetime, runtime_s: float,
    rows: list[wl.Row], notes: list[str], header: list[str], code: str,
) -> None:  # fmt: skip
    lines = [
        "# prioqd benchmark results",
        "",
        "Written by `bench/run.py --write-results` from the run below; rerun to refresh.",
        "",
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M %Z} (runtime {runtime_s / 60:.1f} min)",
        f"- Machine: {machine()}",
        *(f"- {h}" for h in header),
        f"- Code: {code}",
        "",
        "Each workload runs against throwaway redis-servers of its own on loopback and a",
        "real `prioqd run` with the default configuration (info-level JSON logs to a file,",
        '`slots = "auto"`), its tasks from `bench/benchtasks.py` (the same bodies for every',
        "`--rev`; `square` is x*x and nothing else: until 2026-11-30 it was",
        "`prioqd.examples.square`, whose `sleep(0)` cost each job a system call). A figure",
        "with `(n=5: a-b)` is the median of five runs, with",
        "their range (seven interleaved rounds for scale and levels); W3, W4, W5 and",
        "memory are one run each.",
        "The machine is shared: the last column is how many CPUs processes outside the",
        f"benchmark kept busy during that workload; '!' marks more than {NOISY_CPU} CPU, where",
        "the figure is disturbed (on 2 CPUs every such process competes with the daemon).",
        "",
        *markdown(rows),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in notes),
        "",
        "## Method",
        "",
        *METHOD,
        "",
    ]
    old = path.read_text() if path.exists() else ""
    if PEERS_BEGIN in old and PEERS_END in old:  # written by --peers: kept as it is
        section = old[old.index(PEERS_BEGIN) : old.index(PEERS_END) + len(PEERS_END)]
        lines += [section, ""]
    path.write_text("\n".join(lines))


PEERS_BEGIN = "<!-- peers: written by bench/run.py --peers --write-results -->"
PEERS_END = "<!-- /peers -->"


def write_peers_section(path: Path, section: list[str]) -> None:
    """Put the peers section into RESULTS.md: in place of the last one, or at the end;
    the rest of the file is left as it is."""
    block = "\n".join([PEERS_BEGIN, *section, PEERS_END])
    old = path.read_text() if path.exists() else "# prioqd benchmark results\n"
    if PEERS_BEGIN in old and PEERS_END in old:
        head, rest = old.split(PEERS_BEGIN, 1)
        tail = rest.split(PEERS_END, 1)[1]
        path.write_text(head + block + tail)
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + block + "\n")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(HERE.parent), *args],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""


def code_state() -> str:
    """The commit, plus what is uncommitted in the code the daemon runs (prioqd is
    installed editable: the benchmark measures the working tree)."""
    head = _git("rev-parse", "--short", "HEAD").strip() or "?"
    paths = ["prioqd", "pyproject.toml"]
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", *paths).splitlines()]
    if not dirty:
        return f"{head} (clean)"
    digest = hashlib.sha1(_git("diff", "HEAD", "--", *paths).encode()).hexdigest()[:10]
    return f"{head} + uncommitted changes to {', '.join(dirty)} (diff sha1 {digest})"


def export_rev(rev: str, dest: Path) -> str:
    """Export prioqd/ as of ``rev`` into ``dest`` and point the daemons at it."""
    sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    if not sha:
        raise RuntimeError(f"--rev {rev!r}: not a commit")
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", sha, "prioqd"],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    harness.CODE_DIR = dest
    return f"{sha[:7]} ({rev}, exported with git archive; the working tree is not used)"


class Overrun(BaseException):
    """Raised by SIGALRM past --max-minutes; a BaseException so that no workload's
    error handling swallows it (the ``finally`` blocks still stop every process)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Overrun("the benchmark ran past --max-minutes")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


PEER_WORKLOADS = ["W1", "W2", "W3", "W4", "W5"]


def _start(args: argparse.Namespace) -> tuple[float, Path, str] | int:
    """Signals, the --max-minutes alarm, the load of other processes, the work dir and
    the code measured; or an exit status."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(int(args.max_minutes * 60))
    log("measuring the load of other processes for 3 s ...")
    pre = OtherLoad()
    time.sleep(3)
    pre_load = pre.stop()
    work = Path(tempfile.mkdtemp(prefix="prioqd-bench-"))
    if args.rev:
        try:
            code = export_rev(args.rev, work / "code")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            print(exc, file=sys.stderr)
            return 2
    else:
        code = code_state()
    return pre_load, work, code


def _end(args: argparse.Namespace, work: Path) -> None:
    """The alarm off; the work dir removed unless --keep."""
    signal.alarm(0)
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _header(
    args: argparse.Namespace, first: list[str], pre_load: float, aborted: str, code: str
) -> list[str]:
    """The lines above the table: ``first``, the load, an abort, a change of code."""
    header = [
        *first,
        f"Load of other processes before the start: {pre_load:.2f} CPU; load average at"
        f" the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    if aborted:
        header.append(f"ABORTED: {aborted}; the table is partial")
    code_after = code if args.rev else code_state()
    if code_after != code:
        header.append(f"THE CODE CHANGED DURING THE RUN: {code} -> {code_after}")
    return header


def run_peers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--peers``: prioqd beside its peers, the same workloads, interleaved rounds."""
    names = [n.strip().lower() for n in str(args.peers).split(",") if n.strip()]
    unknown = [n for n in names if n not in peers.PEERS]
    if unknown or not names:
        parser.error(f"--peers: unknown {unknown}; choose from {list(peers.PEERS)}")
    selected = PEER_WORKLOADS
    if args.only:
        selected = [w.strip() for w in args.only.upper().split(",")]
        if any(w not in PEER_WORKLOADS for w in selected):
            parser.error(f"--peers --only: choose from {PEER_WORKLOADS}")
    plan = peers.Plan(
        rounds=args.repeat or (1 if args.quick else 3),
        workloads=selected,
        peers=names,
        cache=args.peers_cache,
    )
    print(f"prioqd beside {', '.join(names)} on {machine()}", flush=True)
    log(f"CPU: {cpu_model()}")
    started_state = _start(args)
    if isinstance(started_state, int):
        return started_state
    pre_load, work, code = started_state
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    aborted = ""
    res = peers.Results(["prioqd", *names])
    log(f"work dir {work}; {plan.rounds} rounds of {','.join(selected)}")
    try:
        res = peers.run(plan, work)
    except (KeyboardInterrupt, Overrun) as exc:
        aborted = f"{type(exc).__name__} {exc}"
        log(f"ABORTED: {aborted}")
        res = peers.PARTIAL or res
    finally:
        _end(args, work)
    runtime = time.monotonic() - t_start
    header = _header(
        args,
        [
            f"Rounds: {plan.rounds}, interleaved (every workload runs for every system in"
            " turn, the order rotated by one each round); each figure is the median of the"
            " rounds"
        ],
        pre_load,
        aborted,
        code,
    )
    head, cells = peers.rows(res)
    notes = [*res.notes, *peers.detail_notes(res), peers.NOT_INCLUDED]
    print()
    print(f"CPU: {cpu_model()}")
    print(f"prioqd beside {', '.join(names)} on {machine()}")
    print(f"{started:%Y-%m-%d %H:%M %Z}, runtime {runtime:.0f} s; code {code}")
    print("\n".join(header))
    print()
    print("\n".join(peers.text_table(head, cells)))
    print(peers.LEGEND)
    print()
    print("\n".join(f"- {n}" for n in notes))
    if args.write_results:
        command = " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
        section = [
            "",
            "## prioqd beside its peers",
            "",
            "Written by `bench/run.py --peers --write-results` (`make bench-peers`); the",
            "sections above by `bench/run.py --write-results`, which keeps this one.",
            "",
            f"- Command: `{command}`",
            f"- Date: {started:%Y-%m-%d %H:%M %Z} (runtime {runtime / 60:.1f} min)",
            f"- CPU: {cpu_model()}",
            f"- Machine: {machine()}",
            *(f"- {h}" for h in header),
            f"- Code: {code}",
            "",
            *peers.md_table(head, cells),
            "",
            peers.LEGEND,
            "",
            "### Notes",
            "",
            *(f"- {n}" for n in notes),
            "",
            "### Method",
            "",
            *peers.METHOD,
            "",
        ]
        write_peers_section(HERE / "RESULTS.md", section)
        log(f"wrote the peers section of {HERE / 'RESULTS.md'}")
    if aborted:
        return 130
    return 1 if any("FAILED" in n for n in res.notes) else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W3,MEM")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts to iterate: 20k jobs for memory, no 1M backlog, one run each",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs of CEILING, W1, W2 (default 5) and rounds of SCALE, LEVELS (default 7)",
    )
    parser.add_argument("--write-results", action="store_true", help="rewrite bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--rev",
        help="benchmark prioqd as committed at this git revision (exported with git"
        " archive) instead of the working tree the editable install points at",
    )
    parser.add_argument("--max-minutes", type=float, default=20.0, help="abort past this")
    parser.add_argument(
        "--peers",
        nargs="?",
        const=",".join(peers.DEFAULT_PEERS),
        metavar="LIST",
        help="run prioqd beside its peers instead (default "
        f"{','.join(peers.DEFAULT_PEERS)}; known: {','.join(peers.PEERS)}): workloads"
        f" {','.join(PEER_WORKLOADS)}, 3 interleaved rounds (--repeat), each peer in a venv"
        " of its own under --peers-cache",
    )
    parser.add_argument(
        "--peers-cache",
        type=Path,
        default=Path(os.environ.get("PEERBENCH_CACHE", peers.DEFAULT_CACHE)),
        help="where the peers' venvs are kept between runs (default bench/.work/venvs,"
        " or $PEERBENCH_CACHE)",
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is required (scripts/ensure-redis.sh)", file=sys.stderr)
        return 1
    if args.peers is not None:
        return run_peers(args, parser)
    selected = WORKLOADS
    if args.only:
        selected = [ALIASES.get(w, w) for w in args.only.upper().replace(" ", "").split(",")]
        unknown = [w for w in selected if w not in WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
    reps = args.repeat or (1 if args.quick else 5)
    # Flatness compares W1 runs with each other: more rounds to beat their noise.
    flat_reps = args.repeat or (1 if args.quick else 7)
    mem_jobs = 20_000 if args.quick else 100_000
    backlogs = [10, 100_000] if args.quick else [10, 100_000, 1_000_000]

    if "W1" in selected and "CEILING" not in selected:
        selected = ["CEILING", *selected]  # W1 is reported as a fraction of it
    started_state = _start(args)
    if isinstance(started_state, int):
        return started_state
    pre_load, work, code = started_state
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    rows: list[wl.Row] = []
    notes: list[str] = []
    figures: dict[str, Any] = {}
    aborted = ""
    log(f"work dir {work}; workloads {','.join(w for w in WORKLOADS if w in selected)}")
    try:
        plan: list[tuple[str, Callable[[], wl.Report]]] = [
            ("CEILING", lambda: wl.ceiling(reps)),
            ("W1", lambda: wl.w1(work, reps, figures.get("ceiling"))),
            ("W2", lambda: wl.w2(work, reps)),
            ("W3", lambda: wl.w3(work, "cpu")),
            ("W3", lambda: wl.w3(work, "sleep")),
            ("W4", lambda: wl.w4(work)),
            ("W5", lambda: wl.w5(work)),
            ("STARVE", lambda: wl.starve(work)),
            ("MEM", lambda: wl.memory(work, mem_jobs)),
            ("SCALE", lambda: wl.scale(work, flat_reps, backlogs)),
            ("LEVELS", lambda: wl.levels(work, flat_reps, [3, 10])),
        ]
        for name, fn in plan:
            if name not in selected:
                continue
            log(f"{name} ...")
            load = OtherLoad()
            try:
                rep = fn()
            except (KeyboardInterrupt, Overrun) as exc:
                aborted = f"{type(exc).__name__} {exc} during {name}"
                log(f"ABORTED: {aborted}")
                break
            except Exception as exc:
                log(f"{name} failed: {exc!r}")
                rows.append(wl.Row(name, "FAILED", f"{type(exc).__name__}: {exc}"))
                continue
            other = load.stop()
            for row in rep.rows:
                row.other_load = other
            rows.extend(rep.rows)
            notes.extend(rep.notes)
            figures.update(rep.figures)
    finally:
        _end(args, work)
    runtime = time.monotonic() - t_start
    header = _header(args, [], pre_load, aborted, code)

    print()
    print(f"prioqd benchmark on {machine()}")
    print(f"{started:%Y-%m-%d %H:%M %Z}, runtime {runtime:.0f} s; code {code}")
    print("\n".join(header))
    print()
    print("\n".join(table(rows)))
    print(LEGEND)
    if notes:
        print()
        print("\n".join(f"- {n}" for n in notes))
    if args.write_results:
        command = " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
        write_results(HERE / "RESULTS.md", command, started, runtime, rows, notes, header, code)
        log(f"wrote {HERE / 'RESULTS.md'}")
    if aborted:
        return 130
    return 1 if any(r.what == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
