"""A real systemd in a throwaway systemd-nspawn container, for end-to-end tests.

PID 1 on the test machine need not be systemd: ``systemd-nspawn -b`` boots one. The
container's root is the host's own root seen through an overlay mount (lower ``/``,
upper and work dirs of the container's own), so booting costs about a second, every
binary the host has (python3, redis-server, redis-cli) is there, and nothing the
container writes reaches the host. The host's enabled services (databases, brokers...)
are masked on the kernel command line and the container has a private network with
only ``lo``, so nothing inside can clash with what runs outside.

    with Container() as box:           # boot() on enter, shutdown() on exit
        box.systemctl("start", "some.service")
        print(box.show("some.service", "ActiveState"))
        print(box.journal(unit="some.service"))

Everything this module starts it ends, by pid: the nspawn process (SIGTERM halts
the container cleanly; if that hangs, SIGKILL to it and to every process left in
the container's cgroup), commands run through ``nsenter`` (on a timeout, killed
with their descendants, by pid). It unmounts the overlay and removes the cgroup directories and the
``/run/systemd/nspawn`` entries nspawn leaves on a host without systemd. A run
killed before its clean-up is reaped by the next ``boot()`` (see ``reap_stale``).

``build_wheels`` fills a cache (``/var/cache/prioqd-test`` by default) with wheels
for an offline install inside the container, which has no network.

Host facts this relies on (Debian 12, systemd 252, root, cgroup hybrid layout):
without systemd on the host, nspawn needs ``--register=no --keep-unit`` (no system
bus), and then creates ``payload``/``supervisor`` cgroups under its own cgroup; we
start it in a cgroup of its own (``/sys/fs/cgroup/{systemd,unified}/<name>``) so two
containers never share those and clean-up is one subtree.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Container state (overlay upper/work/merged dirs, nspawn's log, its pid file). Not
#: under /tmp: nspawn mounts a tmpfs over the container's /tmp anyway, but pytest
#: and tmp cleaners there should not race us. Inside the container this directory
#: is unreadable (overlayfs answers ELOOP for its own upper/work dirs): harmless.
STATE_DIR = Path(os.environ.get("PRIOQD_NSPAWN_STATE", "/var/lib/prioqd-test"))
#: Wheel cache, kept between runs.
CACHE_DIR = Path(os.environ.get("PRIOQD_TEST_CACHE", "/var/cache/prioqd-test"))

CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_RUN = Path("/run/systemd/nspawn")
#: Units masked whatever the host has enabled: servers that would fight over ports or
#: data directories with the host's own instances.
ALWAYS_MASK = (
    "postgresql.service",
    "mariadb.service",
    "mysql.service",
    "redis-server.service",
    "redis.service",
    "rabbitmq-server.service",
    "mosquitto.service",
    "nats-server.service",
    "epmd.service",
    "epmd.socket",
)
#: The environment of every command run inside (nothing leaks in from the host).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


class ContainerError(RuntimeError):
    """The container could not be booted, reached or cleaned up."""


class CommandFailed(ContainerError):
    """A command inside the container exited non-zero (``check=True``)."""

    def __init__(self, cmd: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.cmd = list(cmd)
        self.result = result
        super().__init__(
            f"exit status {result.returncode} from {' '.join(self.cmd)!r} in the container\n"
            f"--- stdout ---\n{result.stdout.rstrip()}\n--- stderr ---\n{result.stderr.rstrip()}"
        )


# --- host checks ---------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in our namespace, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        out.append((point, right.split()[0]))
    return out


def _is_mountpoint(path: Path) -> bool:
    return any(point == str(path) for point, _ in _mounts())


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [p for p, _ in _mounts() if p == str(path) or p.startswith(prefix)]


def host_runs_systemd() -> bool:
    return Path("/proc/1/comm").read_text().strip() == "systemd"


def cgroup_hierarchies() -> list[Path]:
    """The cgroup trees nspawn puts the container in: the named ``systemd`` v1
    hierarchy and the v2 one (hybrid layout), or just v2 (unified layout)."""
    types = dict(_mounts())
    if types.get(str(CGROUP_ROOT)) == "cgroup2":
        return [CGROUP_ROOT]
    found = []
    if types.get(str(CGROUP_ROOT / "systemd")) == "cgroup":
        found.append(CGROUP_ROOT / "systemd")
    if types.get(str(CGROUP_ROOT / "unified")) == "cgroup2":
        found.append(CGROUP_ROOT / "unified")
    return found


def _mount_overlay(lower: str, upper: Path, work: Path, merged: Path) -> None:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "-o", opts, "overlay", str(merged)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise ContainerError(f"overlay mount ({opts}) failed: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    """Unmount ``path``; lazily if it stays busy. Raises if it is still mounted."""
    for attempt in range(20):
        if not _is_mountpoint(path):
            return
        args = ["umount", str(path)] if attempt < 19 else ["umount", "-l", str(path)]
        subprocess.run(args, capture_output=True, timeout=30)
        if _is_mountpoint(path):
            time.sleep(0.1)
    if _is_mountpoint(path):
        raise ContainerError(f"could not unmount {path}")


@functools.cache
def available() -> tuple[bool, str]:
    """Whether a container can be booted here, and if not, why not (for a skip)."""
    if os.geteuid() != 0:
        return False, "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            hint = " (apt-get install systemd-container)" if tool == "systemd-nspawn" else ""
            return False, f"{tool} is not installed{hint}"
    hierarchies = cgroup_hierarchies()
    if not hierarchies:
        return False, "no cgroup hierarchy nspawn can use (need cgroup2 or name=systemd v1)"
    if not host_runs_systemd():
        probe = f"prioqd-probe-{os.getpid()}"
        for h in hierarchies:
            try:
                (h / probe).mkdir()
                (h / probe).rmdir()
            except OSError as exc:
                return False, f"cannot create a cgroup under {h}: {exc}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "overlay"], capture_output=True, timeout=30)
    base = STATE_DIR / f"probe-{os.getpid()}"
    dirs = [base / d for d in ("upper", "work", "merged")]
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        _mount_overlay("/", dirs[0], dirs[1], dirs[2])
        ok = (dirs[2] / "usr" / "lib" / "systemd" / "systemd").exists()
        _umount(dirs[2])
        if not ok:
            return False, "the host has no /usr/lib/systemd/systemd to boot"
    except (OSError, ContainerError) as exc:
        return False, f"cannot mount an overlay of / here: {exc}"
    finally:
        if not _mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
    return True, f"ok (cgroups: {', '.join(map(str, hierarchies))})"


def default_masks() -> list[str]:
    """Units to mask in a container booted from the host's root: everything the
    host's administrator enabled (``/etc/systemd/system/*.wants``) but systemd's own
    units and gettys, plus ``ALWAYS_MASK``."""
    names = set(ALWAYS_MASK)
    for wants in Path("/etc/systemd/system").glob("*.wants"):
        for unit in wants.iterdir():
            name = unit.name
            if name.startswith(("systemd-", "getty@", "serial-getty@", "dbus")):
                continue
            if name.rsplit(".", 1)[-1] in ("service", "socket", "timer", "path"):
                names.add(name)
    return sorted(names)


# --- the wheel cache -----------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_wheels(project: Path, python: str = "/usr/bin/python3", cache: Path = CACHE_DIR) -> Path:
    """A directory of wheels for every runtime and build dependency of ``project``,
    for ``pip install --no-index --find-links DIR`` with ``python``.

    Cached under ``cache``, keyed by a hash of ``pyproject.toml`` and the exact
    Python version (markers such as ``python_full_version < "3.11.3"`` differ
    between 3.11 builds, so the wheels are resolved by a venv of ``python`` itself,
    not by the dev venv). The project itself is not in it: the install builds it
    from source, so code changes never need a rebuild here. A build takes a few
    seconds and needs the host's package index; a cached one needs nothing.
    """
    pyproject = (project / "pyproject.toml").read_bytes()
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    key = hashlib.sha256(pyproject + version.encode() + b"\0wheels-v1").hexdigest()[:16]
    target = cache / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    with _locked(cache / ".lock"):
        if (target / ".complete").exists():
            return target
        meta = tomllib.loads(pyproject.decode())
        reqs = [*meta.get("project", {}).get("dependencies", [])]
        # install.sh installs the dashboard's extra too (prioqd-web.service).
        reqs += meta.get("project", {}).get("optional-dependencies", {}).get("web", [])
        reqs += meta.get("build-system", {}).get("requires", [])
        venv = cache / f"buildenv-{version}"
        if not (venv / "bin" / "pip").exists():
            shutil.rmtree(venv, ignore_errors=True)
            _host(["python3-venv", python, "-m", "venv", str(venv)], timeout=300)
        tmp = cache / f".wheels-{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _host(
            ["pip wheel", str(venv / "bin" / "pip"), "wheel", "-q", "-w", str(tmp), *reqs],
            timeout=600,
        )
        (tmp / ".complete").write_text(json.dumps({"python": version, "requires": reqs}))
        tmp.rename(target)
        for old in cache.glob("wheels-*"):  # one set is enough; older ones are stale
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def _host(args: list[str], timeout: float) -> None:
    what, *cmd = args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ContainerError(
            f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )


def project_files(repo: Path) -> list[Path]:
    """The files of a checkout as ``git`` sees them (tracked and new, not ignored):
    what a user who cloned it would have, without the dev venv or caches."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ContainerError(f"git ls-files failed in {repo}: {proc.stderr.decode()}")
    names = sorted({n for n in proc.stdout.decode().split("\0") if n})
    return [Path(n) for n in names if (repo / n).is_file()]


