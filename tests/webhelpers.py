"""Helpers for the dashboard's tests: ``prioqd web`` as a real process, a real
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through Selenium),
and a plain HTTP client with cookies.

Where the browser or a tool cannot be had, the tests are skipped with the reason;
with ``PRIOQD_TEST_STRICT=1`` (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import PRIOQD, ROOT, env_with_taskmods, free_port, skip_or_fail, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: The network is closed: without these Chromium keeps trying to reach it.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--no-first-run",
    "--window-size=1200,900",
)
TOKEN = "test-token-0123456789abcdef"


def need_tool(path_or_name: str, package: str) -> str:
    found = path_or_name if os.path.exists(path_or_name) else shutil.which(path_or_name)
    if not found:
        skip_or_fail(
            f"{path_or_name} is not installed (Debian package {package}; "
            "scripts/ensure-deps.sh installs it when run as root)"
        )
    return str(found)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    need_tool(CHROMIUM, "chromium")
    need_tool(CHROMEDRIVER, "chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class WebProcess:
    """``prioqd web`` on a free loopback port, its output collected."""

    def __init__(
        self, config: Path, logdir: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / f"web-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*PRIOQD, "web", "--config", str(config), "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env_with_taskmods(env),
            cwd=str(ROOT),
        )
        try:
            wait_for(self._up, 30, 0.05, what=f"prioqd web on port {self.port}")
        except BaseException:
            self.stop()  # the caller never gets an object to stop
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prioqd web exited ({self.proc.returncode}):\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self, path_prefix: str = "") -> list[str]:
        """The request lines of uvicorn's access log: 'GET /?fragment=1'."""
        return [
            f"{m.group(1)} {m.group(2)}"
            for m in re.finditer(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"', self.log())
            if m.group(2).startswith(path_prefix)
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Client:
    """A plain HTTP client with a cookie jar (no redirects followed)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kw: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def csrf(self, path: str = "/login") -> str:
        status, body = self.request("GET", path)
        assert status == 200, body
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
        assert match, "no CSRF token on the page"
        return match.group(1)

    def sign_in(self, token: str = TOKEN) -> int:
        status, _ = self.request("POST", "/login", {"csrf": self.csrf("/login"), "token": token})
        return status
