"""prioqd under a real systemd: installed by scripts/install.sh, driven with systemctl.

One container for the module (``tests/nspawn.py``: the host's root through an
overlay, booted by systemd-nspawn, private network), where the fixture does what the
README tells an operator: ``scripts/install.sh`` from a checkout (offline, from a
cached wheel directory), a config pointing at a Redis, ``systemctl start prioqd``.
Redis runs inside as a transient unit on port 6390; jobs are pushed with redis-cli.

Skipped only where nspawn cannot run (not root, no systemd-container, no overlay or
cgroups); every other problem is a failure. On a failure the unit's status and
journal are printed (``-s`` shows them at once).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from nspawn import Container, build_wheels, project_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # the system's, as an operator would use; not the dev venv's
SRC = "/usr/local/src/prioqd"  # the checkout inside the container
WHEELS = "/var/cache/prioqd-wheels"
UNIT = "prioqd"
CONFIG = "/etc/prioqd/config.toml"
DROPIN_DIR = "/etc/systemd/system/prioqd.service.d"
REDIS_PORT = 6390
#: Test-only limits, so that a daemon that never says READY=1 or never exits on
#: SIGTERM fails a test in seconds, not after the unit's 120 s / 60 s. The drain
#: grace is lowered with them to keep TimeoutStopSec above it, as the unit requires.
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 15
GRACE_S = 5
PREFIX = "prioqd"


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    return helpers.wait_for(predicate, timeout_s, 0.05, what)


def now_us() -> int:
    return time.time_ns() // 1000


class Prioqd:
    """The installed service in the container, and what a test does with it."""

    def __init__(self, box: Container) -> None:
        self.box = box
        self.template = ""  # the config install.sh wrote (config.example.toml)
        self.config = ""  # what the test last wrote

    # -- Redis, through redis-cli inside

    def redis(self, *args: str) -> Any:
        """A Redis command's reply, decoded (redis-cli --json, RESP3)."""
        out = self.box.run(["redis-cli", "-p", str(REDIS_PORT), "--json", *args]).stdout
        return json.loads(out) if out.strip() else None

    def push(self, task: str, *args: Any, queue: str = "high", **fields: Any) -> str:
        job_id = fields.pop("id", None) or f"{task}-{uuid.uuid4().hex[:10]}"
        payload = json.dumps({"id": job_id, "task": task, "args": list(args), **fields})
        self.box.run(
            ["redis-cli", "-p", str(REDIS_PORT), "LPUSH", f"{PREFIX}:queue:{queue}", payload]
        )
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        return self.redis("HGETALL", f"{PREFIX}:job:{job_id}") or {}

    def wait_job(
        self, job_id: str, status: str = "succeeded", timeout_s: float = 15.0
    ) -> dict[str, str]:
        def done() -> dict[str, str] | None:
            h = self.job(job_id)
            return h if h.get("status") == status else None

        try:
            return wait_for(done, timeout_s, f"job {job_id} to be {status}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; its hash: {self.job(job_id)}\n{self.evidence()}"
            ) from None

    def start_redis(self) -> None:
        """redis-server (the host's binary) as a transient unit of the container's."""
        self.box.run(
            ["systemd-run", "--unit", "test-redis", "--property", "Type=exec",
             "/usr/bin/redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"]
        )  # fmt: skip
        wait_for(self.redis_up, 10, "redis-server in the container")

    def redis_up(self) -> bool:
        ping = ["redis-cli", "-p", str(REDIS_PORT), "PING"]
        return self.box.run(ping, check=False).stdout.strip() == "PONG"

    # -- systemd

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> Any:
        return self.box.systemctl(*args, check=check, timeout=timeout)

    def journal(self, **kw: Any) -> list[dict[str, Any]]:
        return self.box.journal(unit=UNIT, **kw)

    def wait_journal(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 10.0, **kw: Any
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.journal(**kw) if pred(e)), None)

        try:
            return wait_for(found, timeout_s, what)  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.evidence()}") from None

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def start(self) -> None:
        try:
            self.systemctl("start", UNIT, timeout=START_TIMEOUT_S + 15)
        except Exception as exc:
            raise AssertionError(
                f"systemctl start {UNIT} failed: {exc}\n{self.evidence()}"
            ) from None

    def stop(self) -> float:
        """``systemctl stop``, which must end cleanly (``Result=success``) within the
        drop-in's TimeoutStopSec; returns how long it took."""
        t0 = time.monotonic()
        try:
            self.systemctl("stop", UNIT, timeout=STOP_TIMEOUT_S + 15)
        except Exception as exc:
            raise AssertionError(
                f"systemctl stop {UNIT} failed: {exc}\n{self.evidence()}"
            ) from None
        took = time.monotonic() - t0
        state = self.show("ActiveState", "Result")
        assert state == {"ActiveState": "inactive", "Result": "success"}, (
            f"stop ended with {state} after {took:.1f}s\n{self.evidence()}"
        )
        return took

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.systemctl("reset-failed", UNIT, check=False)
            self.start()

    def write_config(
        self, level: str = "info", text: str | None = None, result_ttl_s: int = 86400
    ) -> None:
        if text is None:
            text = config_text(self.template, level=level, result_ttl_s=result_ttl_s)
        self.box.write_file(CONFIG, text)
        self.config = text

    def reload(
        self, logs: str | None = None, applied: Callable[[], bool] | None = None
    ) -> None:
        """``systemctl reload`` returns once ``kill -HUP`` has; the daemon applies the
        file a moment later (Type=notify: systemd does not wait for its READY=1).

        Then waited for: ``logs``, a message the daemon logs once it has applied (or
        rejected) the file, or else ``applied``, a probe that holds once the new file
        is in force. (A reload to a quieter level logs nothing that can be seen, and
        its STATUS= is the same text as before.)
        """
        assert (logs is None) != (applied is None), "say how to see the reload applied"
        pid = str(self.main_pid())
        t0 = now_us()
        self.systemctl("reload", UNIT)
        wait_for(
            lambda: self.show("ActiveState")["ActiveState"] != "reloading", 10, "reload to end"
        )
        if applied is not None:
            wait_for(applied, 15, "the reloaded config in force")
            return
        self.wait_journal(
            lambda e: logs in str(e.get("MESSAGE", "")) and e.get("_PID") == pid,
            f"{logs!r} from the daemon",
            since_us=t0,
        )

    def evidence(self) -> str:
        status = self.systemctl("status", "-l", "-n", "0", UNIT, check=False).stdout
        log = self.box.journalctl("-u", UNIT, "-n", "40", "-o", "short-precise", check=False)
        return f"--- systemctl status {UNIT} ---\n{status}\n--- journal (last 40) ---\n{log.stdout}"