# --- the container -------------------------------------------------------------------

_live: weakref.WeakSet[Container] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:  # a backstop: fixtures should have done it
    for box in list(_live):
        with contextlib.suppress(Exception):
            box.shutdown()


class Container:
    """One booted systemd in systemd-nspawn; see the module docstring.

    ``lower`` is the tree to boot (default the host's ``/``; a debootstrap tree works
    too). ``masks`` defaults to ``default_masks()`` when booting the host's root.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        lower: str = "/",
        masks: Iterable[str] | None = None,
        boot_timeout_s: float = 60.0,
        state_dir: Path = STATE_DIR,
        keep_tree: bool = False,
    ) -> None:
        self.name = name or f"prioqd-e2e-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,62}", self.name):
            raise ValueError(f"bad machine name {self.name!r}")
        self.lower = lower
        self.masks = list(masks) if masks is not None else (default_masks() if lower == "/" else [])
        self.boot_timeout_s = boot_timeout_s
        self.keep_tree = keep_tree
        self.dir = state_dir / "machines" / self.name
        self.upper = self.dir / "upper"
        self.work = self.dir / "work"
        self.merged = self.dir / "merged"
        self.log_path = self.dir / "nspawn.log"
        self.cgroups: list[Path] = []
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the container's systemd, as the host sees it
        self.boot_s = 0.0
        self.degraded = ""  # `systemctl --failed` output if the boot was degraded

    #: ``Container.available()``: whether one can boot here, and why not.
    available = staticmethod(available)

    # -- context manager

    def __enter__(self) -> Container:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- boot

    def boot(self) -> Container:
        """Mount the tree, start nspawn, return once systemd inside is up (or raise
        ``ContainerError`` with nspawn's output, having cleaned up)."""
        ok, why = available()
        if not ok:
            raise ContainerError(f"cannot boot a container here: {why}")
        reap_stale(self.dir.parent)
        t0 = time.monotonic()
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        (self.dir / "owner").write_text(f"{me} {_starttime(me)}\n")
        _live.add(self)
        try:
            _mount_overlay(self.lower, self.upper, self.work, self.merged)
            # A machine id of its own: the container's journal then lives in a fresh
            # /var/log/journal/<id> instead of appending to the host's files.
            (self.merged / "etc").mkdir(exist_ok=True)
            (self.merged / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
            self._start_nspawn()
            self._wait_booted(t0 + self.boot_timeout_s)
        except BaseException as exc:
            log = self.nspawn_log()
            with contextlib.suppress(ContainerError):
                self.shutdown()
            if not isinstance(exc, Exception):
                raise
            raise ContainerError(
                f"container {self.name} did not boot: {exc}\n--- nspawn output ---\n{log}"
            ) from exc
        self.boot_s = time.monotonic() - t0
        return self

    def _start_nspawn(self) -> None:
        cmd = [
            "systemd-nspawn", "--quiet",
            "--directory", str(self.merged),
            "--machine", self.name,
            # Without a system bus on the host nspawn cannot register the machine.
            "--register=no", "--keep-unit",
            "--boot", "--console=passive", "--private-network",
            "--setenv=SYSTEMD_COLORS=0",  # a readable nspawn.log
            *(f"systemd.mask={unit}" for unit in self.masks),
        ]  # fmt: skip
        env = dict(os.environ)
        script = 'exec "$@"'
        if not host_runs_systemd():
            # nspawn creates payload/ and supervisor/ under its own cgroup: give it
            # one of its own first (the shell moves itself, then execs nspawn).
            for h in cgroup_hierarchies():
                cg = h / self.name
                cg.mkdir(exist_ok=True)
                self.cgroups.append(cg)
            env["NSPAWN_CGROUPS"] = " ".join(str(c / "cgroup.procs") for c in self.cgroups)
            script = 'for f in $NSPAWN_CGROUPS; do echo $$ >"$f" || exit 97; done; exec "$@"'
        with open(self.log_path, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", script, "sh", *cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.dir),
                start_new_session=True,  # setsid: no controlling terminal, own group
            )
        (self.dir / "pid").write_text(f"{self.nspawn.pid}\n")

    def _wait_booted(self, deadline: float) -> None:
        assert self.nspawn is not None
        while not self.pid:
            self._check_nspawn_alive("while starting systemd")
            self.pid = _child_named(self.nspawn.pid, "systemd")
            if not self.pid:
                self._sleep_until(deadline, "systemd to start in the container")
        while not self.host_path("/run/systemd/private").exists():
            self._check_nspawn_alive("before systemd was reachable")
            self._sleep_until(deadline, "/run/systemd/private in the container")
        remaining = max(1.0, deadline - time.monotonic())
        try:
            state = self.systemctl("is-system-running", "--wait", check=False, timeout=remaining)
        except subprocess.TimeoutExpired:
            raise ContainerError(
                f"systemd in the container did not finish booting within {self.boot_timeout_s}s:"
                f"\n{self.systemctl('list-jobs', check=False).stdout}"
            ) from None
        if state.stdout.strip() not in ("running", "degraded"):
            raise ContainerError(f"system state after boot: {state.stdout.strip()}")
        if state.stdout.strip() == "degraded":
            self.degraded = self.systemctl("--failed", check=False).stdout

    def _check_nspawn_alive(self, when: str) -> None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited ({self.nspawn.returncode}) {when}")

    def _sleep_until(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise ContainerError(f"timed out after {self.boot_timeout_s}s waiting for {what}")
        time.sleep(0.02)

    def nspawn_log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no nspawn log)"
        return "\n".join(lines[-tail:])

    # -- inside

    def host_path(self, path: str) -> Path:
        """The host's path to ``path`` inside the container (any mount in it)."""
        if not self.pid:
            raise ContainerError("the container is not running")
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string for ``sh -c``) inside the container as root,
        in all its namespaces, with ``BASE_ENV`` plus ``env``. On ``timeout`` the
        command and its descendants are killed and ``subprocess.TimeoutExpired`` raised."""
        if not self.pid:
            raise ContainerError("the container is not running")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        variables = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
        full = ["nsenter", "--target", str(self.pid), "--all", "env", "-i", *variables, *argv]
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # Kill what nsenter started, not nsenter first: it must live to reap its
            # child, or that child stays a zombie of the host's PID 1 and holds up the
            # container's shutdown. Grandchildren are reaped by the container's systemd.
            for pid in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, result)
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journalctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["journalctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal(
        self,
        *args: str,
        unit: str | None = None,
        priority: str | None = None,
        since_us: int | None = None,
        **matches: str,
    ) -> list[dict[str, Any]]:
        """Journal entries as dicts (``journalctl -o json --all``), oldest first.
        ``matches`` are field matches (``JOB_ID="x"``); ``since_us`` drops entries
        before that ``__REALTIME_TIMESTAMP`` (host and container share a clock)."""
        cmd = ["-o", "json", "--all", *args]
        if unit:
            cmd += ["-u", unit]
        if priority:
            cmd += ["-p", priority]
        cmd += [f"{k}={v}" for k, v in matches.items()]
        entries = []
        for line in self.journalctl(*cmd, check=False).stdout.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if since_us is None or int(entry.get("__REALTIME_TIMESTAMP", 0)) >= since_us:
                    entries.append(entry)
        return entries

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p A,B unit`` as a dict."""
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(
            ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"', "sh",
             path, f"{mode:o}"],
            input=text,
        )  # fmt: skip

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def copy_in(self, src: Path, dest: str, files: Iterable[Path] | None = None) -> None:
        """Copy the host's ``src`` (a file, a directory, or ``files`` relative to it)
        to ``dest`` inside, keeping modes."""
        target = self.host_path(dest)
        if src.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        elif files is None:
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            for rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, target / rel)

    # -- shutdown

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Halt the container and undo everything ``boot`` did. Idempotent."""
        _live.discard(self)
        problems: list[str] = []
        if self.nspawn is not None:
            _end_process(self.nspawn, timeout_s)
            self.nspawn = None
        self.pid = 0
        problems += _clean_cgroups(self.cgroups)
        self.cgroups = []
        _clean_nspawn_run(self.name)
        try:
            _umount(self.merged)
        except ContainerError as exc:
            problems.append(str(exc))
        if not self.keep_tree and self.dir.exists():
            if mounted := _mounts_under(self.dir):
                problems.append(f"not removing {self.dir}: still mounted: {mounted}")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        if problems:
            raise ContainerError("container clean-up incomplete: " + "; ".join(problems))


def _child_named(ppid: int, comm: str) -> int:
    """The pid of ``ppid``'s child called ``comm``, or 0."""
    try:
        children = Path(f"/proc/{ppid}/task/{ppid}/children").read_text().split()
    except OSError:
        return 0
    for pid in children:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return int(pid)
    return 0


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def _end_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to nspawn halts the container (systemd's shutdown); a second SIGTERM
    makes it terminate at once; SIGKILL as the last resort."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    if proc.poll() is None:
        raise ContainerError(f"systemd-nspawn (pid {proc.pid}) survived SIGKILL")


def _clean_cgroups(cgroups: list[Path]) -> list[str]:
    """Kill whatever is still in our cgroups (by pid: nothing should be), rmdir them."""
    problems = []
    for cg in cgroups:
        if not cg.exists():
            continue
        deadline = time.monotonic() + 10
        while True:
            pids = {int(p) for procs in cg.rglob("cgroup.procs") for p in procs.read_text().split()}
            if not pids:
                break
            if time.monotonic() > deadline:
                problems.append(f"processes {sorted(pids)} survive in {cg}")
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        try:
            cg.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove cgroup {cg}: {exc}")
    return problems


def _clean_nspawn_run(name: str) -> None:
    """On a host without systemd, /run is no tmpfs and nspawn refuses to remove its
    per-machine directories there ("Attempted to remove disk file system"). Remove
    ours, then the shared parents if nothing else is in them."""
    for sub in ("propagate", "unix-export", "incoming"):
        d = NSPAWN_RUN / sub / name
        if d.exists() and not _mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)
    for d in (*(NSPAWN_RUN / sub for sub in ("propagate", "unix-export", "locks")), NSPAWN_RUN):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty: another container may be running


