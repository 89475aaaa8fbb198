"""``prioqd``: run the daemon, submit jobs, inspect queues and dead letters.

Exit status: 0 success; 1 a job ended dead, Redis could not be reached, or the daemon
could not serve [metrics] listen (perhaps only for now: systemd retries);
2 bad usage or configuration, a Redis URL no connection can be made from included
(systemd's ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from prioqd import __version__
from prioqd.config import DEFAULT_CONFIG_PATH, Config, RedisConfig, check_redis_url, load, mask_url
from prioqd.errors import (
    BrokerError,
    ConfigError,
    ConnectionSetupError,
    MetricsListenError,
    PrioqdError,
    WorkerStartError,
)

if TYPE_CHECKING:
    from prioqd.admin import Admin
    from prioqd.broker import Broker

from prioqd.keys import Keys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _config(args: argparse.Namespace, *, must_exist: bool) -> Config:
    path = args.config
    if path is None and not must_exist and not os.path.exists(DEFAULT_CONFIG_PATH):
        cfg = Config()
    else:
        cfg = load(path or DEFAULT_CONFIG_PATH)
    if getattr(args, "url", None):
        # Checked as [redis] url is: a password in it would end up in shell histories.
        if problem := check_redis_url(args.url):
            raise ConfigError("--url", None, f"{problem}, got {mask_url(args.url)!r}")
        cfg = cfg.replace(redis=RedisConfig(**{**cfg.redis.__dict__, "url": args.url}))
    return cfg


def _broker(cfg: Config, socket_timeout_s: float | None = None) -> Broker:
    """A client connection as the daemon makes it (imported here: most commands need
    no Redis, and redis-py is slow to import)."""
    from prioqd.broker import Broker

    return Broker.from_config(cfg, socket_timeout_s=socket_timeout_s)


def clean(value: object) -> str:
    """``value`` as text safe for a terminal: control characters (escape sequences that
    a payload or task name may carry) are shown escaped, never sent raw."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _arg_value(text: str) -> Any:
    """A command-line argument as JSON when it parses (``7``, ``[1,2]``), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return int(uvloop.run(coro))


# --- run -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from prioqd import log
    from prioqd.daemon import serve

    cfg = _config(args, must_exist=True)
    log.configure(cfg.log.level, cfg.log.format)
    try:
        return _run_async(serve(cfg))
    except WorkerStartError as exc:
        log.get_logger().critical("cannot start worker processes", error=str(exc))
        print(f"prioqd: cannot start worker processes: {clean(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except MetricsListenError as exc:
        log.get_logger().critical("cannot serve metrics", error=str(exc))
        print(f"prioqd: {clean(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except ConnectionSetupError as exc:
        log.get_logger().critical("bad redis.url", error=str(exc))
        print(f"prioqd: config error: {clean(cfg.path)}: redis.url: {clean(exc)}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=True)
    print(f"{clean(cfg.path)}: ok")
    return EXIT_OK


# --- submit ------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    kwargs: Any = {}
    if args.kwargs is not None:
        try:
            kwargs = json.loads(args.kwargs)
        except ValueError as exc:
            print(f"prioqd: --kwargs is not valid JSON: {clean(exc)}", file=sys.stderr)
            return EXIT_CONFIG
        if not isinstance(kwargs, dict):
            print("prioqd: --kwargs must be a JSON object", file=sys.stderr)
            return EXIT_CONFIG
    if args.unique and args.id is None:
        print(
            "prioqd: --unique needs --id: the id is what makes two jobs the same job",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return _run_async(_submit(cfg, args, [_arg_value(a) for a in args.args], kwargs))


async def _submit(
    cfg: Config, args: argparse.Namespace, values: list[Any], kwargs: dict[str, Any]
) -> int:
    """Push the job as ``prioqd.AsyncClient`` does (the same checks, the same Lua
    ``enqueue``: for --unique, the check and the push are one step)."""
    from prioqd.client import AsyncClient

    broker = _broker(cfg, socket_timeout_s=max(args.wait_timeout_s + 5, 10))
    client = AsyncClient.from_config(cfg, redis=broker.redis)
    try:
        options = client.options(
            priority=args.priority,
            id=args.id,
            timeout_s=args.timeout_s,
            max_retries=args.max_retries,
            delay_s=args.delay_s,
            unique=args.unique,
        )
        try:
            # Every keyword here is the task's: --kwargs '{"priority": 1}' is an argument.
            handle = await options.enqueue(args.task, *values, **kwargs)
        except ValueError as exc:
            print(f"prioqd: {clean(exc)}", file=sys.stderr)
            return EXIT_CONFIG
        print(clean(handle.id), flush=True)
        if handle.duplicate:
            print(
                f"prioqd: duplicate: unique job {clean(handle.id)} is already queued or "
                "running; nothing was pushed" + (", waiting for it" if args.wait else ""),
                file=sys.stderr,
            )
        if not args.wait:
            return EXIT_OK
        try:
            outcome = await handle.outcome(args.wait_timeout_s)
        except TimeoutError:
            print(f"prioqd: no outcome within {args.wait_timeout_s:g}s", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(outcome, indent=2))
        return EXIT_OK if outcome.get("status") == "succeeded" else EXIT_FAILED
    finally:
        await broker.close()


# --- status ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _admin(cfg: Config) -> AsyncIterator[Admin]:
    from prioqd.admin import Admin

    broker = _broker(cfg)
    try:
        yield Admin(broker, cfg)
    finally:
        await broker.close()


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_status(cfg, args.json))


async def _status(cfg: Config, as_json: bool) -> int:
    from prioqd.admin import age_text as _age

    async with _admin(cfg) as admin:
        st = await admin.status()
    if as_json:
        print(json.dumps(st.to_dict(), indent=2))
        return EXIT_OK
    print(f"{'queue':<20} {'depth':>8}  {'oldest':>8}  state")
    for q in st.queues:
        state = "PAUSED" if q.paused else "serving" if q.served else "no daemon"
        if not q.configured:
            state += (
                " (served by another daemon)" if q.served else " (UNSERVED: no daemon reads it)"
            )
        print(f"{clean(q.priority):<20} {q.depth:>8}  {_age(q.oldest_age_s):>8}  {state}")
    print(f"{'(scheduled)':<20} {st.scheduled:>8}")
    print(f"{'(dead letters)':<20} {st.dead:>8}")
    print(f"\nin flight: {st.in_flight}")
    print(f"daemons alive: {len(st.alive)}")
    if st.daemons:
        print(
            f"  {'id':<36} {'host':<16} {'pid':>7} {'slots':>5} {'in flight':>9} {'lease':>7}"
            "  last error"
        )
        for d in st.daemons:
            lease = f"{d.lease_left_s}s" if d.alive else "expired"
            slots = "?" if d.slots is None else str(d.slots)
            print(
                f"  {clean(d.id):<36} {clean(d.host):<16} {clean(d.pid):>7} "
                f"{slots:>5} {d.in_flight:>9} {lease:>7}  {clean(d.last_error[:80]) or '-'}"
            )
    if st.running:
        print(f"\nrunning jobs: {sum(1 for j in st.running if j.state == 'running')}")
        print(f"  {'id':<34} {'task':<20} {'queue':<10} {'daemon':<36} {'runtime':>8}")
        for j in st.running:
            runtime = _age(j.running_s) if j.state == "running" else "claimed"
            print(
                f"  {clean(j.id or '-'):<34} {clean(j.task or '?'):<20} "
                f"{clean(j.priority):<10} {clean(j.daemon):<36} {runtime:>8}"
            )
    return EXIT_OK


# --- inspect, cancel ------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_inspect(cfg, args.job_id, args.json))


async def _inspect(cfg: Config, job_id: str, as_json: bool) -> int:
    from prioqd.admin import describe

    async with _admin(cfg) as admin:
        info = await admin.inspect(job_id)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(f"job {clean(job_id)}: {clean(describe(info))}")
        if info.where.traceback:
            print("traceback:")
            for line in info.where.traceback.rstrip().splitlines():
                print(f"    {clean(line)}")
        if info.fields:
            print("hash:")
            for k in sorted(info.fields):
                v = info.fields[k]
                if k == "traceback" and info.where.traceback:
                    continue
                print(f"  {clean(k)}: {clean(v)}")
        if info.payload is not None:
            print(f"payload: {clean(info.payload[:2000])}")
    return EXIT_OK if info.found else EXIT_FAILED


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_cancel(cfg, args.job_ids, args.json, args.wait_s))


async def _cancel(cfg: Config, job_ids: list[str], as_json: bool, wait_s: float) -> int:
    async with _admin(cfg) as admin:
        results = await admin.cancel(job_ids, wait_s=wait_s)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for res in results:
            print(f"{clean(res.id)}: {res.outcome} ({clean(res.detail)})")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


# --- pause, resume --------------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_pause(cfg, args.priorities, args.command == "pause", args.json))


async def _pause(cfg: Config, priorities: list[str], pause: bool, as_json: bool) -> int:
    async with _admin(cfg) as admin:
        if pause:
            paused = await admin.pause(priorities)
        else:
            paused = await admin.resume(priorities)
    if as_json:
        print(json.dumps({"paused": paused}))
    else:
        print(f"paused: {', '.join(clean(p) for p in paused) or 'none'}")
    return EXIT_OK


# --- dead letters ------------------------------------------------------------------------


def cmd_dead(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_dead(cfg, args))


async def _dead(cfg: Config, args: argparse.Namespace) -> int:
    async with _admin(cfg) as admin:
        if args.action == "list":
            letters = await admin.dead_letters(limit=args.limit)
            return _dead_list([x.to_dict() for x in letters], args.json)
        if args.action == "purge":
            n = await admin.purge()
            if args.json:
                print(json.dumps({"purged": n}))
            else:
                print(f"purged {n} dead letter(s)")
            return EXIT_OK
        res = await admin.requeue(args.ids, everything=args.all)
    code = EXIT_FAILED if res.missing or res.duplicates else EXIT_OK
    if args.json:
        print(
            json.dumps(
                {
                    "requeued": res.moved,
                    "missing": res.missing,
                    "gone": res.gone,
                    "duplicate": res.duplicates,
                }
            )
        )
        return code
    for job_id in res.gone:
        print(f"prioqd: the payload of {clean(job_id)} is gone", file=sys.stderr)
    for job_id in res.duplicates:
        print(
            f"prioqd: {clean(job_id)} not requeued: a unique job of that id is queued or"
            " running (its dead letter stays)",
            file=sys.stderr,
        )
    print(f"requeued {res.moved} dead letter(s)")
    for job_id in res.missing:
        print(f"prioqd: no dead letter with id {clean(job_id)!r}", file=sys.stderr)
    return code


def _dead_list(entries: list[dict[str, Any]], as_json: bool) -> int:
    from prioqd.admin import when_text as _when

    if as_json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        print("no dead letters")
    for e in entries:
        when = _when(_float_or_none(e.get("dead_at")))
        print(
            f"{when}  id={clean(e.get('id') or '-')}  task={clean(e.get('task') or '-')}  "
            f"queue={clean(e.get('priority') or '-')}  attempts={clean(e.get('attempts', 0))}"
        )
        print(f"    reason: {clean(e.get('reason'))}")
    return EXIT_OK


def _float_or_none(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# --- web ---------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=True)
    try:
        from prioqd.web import serve as serve_web
    except ImportError as exc:
        print(
            f"prioqd: the dashboard needs the 'web' extra (pip install 'prioqd[web]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return serve_web(cfg, listen=args.listen, read_only=args.read_only)


# --- periodic jobs ----------------------------------------------------------------------


def cmd_schedule(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=True)
    return _run_async(_schedule_list(cfg, args.json))


async def _schedule_list(cfg: Config, as_json: bool) -> int:
    from prioqd import periodic
    from prioqd.broker import wrap_errors

    keys = Keys(cfg.queues.prefix)
    broker = _broker(cfg)
    try:
        with wrap_errors("schedule list"):
            r: Any = broker.redis
            now_s, now_us = await r.time()
            last = await r.hgetall(keys.periodic)
    finally:
        await broker.close()
    now = now_s + now_us / 1e6
    rows = []
    for entry in cfg.schedule:
        # The tick last handled may not have been pushed (the first catch-up of a new
        # schedule is only recorded): "last enqueued" is the last one pushed.
        handled = last.get(entry.name.encode())
        pushed = last.get(f"{entry.name}:enqueued".encode())
        rows.append(
            {
                "name": entry.name,
                "when": periodic.describe(entry),
                "task": entry.task,
                "priority": entry.priority,
                "catch_up": entry.catch_up,
                "next_run": periodic.iso(periodic.next_tick(entry, now)),
                "last_enqueued": periodic.iso(int(pushed) / 1000) if pushed else None,
                "last_handled": periodic.iso(int(handled) / 1000) if handled else None,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no [[schedule]] entries in {clean(cfg.path)}")
    for row in rows:
        print(
            f"{clean(row['name'])}: {clean(row['when'])} -> {clean(row['task'])} "
            f"(queue {clean(row['priority'])}, catch_up {row['catch_up']})"
        )
        line = f"    next run {row['next_run']}, last enqueued {row['last_enqueued'] or 'never'}"
        if row["last_handled"] and row["last_handled"] != row["last_enqueued"]:
            line += f" (tick {row['last_handled']} recorded, not enqueued)"
        print(line)
    return EXIT_OK


# --- parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML configuration (default: {DEFAULT_CONFIG_PATH}; "
        "commands other than run fall back to built-in defaults if it is absent)",
    )
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--url", help="Redis URL, overriding [redis] url")

    parser = argparse.ArgumentParser(prog="prioqd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"prioqd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[client], help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[client], help="validate the configuration")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("submit", parents=[client], help="push a job, optionally wait for it")
    p.add_argument("task")
    p.add_argument("args", nargs="*", metavar="ARG", help="JSON if it parses, else a string")
    p.add_argument("--priority", "-p", help="priority (default: the middle one)")
    p.add_argument("--kwargs", help="keyword arguments as a JSON object")
    p.add_argument("--id", help="job id (default: a random one)")
    p.add_argument("--timeout-s", dest="timeout_s", type=float)
    p.add_argument("--max-retries", dest="max_retries", type=int)
    p.add_argument("--delay-s", dest="delay_s", type=float)
    p.add_argument(
        "--unique",
        action="store_true",
        help="with --id: push only if no job of that id is queued, scheduled or running",
    )
    p.add_argument("--wait", action="store_true", help="wait for the outcome and print it")
    p.add_argument("--wait-timeout-s", type=float, default=300.0)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[client], help="queue depths, jobs in flight, daemons")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("inspect", parents=[client], help="a job's hash and where it is now")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cancel", parents=[client], help="cancel queued, scheduled or running jobs")
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--wait-s",
        type=float,
        default=3.0,
        help="how long to wait for a daemon to stop a running job (default 3)",
    )
    p.set_defaults(func=cmd_cancel)

    for name, text in (("pause", "stop daemons claiming from priorities (kept in Redis)"),
                       ("resume", "let daemons claim from paused priorities again")):  # fmt: skip
        p = sub.add_parser(name, parents=[client], help=text)
        p.add_argument("priorities", nargs="+", metavar="PRIORITY")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_pause)

    p = sub.add_parser("web", parents=[client], help="serve the web dashboard")
    p.add_argument("--listen", metavar="HOST:PORT", help="overrides [web] listen")
    p.add_argument("--read-only", action="store_true", help="show no action at all")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("schedule", help="periodic jobs ([[schedule]] in the config)")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ssub.add_parser("list", parents=[client], help="entries, next run, last enqueued tick")
    s.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("dead", help="list, requeue or purge dead letters")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("list", parents=[client], help="show dead letters, newest first")
    d.add_argument("--limit", type=int, default=50, help="read only this many (default 50)")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("requeue", parents=[client], help="push dead letters back on their queue")
    d.add_argument("ids", nargs="*", metavar="ID")
    d.add_argument("--all", action="store_true")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("purge", parents=[client], help="delete every dead letter")
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dead" and args.action == "requeue" and not (args.ids or args.all):
        parser.error("dead requeue: give job ids or --all")
    try:
        return int(args.func(args))
    # Error texts carry what Redis or a file held (queue names, keys, paths): escaped
    # like every other output.
    except ConfigError as exc:
        print(f"prioqd: config error: {clean(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except ConnectionSetupError as exc:
        print(f"prioqd: config error: redis.url: {clean(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerError as exc:
        print(f"prioqd: redis error: {clean(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except PrioqdError as exc:
        print(f"prioqd: {clean(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