def config_text(template: str, level: str = "info", result_ttl_s: int = 86400) -> str:
    """The installed config with the test's Redis, level, two slots, example tasks."""
    text = template
    for pattern, value in (
        (r"^url = .*$", f'url = "redis://127.0.0.1:{REDIS_PORT}/0"'),
        (r"^level = .*$", f'level = "{level}"'),
        (r"^result_ttl_s = .*$", f"result_ttl_s = {result_ttl_s}"),
        (r"^slots = .*$", "slots = 2"),
        (r"^modules = .*$", 'modules = ["prioqd.examples"]'),
        (r"^shutdown_grace_s = .*$", f"shutdown_grace_s = {GRACE_S}"),
    ):
        text, n = re.subn(pattern, value, text, count=1, flags=re.MULTILINE)
        assert n == 1, f"config.example.toml has no line matching {pattern!r}"
    return text


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    ok, why = Container.available()
    if not ok:
        helpers.skip_or_fail(f"systemd-nspawn cannot run here: {why}")
    for tool in (PYTHON, "/usr/bin/redis-server", "/usr/bin/redis-cli"):
        assert Path(tool).exists(), f"{tool} is needed on the host (the container sees it)"
    t0 = time.monotonic()
    build_wheels(REPO, PYTHON)  # cold: a few seconds, needs the package index
    t_wheels = time.monotonic() - t0
    with Container() as c:
        print(f"\n[e2e] wheels {t_wheels:.1f}s, boot {c.boot_s:.1f}s ({c.name})")
        if c.degraded:
            print(f"[e2e] the container booted degraded:\n{c.degraded}")
        yield c


