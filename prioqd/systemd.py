"""systemd integration: the notify protocol, the watchdog, credentials, the journal.

The notify protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE``
lines to ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace); it is
small enough to write here rather than depend on the unmaintained ``sdnotify``.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time

CREDENTIAL_NAME = "redis-password"
PASSWORD_ENV = "PRIOQD_REDIS_PASSWORD"

#: Variables meant for the daemon alone; worker processes (and whatever task code
#: starts) must not inherit them: systemd's notify and watchdog settings, and the
#: Redis password with the directory of credentials it may come from.
PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "CREDENTIALS_DIRECTORY",
    PASSWORD_ENV,
)

#: A notify value longer than this is cut (systemd shows STATUS on one line).
MAX_VALUE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def one_line(value: object, limit: int = MAX_VALUE) -> str:
    """``value`` as one line without control characters, at most ``limit`` long.

    A notify message is newline-separated ``KEY=VALUE`` lines: a value holding a
    newline (an error text from a task, say) would add lines of its own, such as
    ``WATCHDOG=trigger``.
    """
    text = _CONTROL.sub(" ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines; True if delivered. Never raises: losing a status
        update must not take the daemon down."""
        if not self.address:
            return False
        data = "\n".join(f"{k}={one_line(v)}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.connect(self.address)
            self._sock.sendall(data)
            return True
        except OSError:
            self.close()
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload.
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1, or None if systemd's watchdog is off for us.

    A third of ``WATCHDOG_USEC``: systemd advises under half, and a third leaves
    room for one ping delayed by a busy event loop.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 3


def redis_password() -> str | None:
    """The Redis password from a systemd credential or the environment, if any.

    ``LoadCredential=redis-password:/etc/prioqd/redis-password`` puts it in
    ``$CREDENTIALS_DIRECTORY``; an ``EnvironmentFile=`` may set
    ``PRIOQD_REDIS_PASSWORD`` instead. An empty value means no password.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(directory, CREDENTIAL_NAME), encoding="utf-8") as fh:
                value = fh.read().strip()
            if value:
                return value
    return os.environ.get(PASSWORD_ENV) or None


def journal_stream_attached() -> bool:
    """True when our stdout or stderr is connected to journald.

    systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` of the stream it connected; a
    match (rather than mere presence, which children inherit) is the documented test.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    dev, _, ino = value.partition(":")
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if str(st.st_dev) == dev and str(st.st_ino) == ino:
            return True
    return False
