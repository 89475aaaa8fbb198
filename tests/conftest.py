from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import DaemonProcess, RedisServer, write_config


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests that break Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with an append-only file: for tests that stop
    and start their Redis (an outage) and want its data back after."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Callable[..., Path]:
    def make(**sections: dict[str, Any]) -> Path:
        return write_config(tmp_path / "prioqd.toml", redis_server.url, **sections)

    return make


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: start ``prioqd run`` on a config; every one is ended after the test."""
    started: list[DaemonProcess] = []

    def start(config: Path, wait_ready: bool = True, **kw: Any) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / f"logs{len(started)}", **kw)
        started.append(d)
        return d.start(wait_ready=wait_ready)

    yield start
    for d in started:
        d.cleanup()