@pytest.fixture(scope="module")
def installed(box: Container) -> Prioqd:
    """prioqd installed the README's way, Redis up, the config pointing at it."""
    t0 = time.monotonic()
    box.copy_in(REPO, SRC, project_files(REPO))
    box.copy_in(build_wheels(REPO, PYTHON), WHEELS)
    out = box.run(
        [f"{SRC}/scripts/install.sh"],
        env={
            "PYTHON": PYTHON,
            "PIP_ARGS": f"--no-index --find-links {WHEELS}",
            "PIP_CONFIG_FILE": "/dev/null",  # not the host's index or constraints
        },
        timeout=300,
    )
    print(f"[e2e] install.sh {time.monotonic() - t0:.1f}s:\n{out.stdout}{out.stderr}")
    box.write_file(
        f"{DROPIN_DIR}/00-e2e-timeouts.conf",
        f"[Service]\nTimeoutStartSec={START_TIMEOUT_S}\nTimeoutStopSec={STOP_TIMEOUT_S}\n",
    )
    box.systemctl("daemon-reload")
    p = Prioqd(box)
    p.start_redis()
    p.template = box.read_file(CONFIG)
    p.write_config()
    return p


@pytest.fixture
def prioqd(installed: Prioqd, request: pytest.FixtureRequest) -> Iterator[Prioqd]:
    """The service running on the default test config; its status and journal are
    printed after a failed test."""
    if installed.config != config_text(installed.template):
        installed.write_config()  # a test changed it: back to the default, live too
        if installed.show("ActiveState")["ActiveState"] == "active":
            installed.reload(logs="config reloaded")
    installed.ensure_running()
    failed_before = request.session.testsfailed
    yield installed
    if request.session.testsfailed > failed_before:
        print(f"\n[e2e] after {request.node.name}:\n{installed.evidence()}")


# --- tests ---------------------------------------------------------------------------


def test_start_returns_only_when_ready(prioqd: Prioqd) -> None:
    prioqd.stop()
    t0 = time.monotonic()
    prioqd.start()
    took = time.monotonic() - t0
    state = prioqd.show("ActiveState", "SubState", "StatusText", "MainPID")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), (
        f"{state}\n{prioqd.evidence()}"
    )
    assert state["StatusText"], f"no STATUS= sent before READY=1: {state}"
    job_id = prioqd.push("square", 6)
    assert prioqd.wait_job(job_id, timeout_s=5)["result"] == "36"
    print(f"[e2e] systemctl start took {took:.2f}s; status: {state['StatusText']!r}")


def test_start_waits_for_redis(prioqd: Prioqd) -> None:
    prioqd.stop()
    prioqd.systemctl("stop", "test-redis")
    try:
        # The start job blocks while Redis is down (the client gives up, the job stays).
        blocked = prioqd.box.run(["timeout", "3", "systemctl", "start", UNIT], check=False)
        state = prioqd.show("ActiveState", "SubState", "StatusText")
        assert blocked.returncode == 124, f"systemctl start returned with Redis down: {state}"
        assert state["ActiveState"] == "activating", f"{state}\n{prioqd.evidence()}"
        print(f"[e2e] status while Redis is down: {state['StatusText']!r}")
    finally:
        prioqd.start_redis()
    wait_for(
        lambda: prioqd.show("ActiveState")["ActiveState"] == "active", 15, "ready once Redis is up"
    )
    job_id = prioqd.push("square", 9)
    assert prioqd.wait_job(job_id, timeout_s=5)["result"] == "81"


