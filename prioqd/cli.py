"""``prioqd``: run the daemon, submit jobs, inspect queues and dead letters.

Exit status: 0 success; 1 a job ended dead, or Redis could not be reached;
2 bad usage or configuration (systemd's ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from prioqd import __version__
from prioqd.config import DEFAULT_CONFIG_PATH, Config, RedisConfig, load
from prioqd.errors import BrokerError, ConfigError, PrioqdError, WorkerStartError

if TYPE_CHECKING:
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
        cfg = cfg.replace(redis=RedisConfig(**{**cfg.redis.__dict__, "url": args.url}))
    return cfg


def _broker(cfg: Config, socket_timeout_s: float | None = None) -> Broker:
    """A client connection as the daemon makes it (password from the credential or
    ``PRIOQD_REDIS_PASSWORD``)."""
    from prioqd.broker import Broker
    from prioqd.systemd import redis_password

    return Broker(
        cfg.redis.url,
        Keys(cfg.queues.prefix),
        socket_timeout_s=socket_timeout_s or cfg.redis.socket_timeout_s,
        connect_timeout_s=cfg.redis.connect_timeout_s,
        password=redis_password(),
    )


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
        print(f"prioqd: cannot start worker processes: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=True)
    print(f"{cfg.path}: ok")
    return EXIT_OK


# --- submit ------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    kwargs: Any = {}
    if args.kwargs is not None:
        try:
            kwargs = json.loads(args.kwargs)
        except ValueError as exc:
            print(f"prioqd: --kwargs is not valid JSON: {exc}", file=sys.stderr)
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
    client = AsyncClient(
        redis=broker.redis,
        prefix=cfg.queues.prefix,
        priorities=cfg.queues.priorities,
        result_ttl_s=cfg.jobs.result_ttl_s,
        max_payload_bytes=cfg.jobs.max_payload_bytes,
    )
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
        print(handle.id, flush=True)
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


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_status(cfg, args.json))


async def _status(cfg: Config, as_json: bool) -> int:
    from prioqd.broker import wrap_errors

    keys = Keys(cfg.queues.prefix)
    broker = _broker(cfg)
    try:
        with wrap_errors("status"):
            r: Any = broker.redis
            found = await broker.queues()
            queues = {p: found.get(p, 0) for p in cfg.queues.priorities}
            unserved = {p: n for p, n in found.items() if p not in queues}
            scheduled = await r.zcard(keys.scheduled)
            dead = await r.llen(keys.dead)
            daemons = []
            for daemon_id, info, lease_ms in await broker.daemons():
                prios = info.get("priorities", "").split(",")
                landed = sum([await r.llen(keys.landing(daemon_id, p)) for p in prios if p])
                held = await r.hlen(keys.inflight(daemon_id))
                daemons.append(
                    {
                        "id": daemon_id,
                        "host": info.get("host", "?"),
                        "pid": info.get("pid", "?"),
                        "slots": info.get("slots", "?"),
                        "priorities": [p for p in prios if p],
                        "in_flight": held + landed,
                        "lease_left_s": round(lease_ms / 1000, 1),
                        "alive": lease_ms > 0,
                    }
                )
    finally:
        await broker.close()
    served = {p for d in daemons if d["alive"] for p in d["priorities"]}
    report = {
        "queues": queues,
        "unserved_queues": unserved,
        "scheduled": scheduled,
        "dead": dead,
        "in_flight": sum(d["in_flight"] for d in daemons),
        "daemons": daemons,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"{'queue':<20} {'depth':>8}")
    for p, n in queues.items():
        print(f"{clean(p):<20} {n:>8}")
    for p, n in unserved.items():
        note = "served by another daemon" if p in served else "UNSERVED: no daemon reads it"
        print(f"{clean(p):<20} {n:>8}  ({note})")
    print(f"{'(scheduled)':<20} {scheduled:>8}")
    print(f"{'(dead letters)':<20} {dead:>8}")
    print(f"\nin flight: {report['in_flight']}")
    alive = [d for d in daemons if d["alive"] is True]
    print(f"daemons alive: {len(alive)}")
    if daemons:
        print(f"  {'id':<36} {'host':<16} {'pid':>7} {'slots':>5} {'in flight':>9} {'lease':>7}")
        for d in daemons:
            lease = f"{d['lease_left_s']}s" if d["alive"] else "expired"
            print(
                f"  {clean(d['id']):<36} {clean(d['host']):<16} {clean(d['pid']):>7} "
                f"{clean(d['slots']):>5} {d['in_flight']:>9} {lease:>7}"
            )
    return EXIT_OK


# --- dead letters ------------------------------------------------------------------------


def cmd_dead(args: argparse.Namespace) -> int:
    cfg = _config(args, must_exist=False)
    return _run_async(_dead(cfg, args))


def _entry_payload(entry: dict[str, Any]) -> bytes:
    import base64

    if "payload_b64" in entry:
        return base64.b64decode(entry["payload_b64"])
    return str(entry.get("payload", "")).encode("utf-8")


def _parse_letter(raw: bytes) -> dict[str, Any]:
    from prioqd.jobs import payload_field

    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        entry = {"reason": "unreadable dead letter", **payload_field(raw)}
    return entry


async def _dead(cfg: Config, args: argparse.Namespace) -> int:
    from prioqd.broker import wrap_errors

    keys = Keys(cfg.queues.prefix)
    broker = _broker(cfg)
    try:
        with wrap_errors("dead letters"):
            r: Any = broker.redis
            if args.action == "list":
                raw_entries = await r.lrange(keys.dead, 0, max(0, args.limit) - 1)
                entries = [_parse_letter(raw) for raw in raw_entries]
                for entry in entries:
                    pkey = entry.get("payload_key")
                    if isinstance(pkey, str) and "payload" not in entry:
                        head = await r.getrange(pkey, 0, 199)
                        entry["payload_head"] = head.decode("utf-8", "replace")
                return _dead_list(entries[: max(0, args.limit)], args.json)
            if args.action == "purge":
                n = await broker.purge_dead()
                print(f"purged {n} dead letter(s)")
                return EXIT_OK
            # requeue
            raw_entries = await r.lrange(keys.dead, 0, -1)
            entries2 = [(raw, _parse_letter(raw)) for raw in raw_entries]
            wanted = set(args.ids)
            chosen = [(raw, e) for raw, e in entries2 if args.all or e.get("id") in wanted]
            missing = wanted - {e.get("id") for _, e in chosen}
            moved = 0
            for raw, entry in chosen:
                priority = entry.get("priority")
                if priority not in cfg.queues.priorities:
                    priority = cfg.queues.priorities[0 if priority is None else -1]
                pkey = entry.get("payload_key")
                job_id = entry.get("id")
                done = await broker.undead(
                    raw,
                    priority,
                    _entry_payload(entry),
                    job_id if isinstance(job_id, str) else "",
                    pkey if isinstance(pkey, str) else "",
                )
                if done == 1:
                    moved += 1
                elif done < 0:
                    print(f"prioqd: the payload of {clean(job_id)!s} is gone", file=sys.stderr)
            print(f"requeued {moved} dead letter(s)")
            for job_id in sorted(missing):
                print(f"prioqd: no dead letter with id {clean(job_id)!r}", file=sys.stderr)
            return EXIT_FAILED if missing else EXIT_OK
    finally:
        await broker.close()


def _dead_list(entries: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        print("no dead letters")
    for e in entries:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(e.get("dead_at") or 0)))
        except (TypeError, ValueError, OverflowError, OSError):
            when = "????-??-?? ??:??:??"
        print(
            f"{when}Z  id={clean(e.get('id') or '-')}  task={clean(e.get('task') or '-')}  "
            f"queue={clean(e.get('priority') or '-')}  attempts={clean(e.get('attempts', 0))}"
        )
        print(f"    reason: {clean(e.get('reason'))}")
    return EXIT_OK


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
        done = last.get(entry.name.encode())
        rows.append(
            {
                "name": entry.name,
                "when": periodic.describe(entry),
                "task": entry.task,
                "priority": entry.priority,
                "catch_up": entry.catch_up,
                "next_run": periodic.iso(periodic.next_tick(entry, now)),
                "last_enqueued": periodic.iso(int(done) / 1000) if done else None,
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
        print(f"    next run {row['next_run']}, last enqueued {row['last_enqueued'] or 'never'}")
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

    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[common], help="validate the configuration")
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

    p = sub.add_parser("schedule", help="periodic jobs ([[schedule]] in the config)")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ssub.add_parser("list", parents=[client], help="entries, next run, last enqueued tick")
    s.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("dead", help="list, requeue or purge dead letters")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("list", parents=[client], help="show dead letters, newest first")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("requeue", parents=[client], help="push dead letters back on their queue")
    d.add_argument("ids", nargs="*", metavar="ID")
    d.add_argument("--all", action="store_true")
    d = dsub.add_parser("purge", parents=[client], help="delete every dead letter")
    p.set_defaults(func=cmd_dead)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dead" and args.action == "requeue" and not (args.ids or args.all):
        parser.error("dead requeue: give job ids or --all")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"prioqd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerError as exc:
        print(f"prioqd: redis error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PrioqdError as exc:
        print(f"prioqd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
