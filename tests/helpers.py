"""Test helpers: real redis-server processes and real daemon processes.

Every process started here is ended here, by pid. Nothing talks to port 6379.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

import psutil
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
TASKMODS = Path(__file__).resolve().parent / "taskmods"
PRIOQD = [sys.executable, "-m", "prioqd.cli"]


#: Set by .ci/run: a test that cannot run here (no nspawn, no TLS in redis-server...)
#: fails instead of skipping, so CI never passes by quietly running less.
STRICT = os.environ.get("PRIOQD_TEST_STRICT", "") not in ("", "0")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with ``reason`` (printed by ``pytest -ra``), or fail under PRIOQD_TEST_STRICT."""
    if STRICT:
        pytest.fail(f"{reason} (PRIOQD_TEST_STRICT is set: CI must run this test)")
    pytest.skip(reason)


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


Transport = Literal["tcp", "unix", "tls"]


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "1", "-subj", "/CN=prioqd-test-ca"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{' '.join(map(str, cmd))}: {out.stderr}"
    return {"ca": ca, "cert": cert, "key": key}


class RedisServer:
    """A redis-server of the test's own on a free loopback port.

    ``transport`` chooses how it listens: ``tcp`` (the default), ``unix`` (a unix
    socket only, no TCP port at all) or ``tls`` (a TLS port only, certificates from a
    throwaway CA made here). ``url`` and ``client()`` follow it.
    """

    def __init__(
        self, workdir: Path, *, appendonly: bool = False, transport: Transport = "tcp"
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.transport = transport
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket_path = ""
        self.tls: dict[str, Path] = {}
        if transport == "unix":
            # sun_path holds 107 bytes; pytest's tmp paths can be longer.
            short = Path(tempfile.mkdtemp(prefix="prioqd-sock-"))
            self.socket_path = str(short / "redis.sock")
        elif transport == "tls":
            self.tls = make_tls_files(workdir / "tls")

    @property
    def url(self) -> str:
        if self.transport == "unix":
            return f"unix://{self.socket_path}?db=0"
        if self.transport == "tls":
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.transport == "unix":
            return ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.transport == "tls":
            return [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls["cert"]), "--tls-key-file", str(self.tls["key"]),
                "--tls-ca-cert-file", str(self.tls["ca"]), "--tls-auth-clients", "no",
            ]  # fmt: skip
        return ["--port", str(self.port)]

    def start(self) -> None:
        args = [
            "redis-server",
            *self._listen_args(),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_up()
        except BaseException:
            self.stop()  # the caller's teardown may never run: it has no server yet
            raise

    def _wait_up(self) -> None:
        client = self.client(socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                if self.proc is not None and self.proc.poll() is not None:
                    log = (self.workdir / "redis.log").read_text(errors="replace")
                    if self.transport == "tls" and "TLS" in log and "support" in log:
                        skip_or_fail(f"this redis-server has no TLS support: {log[-300:]}")
                    raise AssertionError(f"redis-server exited:\n{log[-2000:]}") from None
                return False

        try:
            wait_for(up, 10, what=f"redis-server ({self.transport}) on {self.url}")
        finally:
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
        if self.transport == "unix":
            return redis.Redis(unix_socket_path=self.socket_path, **kw)
        if self.transport == "tls":
            return redis.Redis(
                host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.tls["ca"]), **kw
            )
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


def systemd_analyze() -> None:
    """Skip (fail under PRIOQD_TEST_STRICT) where systemd-analyze is missing."""
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("systemd-analyze is not installed (apt-get install systemd)")


def verify_unit(template: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of a unit in systemd/, its ExecStart pointed at this
    venv's prioqd (verify checks that it exists)."""
    exe = shutil.which("prioqd") or str(ROOT / ".venv" / "bin" / "prioqd")
    unit = tmp_path / template.name
    unit.write_text(template.read_text().replace("/opt/prioqd/bin/prioqd", exe))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def unit_exposure(unit: Path) -> float:
    """``systemd-analyze security``'s overall exposure level of a unit file."""
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    return float(match.group(1))


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> int:
    """SIGTERM, then its exit status; SIGKILL if it has not exited within
    ``timeout_s`` (the status, -9, then says so)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def prioqd(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One ``prioqd`` CLI command, run to its end, the test task modules importable."""
    return subprocess.run(
        [*PRIOQD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_with_taskmods(env),
        cwd=str(ROOT),
    )


class DaemonProcess:
    """``prioqd run`` as a real child process, its JSON log lines collected."""

    def __init__(
        self,
        config: Path,
        logdir: Path,
        env: dict[str, str] | None = None,
        *,
        new_session: bool = False,
    ) -> None:
        self.config = config
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self.env = env_with_taskmods(env)
        self.new_session = new_session  # its own process group, as a shell job has
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
            start_new_session=self.new_session,
        )
        if wait_ready:
            self.wait_log("daemon ready", timeout_s=30)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def daemon_id(self) -> str:
        """The id this run registered under (from its "daemon ready" line)."""
        return str(self.wait_log("daemon ready")["daemon_id"])

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes this run started with."""
        return [int(p) for p in self.wait_log("daemon ready")["worker_pids"]]

    def logs(self, run: int | None = None) -> list[dict[str, Any]]:
        path = self.log_path if run is None else self.logdir / f"daemon-{run}.log"
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def all_logs(self) -> list[dict[str, Any]]:
        """The log lines of every run of this daemon (each start is a run)."""
        return [e for run in range(self.runs) for e in self.logs(run)]

    def stderr(self) -> str:
        return self.log_path.with_suffix(".err").read_text(errors="replace")

    def assert_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"the daemon exited with code {code}:\n{self.stderr()[-3000:]}")

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
        """SIGKILL, and make sure its workers are gone too: they die with it
        (PR_SET_PDEATHSIG). One that outlives it is killed, and the test fails."""
        assert self.proc is not None
        try:
            workers = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            workers = []
        self.proc.kill()
        self.wait()

        def alive() -> list[psutil.Process]:
            return [w for w in workers if _running(w)]

        with contextlib.suppress(AssertionError):
            wait_for(lambda: not alive(), 10)
        orphans = alive()
        for w in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
        wait_for(lambda: not alive(), 10, what="the orphaned workers to die")
        assert not orphans, f"workers outlived their SIGKILLed daemon: {orphans}"

    def cleanup(self) -> None:
        """End it if it still runs: SIGTERM (a clean stop, which also lets coverage
        write its data), a second SIGTERM (skip the grace), then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
            # The test is over: half a second of grace, then the second SIGTERM ends
            # whatever still runs (a clean exit all the same, coverage written).
            for sig, wait_s in ((signal.SIGTERM, 0.5), (signal.SIGTERM, 9.5)):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait_s)
                    break
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for f in ("_out", "_err"):
            with contextlib.suppress(AttributeError):
                getattr(self, f).close()


def _running(p: psutil.Process) -> bool:
    """Still there and not a zombie (same pid, same start time: psutil checks)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
    daemon: DaemonProcess | None = None,
) -> dict[str, dict[str, str]]:
    """Wait until every job has one of ``statuses``; fail at once if ``daemon`` exits."""

    def done() -> dict[str, dict[str, str]] | None:
        if daemon is not None:
            daemon.assert_alive()
        hashes = {j: job_hash(client, j) for j in job_ids}
        if all(h.get("status") in statuses for h in hashes.values()):
            return hashes
        return None

    return wait_for(done, timeout_s, 0.02, what=f"{len(job_ids)} jobs to reach {statuses}")  # type: ignore[no-any-return]


def worker_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended and been reaped (a zombie still answers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def waits_blocked(client: redis.Redis) -> int:
    """How many connections are blocked in a BLMOVE (an idle daemon: one a priority)."""
    return sum(c.get("cmd") == "blmove" for c in client.client_list())


def high_and_low_together(
    client: redis.Redis,
    rounds: int,
    *,
    high_first: bool = False,
    daemon: DaemonProcess | None = None,
) -> None:
    """Push a low and a high 20 ms job in one pipeline, ``rounds`` times, to an idle
    daemon with one slot: their replies land in one turn of Redis, in no set order,
    and whichever the daemon reads first, the high one must end before the low starts."""
    for round_ in range(rounds):
        wait_for(lambda: waits_blocked(client) == 3, 10, what="the daemon idle (blocked on all)")
        lo, hi = f"lo{round_}", f"hi{round_}"
        jobs = [("low", lo), ("high", hi)]
        pipe = client.pipeline(transaction=False)
        for priority, job_id in reversed(jobs) if high_first else jobs:
            body = json.dumps({"id": job_id, "task": "nap", "args": [20]})
            pipe.lpush(f"prioqd:queue:{priority}", body)
        pipe.execute()
        h = wait_status(client, [lo, hi], daemon=daemon)
        assert float(h[hi]["finished_at"]) <= float(h[lo]["started_at"]), f"round {round_}"


def dead_letters(client: redis.Redis, prefix: str = "prioqd") -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange(f"{prefix}:dead", 0, -1)]  # type: ignore[union-attr]


def job_ids(client: redis.Redis, priority: str, prefix: str = "prioqd") -> list[str]:
    """The ids on a queue, head (the next to run) first."""
    raw = client.lrange(f"{prefix}:queue:{priority}", 0, -1)
    return [json.loads(x)["id"] for x in reversed(raw)]


# --- prioqd's internal keys ------------------------------------------------------------
#
# The in-flight layout (which keys hold what a daemon has taken) and the daemon registry
# are internals that change with the implementation. Tests read them ONLY through the
# functions below, so a new layout changes these functions and nothing else.
#
# Each takes a redis-py client, or a callable ``command(*args) -> decoded reply`` (the
# systemd end-to-end tests run redis-cli inside a container).

RedisLike = redis.Redis | Callable[..., Any]


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, set)):
        return [_decoded(v) for v in value]
    if isinstance(value, dict):
        return {_decoded(k): _decoded(v) for k, v in value.items()}
    return value


def _command(r: RedisLike) -> Callable[..., Any]:
    if isinstance(r, redis.Redis):
        client = r
        return lambda *args: _decoded(client.execute_command(*args))  # type: ignore[no-untyped-call]
    return r


def _payload_id(payload: str) -> str:
    with contextlib.suppress(ValueError, TypeError, KeyError):
        job_id = json.loads(payload)["id"]
        if isinstance(job_id, str):
            return job_id
    return f"<payload without id: {payload[:40]}>"


def in_flight(r: RedisLike, prefix: str = "prioqd") -> dict[str, set[str]]:
    """Daemon id -> ids of the jobs it has taken off a queue and not yet settled
    (claimed, or recorded as running): the entries of its inflight hash and its
    landing lists (see the Lua header). Daemons holding nothing are left out."""
    cmd = _command(r)
    held: dict[str, set[str]] = {}
    for key in cmd("KEYS", f"{prefix}:inflight:*") or []:
        daemon_id = key[len(f"{prefix}:inflight:") :]
        for value in cmd("HVALS", key) or []:
            payload = value.split("\n", 3)[3]
            held.setdefault(daemon_id, set()).add(_payload_id(payload))
    for key in cmd("KEYS", f"{prefix}:landing:*") or []:
        daemon_id = key[len(f"{prefix}:landing:") :].rpartition(":")[0]
        for value in cmd("LRANGE", key, "0", "-1") or []:
            held.setdefault(daemon_id, set()).add(_payload_id(value))
    return held


def held_by(r: RedisLike, daemon_id: str, prefix: str = "prioqd") -> set[str]:
    """Ids of the jobs ``daemon_id`` holds in flight (see ``in_flight``)."""
    return in_flight(r, prefix).get(daemon_id, set())


def in_flight_count(r: RedisLike, prefix: str = "prioqd") -> int:
    """How many jobs all daemons together hold in flight."""
    return sum(len(ids) for ids in in_flight(r, prefix).values())


def registered_daemons(r: RedisLike, prefix: str = "prioqd") -> set[str]:
    """Ids of the daemons registered (alive or with an expired lease not yet recovered)."""
    return set(_command(r)("ZRANGE", f"{prefix}:daemons", "0", "-1") or [])


def daemon_record(r: RedisLike, daemon_id: str, prefix: str = "prioqd") -> dict[str, str]:
    """What a daemon registered about itself (host, pid, slots...)."""
    flat = _command(r)("HGETALL", f"{prefix}:daemon:{daemon_id}") or []
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))
