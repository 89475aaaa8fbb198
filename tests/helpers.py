"""Test helpers: real redis-server processes and real daemon processes.

Every process started here is ended here, by pid. Nothing talks to port 6379.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
TASKMODS = Path(__file__).resolve().parent / "taskmods"
PRIOQD = [sys.executable, "-m", "prioqd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)


class RedisServer:
    """A redis-server of the test's own on a free loopback port."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
                return False

        wait_for(up, 10, what=f"redis-server on port {self.port}")
        client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)


def write_config(path: Path, redis_url: str, **sections: dict[str, Any]) -> Path:
    """A TOML config: the test defaults, with ``sections`` merged in."""
    base: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "workers": {"slots": 2},
        "daemon": {"lease_s": 3, "shutdown_grace_s": 5},
        "tasks": {"modules": ["prioqd.examples", "testtasks"]},
        "log": {"level": "debug", "format": "json"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def env_with_taskmods(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TASKMODS), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class DaemonProcess:
    """``prioqd run`` as a real child process, its JSON log lines collected."""

    def __init__(self, config: Path, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self.env = env_with_taskmods(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = logdir / "daemon-0.log"

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self.log_path = self.logdir / f"daemon-{self.runs}.log"
        self.runs += 1
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self._err = open(self.log_path.with_suffix(".err"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*PRIOQD, "run", "--config", str(self.config)],
            stdout=self._out,
            stderr=self._err,
            env=self.env,
            cwd=str(ROOT),
        )
        if wait_ready:
            self.wait_log("daemon ready", timeout_s=30)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def logs(self, run: int | None = None) -> list[dict[str, Any]]:
        path = self.log_path if run is None else self.logdir / f"daemon-{run}.log"
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def all_logs(self) -> list[dict[str, Any]]:
        return [e for run in range(self.runs) for e in self.logs(run)]

    def stderr(self) -> str:
        return self.log_path.with_suffix(".err").read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == event]

    def wait_log(self, event: str, timeout_s: float = 10.0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.logs():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before logging {event!r}:\n"
                    f"{self.log_path.read_text()}\n{self.stderr()}"
                )
            return None

        return wait_for(found, timeout_s, what=f"log event {event!r} {match}")  # type: ignore[no-any-return]

    def wait_count(self, event: str, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``event`` was logged ``count`` times (lines are written in bursts,
        a few ms after the state they describe is in Redis)."""
        return wait_for(  # type: ignore[no-any-return]
            lambda: len(self.events(event)) >= count and self.events(event),
            timeout_s,
            what=f"{count} x {event!r}",
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.returncode is not None:
                self._out.close()
                self._err.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL, and make sure its workers are gone too (they die with it)."""
        assert self.proc is not None
        self.proc.kill()
        self.wait()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in ("_out", "_err"):
            with contextlib.suppress(AttributeError):
                getattr(self, f).close()


#: The types of the ``daemon`` and ``config`` fixtures (conftest.py).
Daemon = Callable[..., DaemonProcess]
Config = Callable[..., Path]


def push(
    client: redis.Redis, priority: str, *jobs: dict[str, Any] | str, prefix: str = "prioqd"
) -> None:
    """LPUSH as a producer would (each job its own JSON text)."""
    for job in jobs:
        client.lpush(f"{prefix}:queue:{priority}", job if isinstance(job, str) else json.dumps(job))


def job_hash(client: redis.Redis, job_id: str, prefix: str = "prioqd") -> dict[str, str]:
    raw = client.hgetall(f"{prefix}:job:{job_id}")
    return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]


def wait_status(
    client: redis.Redis,
    job_ids: list[str],
    statuses: tuple[str, ...] = ("succeeded", "dead"),
    timeout_s: float = 30.0,
) -> dict[str, dict[str, str]]:
    def done() -> dict[str, dict[str, str]] | None:
        hashes = {j: job_hash(client, j) for j in job_ids}
        if all(h.get("status") in statuses for h in hashes.values()):
            return hashes
        return None

    return wait_for(done, timeout_s, 0.02, what=f"{len(job_ids)} jobs to reach {statuses}")  # type: ignore[no-any-return]


def dead_letters(client: redis.Redis, prefix: str = "prioqd") -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange(f"{prefix}:dead", 0, -1)]  # type: ignore[union-attr]


@contextlib.contextmanager
def daemon_running(config: Path, logdir: Path, **kw: Any) -> Iterator[DaemonProcess]:
    d = DaemonProcess(config, logdir, **kw)
    try:
        yield d.start()
    finally:
        d.cleanup()


# --- what daemons hold in Redis (the one place that knows the in-flight layout) -------


def _entry_job_id(value: bytes) -> str | None:
    """The job id of an inflight entry "<priority>\\n<state>\\n<recoveries>\\n<payload>"."""
    payload = value.split(b"\n", 3)[3]
    try:
        job = json.loads(payload)
    except ValueError:
        return None
    return job.get("id") if isinstance(job, dict) else None


def held(r: redis.Redis, daemon_id: str | None = None, prefix: str = "prioqd") -> dict[str, str]:
    """Job ids held by a daemon (or by all) -> "claimed" or "started": its inflight
    entries and landing lists."""
    who = daemon_id or "*"
    out: dict[str, str] = {}
    for key in r.keys(f"{prefix}:inflight:{who}"):
        for value in r.hvals(key):  # type: ignore[union-attr]
            state = value.split(b"\n", 2)[1]
            job_id = _entry_job_id(value)
            if job_id is not None:
                out[job_id] = "claimed" if state == b"c" else "started"
    for key in r.keys(f"{prefix}:landing:{who}:*"):
        for value in r.lrange(key, 0, -1):  # type: ignore[union-attr]
            with contextlib.suppress(ValueError, AttributeError):
                out[json.loads(value)["id"]] = "claimed"
    return out


def in_flight_count(r: redis.Redis, prefix: str = "prioqd") -> int:
    """Payloads held by any daemon, with an id or not."""
    n = sum(int(r.hlen(k)) for k in r.keys(f"{prefix}:inflight:*"))  # type: ignore[arg-type]
    return n + sum(int(r.llen(k)) for k in r.keys(f"{prefix}:landing:*"))  # type: ignore[arg-type]


def started_ids(r: redis.Redis, prefix: str = "prioqd") -> list[str]:
    """Job ids whose start is recorded, across daemons."""
    return sorted(j for j, state in held(r, prefix=prefix).items() if state == "started")