def reap_stale(machines: Path) -> list[str]:
    """Clean up after earlier runs that died before their clean-up (SIGKILL, power
    cut): every machine dir whose owning test process is gone. Its nspawn, if still
    running, is ended by the pid recorded for it (checked against its command line).
    Returns the names reaped."""
    reaped: list[str] = []
    if not machines.is_dir():
        return reaped
    for d in machines.iterdir():
        try:
            owner_pid, owner_start = (d / "owner").read_text().split()
            if _starttime(int(owner_pid)) == owner_start:
                continue  # its run is alive (perhaps a concurrent one): not ours
        except (OSError, ValueError):
            if time.time() - d.stat().st_mtime < 60:
                continue  # being set up right now, perhaps
        with contextlib.suppress(OSError, ValueError):
            pid = int((d / "pid").read_text())
            if _is_nspawn_of(pid, d.name):
                _terminate(pid)
        _clean_cgroups([h / d.name for h in cgroup_hierarchies()])
        _clean_nspawn_run(d.name)
        with contextlib.suppress(ContainerError):
            _umount(d / "merged")
        if not _mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)
            reaped.append(d.name)
    return reaped


def _starttime(pid: int) -> str:
    """A process's start time in clock ticks since boot ("" if it is gone): with the
    pid, an identity that survives pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _is_nspawn_of(pid: int, name: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"systemd-nspawn" in argv and name.encode() in argv


def _terminate(pid: int) -> None:
    """End a process that is not our child (a stale run's nspawn), by pid."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