def test_jobs_pushed_with_redis_cli_complete(prioqd: Prioqd) -> None:
    ids = {
        prioqd.push("square", 7, queue="high"): 49,
        prioqd.push("square", 3, queue="normal"): 9,
        prioqd.push("echo", "a", 1, queue="low"): {"args": ["a", 1], "kwargs": {}},
    }
    for job_id, expected in ids.items():
        h = prioqd.wait_job(job_id)
        assert json.loads(h["result"]) == expected, h


def test_journal_has_native_fields_per_job(prioqd: Prioqd) -> None:
    job_id = prioqd.push("square", 5, queue="normal")
    prioqd.wait_job(job_id)
    daemons = helpers.registered_daemons(prioqd.redis, PREFIX)

    def entry(message: str) -> dict[str, Any]:
        return prioqd.wait_journal(
            lambda e: message in str(e.get("MESSAGE", "")), f"{message!r} of {job_id}",
            JOB_ID=job_id,
        )  # fmt: skip

    for message in ("job started", "job finished"):
        e = entry(message)
        assert e.get("JOB_ID") == job_id, e
        assert e.get("TASK") == "square", e
        assert e.get("QUEUE") == "normal", e
        assert e.get("DAEMON_ID") in daemons, (e, daemons)
        assert e.get("PRIORITY") == "6", e  # info
        assert e.get("_SYSTEMD_UNIT") == f"{UNIT}.service", e


def test_failed_job_is_an_error_with_traceback(prioqd: Prioqd) -> None:
    marker = uuid.uuid4().hex[:8]
    job_id = prioqd.push("fail", f"boom {marker}", max_retries=0)
    prioqd.wait_job(job_id, status="dead")
    e = prioqd.wait_journal(
        lambda e: e.get("JOB_ID") == job_id, f"an err-or-worse entry for {job_id}", priority="err"
    )
    assert int(e["PRIORITY"]) <= 3, e
    assert "RuntimeError" in e.get("TRACEBACK", ""), e
    assert f"boom {marker}" in e.get("TRACEBACK", ""), e
    assert e.get("TASK") == "fail", e


def test_reload_applies_log_level(prioqd: Prioqd) -> None:
    pid = prioqd.main_pid()
    # With the level, a [jobs] key whose effect can be seen: once a job's hash has the
    # new TTL, the level (applied in the same step) is in force too.
    prioqd.write_config(level="warning", result_ttl_s=3600)

    def ttl_applied() -> bool:
        probe = prioqd.push("square", 1)
        prioqd.wait_job(probe)
        return 0 < int(prioqd.redis("TTL", f"{PREFIX}:job:{probe}")) <= 3600

    prioqd.reload(applied=ttl_applied)
    quiet = prioqd.push("square", 2)
    prioqd.wait_job(quiet)

    prioqd.write_config(level="info")
    prioqd.reload(logs="config reloaded")
    loud = prioqd.push("square", 3)
    prioqd.wait_job(loud)
    prioqd.wait_journal(
        lambda e: "job finished" in str(e.get("MESSAGE", "")), f"'job finished' of {loud}",
        JOB_ID=loud,
    )  # fmt: skip
    # The daemon's entries reach the journal in order: had the quiet job's info line
    # been sent, it would be there now that a later one is.
    leaked = [e.get("MESSAGE") for e in prioqd.journal(JOB_ID=quiet)]
    assert not leaked, f"info lines logged at level=warning: {leaked}"
    assert prioqd.main_pid() == pid, "the reload restarted the daemon"


@pytest.mark.parametrize(
    "bad",
    ["[redis\nurl = \n", '[log]\nlevel = "chatty"\n', '[log]\nlevle = "info"\n'],
    ids=["not-toml", "bad-level", "unknown-key"],
)
def test_invalid_config_on_reload_is_rejected(prioqd: Prioqd, bad: str) -> None:
    state = prioqd.show("MainPID", "NRestarts")
    t0 = now_us()
    prioqd.write_config(text=bad)
    prioqd.reload(logs="reload rejected")
    after = prioqd.show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert after["ActiveState"] == "active", f"{after}\n{prioqd.evidence()}"
    assert (after["MainPID"], after["NRestarts"]) == (state["MainPID"], state["NRestarts"])
    prioqd.wait_journal(
        lambda e: e.get("_PID") == state["MainPID"], "an error about the rejected config",
        priority="err", since_us=t0,
    )  # fmt: skip
    job_id = prioqd.push("square", 4)
    assert prioqd.wait_job(job_id)["result"] == "16"


