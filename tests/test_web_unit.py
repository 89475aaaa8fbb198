"""systemd/prioqd-web.service: verified, hardened like the daemon's unit, and the
token it hands over (LoadCredential=web-token) is the one the dashboard uses."""

from __future__ import annotations

from pathlib import Path

from helpers import ROOT, RedisServer, systemd_analyze, unit_exposure, verify_unit, write_config
from webhelpers import TOKEN, Client, WebProcess

WEB_UNIT = ROOT / "systemd" / "prioqd-web.service"
DAEMON_UNIT = ROOT / "systemd" / "prioqd.service"


def settings(path: Path) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, _, v in (
            line.partition("=")
            for line in path.read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
    ]


def test_web_unit_verifies(tmp_path: Path) -> None:
    systemd_analyze()
    out = verify_unit(WEB_UNIT, tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_web_unit_is_as_hardened_as_the_daemons() -> None:
    systemd_analyze()
    assert unit_exposure(WEB_UNIT) <= min(2.0, unit_exposure(DAEMON_UNIT))


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
