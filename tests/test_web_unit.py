"""systemd/prioqd-web.service: verified, hardened like the daemon's unit, and the
token it hands over (LoadCredential=web-token) is the one the dashboard uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, RedisServer, write_config
from webhelpers import TOKEN, Client, WebProcess

WEB_UNIT = ROOT / "systemd" / "prioqd-web.service"
DAEMON_UNIT = ROOT / "systemd" / "prioqd.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def settings(path: Path) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, _, v in (
            line.partition("=")
            for line in path.read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
    ]


@needs_analyze
def test_web_unit_verifies(tmp_path: Path) -> None:
    exe = shutil.which("prioqd") or str(ROOT / ".venv" / "bin" / "prioqd")
    unit = tmp_path / "prioqd-web.service"
    unit.write_text(WEB_UNIT.read_text().replace("/opt/prioqd/bin/prioqd", exe))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


@needs_analyze
def test_web_unit_is_as_hardened_as_the_daemons() -> None:
    def exposure(unit: Path) -> float:
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
        assert match, out.stdout + out.stderr
        return float(match.group(1))

    assert exposure(WEB_UNIT) <= min(2.0, exposure(DAEMON_UNIT))


def test_web_unit_settings() -> None:
    web = settings(WEB_UNIT)
    values = dict(web)
    assert values["ExecStart"] == "/opt/prioqd/bin/prioqd web --config /etc/prioqd/config.toml"
    assert values["RestartPreventExitStatus"] == "2"
    creds = [v for k, v in web if k == "LoadCredential"]
    assert "web-token:/etc/prioqd/web-token" in creds
    assert "redis-password:/etc/prioqd/redis-password" in creds
    # Every sandbox setting of the daemon's unit is in the dashboard's too.
    daemon = dict(settings(DAEMON_UNIT))
    sandbox = [k for k in daemon if k.startswith(("Protect", "Private", "Restrict", "SystemCall"))]
    sandbox += ["DynamicUser", "NoNewPrivileges", "CapabilityBoundingSet", "MemoryDenyWriteExecute"]
    for key in sandbox:
        assert key in values, key
        assert values[key] == daemon[key], key


def test_the_token_comes_from_the_credential_directory(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "web-token").write_text(TOKEN + "\n")
    cfg = write_config(tmp_path / "web.toml", redis_server.url)
    w = WebProcess(cfg, tmp_path / "web", env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        client = Client(w.url)
        assert client.sign_in("a-wrong-token-0123456789") == 403
        assert client.sign_in() == 303
    finally:
        w.stop()