def test_watchdog_restarts_a_stopped_daemon(prioqd: Prioqd) -> None:
    dropin = f"{DROPIN_DIR}/50-e2e-watchdog.conf"
    prioqd.box.write_file(dropin, "[Service]\nWatchdogSec=3\n")
    try:
        prioqd.systemctl("daemon-reload")
        prioqd.restart()
        before = prioqd.show("MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == "3s", before
        time.sleep(4)  # longer than WatchdogSec: a daemon that pings survives it
        assert prioqd.main_pid() == int(before["MainPID"]), "killed while pinging"
        t0 = now_us()
        prioqd.box.run(["kill", "-STOP", before["MainPID"]])
        seen: set[str] = set()

        def restarted() -> bool:
            s = prioqd.show("ActiveState", "SubState", "Result", "MainPID", "NRestarts")
            seen.add(s["Result"])
            return (
                int(s["NRestarts"]) > int(before["NRestarts"])
                and s["ActiveState"] == "active"
                and s["SubState"] == "running"
                and s["MainPID"] not in ("0", before["MainPID"])
            )

        wait_for(restarted, 30, "a watchdog restart")
        msgs = [str(e.get("MESSAGE")) for e in prioqd.journal(since_us=t0)]
        assert "watchdog" in seen or any("result 'watchdog'" in m for m in msgs), (seen, msgs)
        assert any("Watchdog timeout" in m for m in msgs), msgs
        print(f"[e2e] watchdog: Result values seen {sorted(seen)}; systemd said:")
        print("\n".join(f"    {m}" for m in msgs if "atchdog" in m))
        job_id = prioqd.push("square", 8)
        assert prioqd.wait_job(job_id)["result"] == "64"
    finally:
        prioqd.box.run(["rm", "-f", dropin])
        prioqd.systemctl("daemon-reload")
        limit = START_TIMEOUT_S + STOP_TIMEOUT_S + 15
        prioqd.systemctl("restart", UNIT, check=False, timeout=limit)


def test_stop_drains_without_losing_jobs(prioqd: Prioqd) -> None:
    ids = [prioqd.push("square", i, 0.2, queue="normal") for i in range(20)]

    def succeeded() -> int:
        return sum(prioqd.job(i).get("status") == "succeeded" for i in ids)

    wait_for(lambda: succeeded() >= 3, 15, "a few jobs to finish")
    prioqd.stop()
    queued = [
        json.loads(p)["id"] for p in prioqd.redis("LRANGE", f"{PREFIX}:queue:normal", "0", "-1")
    ]
    done = [i for i in ids if prioqd.job(i).get("status") == "succeeded"]
    lost = set(ids) - set(done) - set(queued)
    assert not lost, f"lost at stop: {sorted(lost)}; hashes {[prioqd.job(i) for i in lost]}"
    assert len(queued) == len(set(queued)) and not set(queued) & set(done), (queued, done)
    assert queued, "every job had finished before the stop: the test did not stop mid-way"
    held = helpers.in_flight(prioqd.redis, PREFIX)
    assert not held, f"in-flight records left after a clean stop: {held}"
    print(f"[e2e] stopped with {len(done)} done, {len(queued)} still queued")

    prioqd.start()
    for job_id in ids:
        prioqd.wait_job(job_id, timeout_s=20)


def test_stop_of_an_idle_daemon_is_prompt(prioqd: Prioqd) -> None:
    # Nothing to drain: `systemctl stop` (and a reboot) should not sit out the grace.
    time.sleep(1.0)
    took = prioqd.stop()
    prioqd.start()
    assert took < 3.0, f"stopping an idle daemon took {took:.1f}s (grace {GRACE_S}s)"


def test_harness_cleans_up(box: Container) -> None:
    """Not a prioqd behaviour but the harness's promise, checked on a second
    container beside the first: after shutdown() no process, mount, cgroup or /run
    entry of it is left."""
    with Container() as c:
        assert c.run(["systemctl", "is-system-running"], check=False).stdout.strip() in (
            "running",
            "degraded",
        )
        name, nspawn_dir = c.name, c.dir
        assert c.nspawn is not None
        pids = [c.pid, c.nspawn.pid]
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not nspawn_dir.exists()
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{name}"))
    assert not Path(f"/run/systemd/nspawn/propagate/{name}").exists()
    assert shutil.which("systemd-nspawn")


# --- issue 13: credentials, restarts, task output -------------------------------------


@contextlib.contextmanager
def running_with(prioqd: Prioqd, text: str, restart: bool = True) -> Iterator[None]:
    """The service restarted on config ``text``; afterwards back on the default config
    (restarted: the keys changed here need a restart)."""
    prioqd.write_config(text=text)
    try:
        if restart:
            prioqd.systemctl("restart", UNIT, timeout=START_TIMEOUT_S + STOP_TIMEOUT_S + 15)
        yield
    finally:
        prioqd.write_config()
        prioqd.systemctl("reset-failed", UNIT, check=False)
        limit = START_TIMEOUT_S + STOP_TIMEOUT_S + 15
        prioqd.systemctl("restart", UNIT, check=False, timeout=limit)


def test_redis_password_from_load_credential_and_from_environment_file(
    prioqd: Prioqd,
) -> None:
    password = f"pw-{uuid.uuid4().hex[:12]}"
    port = REDIS_PORT + 1
    box = prioqd.box
    box.run(
        ["systemd-run", "--unit", "test-redis-auth", "--property", "Type=exec",
         "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", password]
    )  # fmt: skip
    cli = ["redis-cli", "--no-auth-warning", "-p", str(port), "-a", password]
    wait_for(lambda: box.run([*cli, "PING"], check=False).stdout.strip() == "PONG", 10, "redis")
    text = prioqd.config.replace(f"127.0.0.1:{REDIS_PORT}/0", f"127.0.0.1:{port}/0")
    assert password not in text

    def run_a_job(tag: str) -> None:
        job_id = f"auth-{tag}-{uuid.uuid4().hex[:6]}"
        payload = json.dumps({"id": job_id, "task": "square", "args": [11]})
        box.run([*cli, "LPUSH", f"{PREFIX}:queue:high", payload])

        def done() -> bool:
            out = box.run([*cli, "HGET", f"{PREFIX}:job:{job_id}", "result"], check=False)
            return out.stdout.strip() == "121"

        try:
            wait_for(done, 20, f"{job_id} to run against the password-protected Redis")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{prioqd.evidence()}") from None

    t0 = now_us()
    try:
        # LoadCredential=redis-password:/etc/prioqd/redis-password
        box.write_file("/etc/prioqd/redis-password", password + "\n", mode=0o600)
        with running_with(prioqd, text):
            run_a_job("credential")
        # EnvironmentFile=-/etc/prioqd/env, the credential file left empty
        box.write_file("/etc/prioqd/redis-password", "", mode=0o600)
        box.write_file("/etc/prioqd/env", f"PRIOQD_REDIS_PASSWORD={password}\n", mode=0o600)
        with running_with(prioqd, text):
            run_a_job("environment")
        messages = "\n".join(str(e.get("MESSAGE", "")) for e in prioqd.journal(since_us=t0))
        assert "daemon ready" in messages
        assert password not in messages, "the password reached the journal"
    finally:
        box.write_file("/etc/prioqd/redis-password", "", mode=0o600)
        box.run(["rm", "-f", "/etc/prioqd/env"])
        prioqd.systemctl("stop", "test-redis-auth", check=False)


def test_a_configuration_error_is_not_restarted(prioqd: Prioqd) -> None:
    before = int(prioqd.show("NRestarts")["NRestarts"])
    bad = prioqd.config.replace("[jobs]\n", "[jobs]\nno_such_key = 1\n", 1)
    assert bad != prioqd.config
    t0 = now_us()
    with running_with(prioqd, bad, restart=False):
        started = prioqd.systemctl("restart", UNIT, check=False, timeout=START_TIMEOUT_S + 30)
        assert started.returncode != 0, "the daemon started on an invalid config"
        state = prioqd.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert state["ExecMainStatus"] == "2", f"{state}\n{prioqd.evidence()}"
        assert state["ActiveState"] == "failed" and state["Result"] == "exit-code", state
        # RestartSec=2: twice that and more, and still no restart (RestartPreventExitStatus=2).
        time.sleep(5)
        state = prioqd.show("ActiveState", "NRestarts", "ExecMainStatus")
        assert state == {
            "ActiveState": "failed", "NRestarts": str(before), "ExecMainStatus": "2"
        }, state  # fmt: skip
        errors = [str(e.get("MESSAGE", "")) for e in prioqd.journal(since_us=t0)]
        assert any("jobs.no_such_key: unknown key" in m for m in errors), "\n".join(errors)


def test_a_restart_after_a_crash_recovers_the_predecessors_jobs_at_once(prioqd: Prioqd) -> None:
    lease_s = 30.0  # config.example.toml's, which the installed config keeps
    assert re.search(r"(?m)^lease_s = 30\.0$", prioqd.config)
    ids = [prioqd.push("sleep", 3, queue="normal") for _ in range(2)]
    for job_id in ids:
        prioqd.wait_job(job_id, status="running")
    before = prioqd.show("MainPID", "NRestarts")
    t0 = now_us()
    killed_at = time.monotonic()
    prioqd.box.run(["kill", "-KILL", before["MainPID"]])  # Restart=on-failure
    recovered = prioqd.wait_journal(
        lambda e: "recovered a dead daemon's jobs" in str(e.get("MESSAGE", "")),
        "the restarted daemon to recover its predecessor's jobs",
        timeout_s=20,
        since_us=t0,
    )
    assert recovered.get("JOBS") == "2", recovered
    for job_id in ids:
        h = prioqd.wait_job(job_id, timeout_s=20)
        assert h["attempts"] == "2", h
    # At once: well within the lease another daemon would have waited out.
    assert time.monotonic() - killed_at < lease_s - 10
    after = prioqd.show("MainPID", "NRestarts")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert after["MainPID"] != before["MainPID"]


E2E_TASKS = """\
import sys
from prioqd import task


@task
def shout(text):
    print(f"stdout says {text}", flush=True)
    print(f"stderr says {text}", file=sys.stderr, flush=True)
    return text
"""


def test_task_print_output_reaches_the_journal(prioqd: Prioqd) -> None:
    site = prioqd.box.run(
        ["/opt/prioqd/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).stdout.strip()
    prioqd.box.write_file(f"{site}/e2e_tasks.py", E2E_TASKS)
    text = re.sub(
        r"(?m)^modules = .*$", 'modules = ["prioqd.examples", "e2e_tasks"]', prioqd.config
    )
    marker = uuid.uuid4().hex[:10]
    try:
        with running_with(prioqd, text):
            job_id = prioqd.push("shout", marker)
            assert prioqd.wait_job(job_id)["result"] == json.dumps(marker)
            for stream in ("stdout", "stderr"):
                entry = prioqd.wait_journal(
                    lambda e, s=stream: e.get("MESSAGE") == f"{s} says {marker}",
                    f"the task's {stream} print in the journal",
                )
                assert entry.get("_SYSTEMD_UNIT") == f"{UNIT}.service", entry
    finally:
        prioqd.box.run(["rm", "-f", f"{site}/e2e_tasks.py"])
