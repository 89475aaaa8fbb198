"""systemd integration without systemd: the notify protocol on a real AF_UNIX datagram
socket, reload on SIGHUP, credentials, the journal fields, and the unit file."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import (
    ROOT,
    Config,
    Daemon,
    RedisServer,
    daemon_record,
    free_port,
    push,
    systemd_analyze,
    unit_exposure,
    verify_unit,
    wait_for,
    wait_status,
    write_config,
)

from prioqd.log import journal_fields


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET receives, with arrival times."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind = "\0" + path[1:] if path.startswith("@") else path
        self.sock.bind(bind)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    def wait(self, key: str, value: str | None = None, after: float = 0.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for t, m in self.messages:
                if t >= after and key in m and (value is None or m[key] == value):
                    return m
            return None

        return wait_for(found, 15, what=f"{key}={value} on the notify socket")  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


def test_ready_only_once_redis_answers(
    tmp_path: Path, daemon: Daemon, notify: NotifySocket
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", f"redis://127.0.0.1:{port}/0")
    d = daemon(cfg, wait_ready=False, env={"NOTIFY_SOCKET": notify.path})
    status = notify.wait("STATUS")
    wait_for(
        lambda: any("waiting for Redis" in m.get("STATUS", "") for _, m in notify.messages), 15
    )
    time.sleep(1.0)
    assert not notify.with_key("READY"), "READY=1 before Redis answered"
    assert status["STATUS"] == "starting worker processes", status
    server = RedisServer(tmp_path / "redis")
    server.port = port
    server.start()
    try:
        ready = notify.wait("READY", "1")
        assert ready["STATUS"].startswith("0/2 slots busy")
        d.wait_log("daemon ready")
        assert d.stop() == 0
    finally:
        server.stop()


def test_watchdog_stopping_and_reloading_messages(
    r: redis.Redis, config: Config, daemon: Daemon, notify: NotifySocket
) -> None:
    # WatchdogSec=3s: the daemon pings every second (a third); systemd's advice is
    # under half of WatchdogSec (1.5 s), which leaves a loaded machine 0.5 s of slack.
    d = daemon(config(), env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "3000000"})
    notify.wait("READY", "1")

    def pings() -> list[float]:
        return [t for t, m in notify.with_key("WATCHDOG") if m["WATCHDOG"] == "1"]

    wait_for(lambda: len(pings()) >= 5, 15, what="5 watchdog pings")
    gaps = [b - a for a, b in itertools.pairwise(pings())]
    assert max(gaps) < 1.5, f"pings further apart than half of WatchdogSec: {gaps}"
    # A timer, not a ping per loop turn or per job: about a second apart.
    assert min(gaps) > 0.5, f"pings closer than the interval: {gaps}"

    push(r, "high", {"id": "s1", "task": "square", "args": [3]})
    wait_status(r, ["s1"])
    wait_for(lambda: any("1 jobs done" in m.get("STATUS", "") for _, m in notify.messages), 5)

    before = time.monotonic()
    d.signal(signal.SIGHUP)
    reloading = notify.wait("RELOADING", "1", after=before)
    usec = int(reloading["MONOTONIC_USEC"])
    assert abs(usec / 1e6 - time.monotonic()) < 5  # CLOCK_MONOTONIC, microseconds
    notify.wait("READY", "1", after=before)

    before = time.monotonic()
    d.signal(signal.SIGTERM)
    assert notify.wait("STOPPING", "1", after=before)["STATUS"].startswith("stopping")
    assert d.wait() == 0


def test_abstract_notify_socket(
    r: redis.Redis, config: Config, daemon: Daemon, tmp_path: Path
) -> None:
    sock = NotifySocket(f"@prioqd-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        daemon(config(), env={"NOTIFY_SOCKET": sock.path})
        ready = sock.wait("READY", "1")
        assert ready["STATUS"].startswith("0/2 slots busy"), ready
    finally:
        sock.close()


def test_reload_applies_live_keys_and_names_the_rest(
    r: redis.Redis, config: Config, daemon: Daemon, notify: NotifySocket
) -> None:
    cfg = config(log={"level": "info"})
    d = daemon(cfg, env={"NOTIFY_SOCKET": notify.path})
    push(r, "high", {"id": "a", "task": "square", "args": [1]})
    wait_status(r, ["a"])
    assert d.wait_log("job finished", job_id="a")["outcome"] == "succeeded"

    # Warning level, three slots, a new prefix (needs a restart).
    text = cfg.read_text()
    text = text.replace('level = "info"', 'level = "warning"').replace("slots = 2", "slots = 3")
    cfg.write_text(text + '\n[queues]\nprefix = "other"\n')
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: "restart needed for queues.prefix" in notify.messages[-1][1].get("STATUS", ""), 10
    )
    push(r, "high", {"id": "b", "task": "square", "args": [2]})
    wait_status(r, ["b"])  # still the old prefix: it needs a restart
    # An error-level line after it: b's info line, had it been logged, came first.
    push(r, "high", {"id": "err", "task": "fail", "max_retries": 0})
    assert d.wait_log("job finished", job_id="err")["level"] == "error"
    assert not [e for e in d.events("job finished") if e.get("job_id") == "b"]
    # Logged at warning (an operator must act), so it shows at the new level too.
    reloaded = d.wait_log("config reloaded")
    assert reloaded["level"] == "warning"
    assert set(reloaded["applied"]) == {"log.level", "workers.slots"}
    assert reloaded["needs_restart"] == ["queues.prefix"]


def test_reload_changes_slots_and_level(r: redis.Redis, config: Config, daemon: Daemon) -> None:
    cfg = config(log={"level": "info"}, workers={"slots": 1})
    d = daemon(cfg)
    text = cfg.read_text()
    cfg.write_text(
        text.replace('level = "info"', 'level = "warning"').replace("slots = 1", "slots = 3")
    )
    d.signal(signal.SIGHUP)
    daemon_id = d.daemon_id
    wait_for(lambda: daemon_record(r, daemon_id).get("slots") == "3", 10)
    ids = [f"n{i}" for i in range(6)]
    push(r, "normal", *({"id": j, "task": "nap", "args": [600]} for j in ids))
    hashes = wait_status(r, ids)
    spans = [(float(h["started_at"]), float(h["finished_at"])) for h in hashes.values()]
    at_once = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
    assert at_once == 3, spans  # three slots now, and never more
    # Warning level: an error line after them is there, their info lines are not.
    push(r, "high", {"id": "err", "task": "fail", "max_retries": 0})
    assert d.wait_log("job finished", job_id="err")["level"] == "error"
    assert not [e for e in d.events("job finished") if e.get("job_id") in ids]


def test_invalid_config_on_reload_is_rejected_and_the_daemon_keeps_serving(
    r: redis.Redis, config: Config, daemon: Daemon, notify: NotifySocket
) -> None:
    cfg = config()
    d = daemon(cfg, env={"NOTIFY_SOCKET": notify.path})
    cfg.write_text(cfg.read_text() + "\n[jobs]\ntimeout = 3\n")
    d.signal(signal.SIGHUP)
    err = d.wait_log("reload rejected; still running the previous configuration")
    assert "jobs.timeout: unknown key" in err["error"] and err["level"] == "error"
    wait_for(lambda: "reload rejected" in notify.messages[-1][1].get("STATUS", ""), 5)
    push(r, "high", {"id": "still", "task": "square", "args": [5]})
    assert wait_status(r, ["still"])["still"]["result"] == "25"


# --- credentials ---------------------------------------------------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-auth")
    server.start()
    try:
        admin = server.client()
        admin.config_set("requirepass", "s3cret-pw")
        admin.close()
        yield server
    finally:
        server.stop()


def test_password_from_the_credential_directory_never_logged(
    tmp_path: Path, daemon: Daemon, secured: RedisServer
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("s3cret-pw\n")
    cfg = write_config(tmp_path / "c.toml", secured.url)
    d = daemon(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    r = secured.client(password="s3cret-pw")
    push(r, "high", {"id": "p", "task": "square", "args": [6]})
    assert wait_status(r, ["p"])["p"]["result"] == "36"
    assert d.stop() == 0
    assert "s3cret-pw" not in d.log_path.read_text() + d.stderr()
    r.close()


def test_password_from_the_environment_and_masked_urls(
    tmp_path: Path, daemon: Daemon, secured: RedisServer
) -> None:
    cfg = write_config(tmp_path / "c.toml", secured.url)
    d = daemon(cfg, env={"PRIOQD_REDIS_PASSWORD": "s3cret-pw"})
    r = secured.client(password="s3cret-pw")
    push(r, "high", {"id": "e", "task": "square", "args": [7]})
    assert wait_status(r, ["e"])["e"]["result"] == "49"
    r.close()
    assert d.stop() == 0
    assert "s3cret-pw" not in d.log_path.read_text() + d.stderr()
    from prioqd.broker import mask_url

    assert mask_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_missing_password_is_reported_and_retried(
    tmp_path: Path, daemon: Daemon, secured: RedisServer
) -> None:
    d = daemon(write_config(tmp_path / "c.toml", secured.url), wait_ready=False)
    e = d.wait_log("redis unavailable")
    assert "AuthenticationError" in e["error"] and e["during"] == "start-up"
    assert d.proc is not None and d.proc.poll() is None


def test_password_in_the_config_file_is_refused(tmp_path: Path) -> None:
    from prioqd import config
    from prioqd.errors import ConfigError

    path = write_config(tmp_path / "c.toml", "redis://:hunter2@127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match=r"redis\.url: must not contain a password") as info:
        config.load(str(path))
    assert "hunter2" not in str(info.value)


# --- journald fields ---------------------------------------------------------------


def test_journal_fields_are_upper_case_with_syslog_priority() -> None:
    fields = journal_fields(
        {"event": "job finished", "level": "error", "job_id": "j1", "task": "square",
         "queue": "high", "daemon_id": "d1", "attempt": 2, "traceback": "Traceback...",
         "timestamp": "x", "weird-key.name": {"a": 1}}
    )  # fmt: skip
    assert fields["PRIORITY"] == "3"
    assert fields["JOB_ID"] == "j1" and fields["TASK"] == "square"
    assert fields["QUEUE"] == "high" and fields["DAEMON_ID"] == "d1"
    assert fields["ATTEMPT"] == "2" and fields["TRACEBACK"] == "Traceback..."
    assert fields["WEIRD_KEY_NAME"] == '{"a": 1}'
    assert fields["SYSLOG_IDENTIFIER"] == "prioqd"
    assert "TIMESTAMP" not in fields
    assert fields["MESSAGE"].startswith("job finished job_id=j1 task=square")
    assert "Traceback" not in fields["MESSAGE"]
    assert all(re.fullmatch(r"[A-Z0-9_]+", k) for k in fields)
    for level, prio in (("debug", "7"), ("info", "6"), ("warning", "4"), ("critical", "2")):
        assert journal_fields({"event": "e", "level": level})["PRIORITY"] == prio


def test_journal_fields_carry_an_exception_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        fields = journal_fields({"event": "failed", "level": "error", "exc_info": exc})
    assert "ValueError: boom" in fields["TRACEBACK"]


# --- the unit file -----------------------------------------------------------------

UNIT = ROOT / "systemd" / "prioqd.service"


def test_unit_verifies_with_nothing_on_stderr(tmp_path: Path) -> None:
    systemd_analyze()
    out = verify_unit(UNIT, tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_unit_security_exposure_is_2_or_better() -> None:
    systemd_analyze()
    assert unit_exposure(UNIT) <= 2.0


def test_unit_settings_that_operations_rely_on() -> None:
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    from prioqd.config import Config

    assert int(settings["TimeoutStopSec"]) > Config().daemon.shutdown_grace_s
    assert "redis-password" in settings["LoadCredential"]
    assert "password" not in settings["ExecStart"]


# --- the environment systemd hands over -------------------------------------------------


def test_credential_file_wins_and_an_empty_one_falls_back_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prioqd.systemd import redis_password

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("PRIOQD_REDIS_PASSWORD", "from-env")
    assert redis_password() == "from-env"  # no credential file at all
    (tmp_path / "redis-password").write_text("\n")
    assert redis_password() == "from-env"  # an empty one (install.sh's default)
    (tmp_path / "redis-password").write_text("from-file\n")
    assert redis_password() == "from-file"
    monkeypatch.delenv("PRIOQD_REDIS_PASSWORD")
    (tmp_path / "redis-password").write_text("")
    assert redis_password() is None


def test_watchdog_is_for_the_main_pid_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from prioqd.systemd import watchdog_interval_s

    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval_s() is None


def test_journal_stream_is_recognised_by_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prioqd.systemd import journal_stream_attached

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not journal_stream_attached()
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert journal_stream_attached()
    # Inherited from a parent whose stream it was, but ours is another: not attached.
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    assert not journal_stream_attached()
