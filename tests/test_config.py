from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import PRIOQD, ROOT

from prioqd import config
from prioqd.errors import ConfigError


def test_example_config_loads_and_documents_every_default() -> None:
    cfg = config.load(str(ROOT / "config.example.toml"))
    assert cfg.replace(path="<defaults>") == config.Config()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[jobs]\ntimeout = 5\n", "jobs.timeout", "unknown key"),
        ("[job]\ntimeout_s = 5\n", "job", "unknown table"),
        ('[jobs]\ntimeout_s = "5"\n', "jobs.timeout_s", "expected a number, got a string"),
        ("[jobs]\ntimeout_s = 0\n", "jobs.timeout_s", "must be greater than 0"),
        ("[jobs]\nmax_retries = 1.5\n", "jobs.max_retries", "expected an integer"),
        ("[jobs]\nmax_retries = true\n", "jobs.max_retries", "expected an integer"),
        ('[workers]\nslots = "many"\n', "workers.slots", 'must be "auto"'),
        ("[workers]\nslots = 0\n", "workers.slots", 'must be "auto"'),
        ('[redis]\nurl = "http://x"\n', "redis.url", "scheme must be"),
        ("[queues]\npriorities = []\n", "queues.priorities", "at least one"),
        ('[queues]\npriorities = ["a", "a"]\n', "queues.priorities", "must not repeat"),
        ('[queues]\npriorities = ["a b"]\n', "queues.priorities", "may only contain"),
        ('[log]\nlevel = "loud"\n', "log.level", "must be one of"),
        ("redis = 3\n", "redis", "expected a table"),
        (
            "[jobs]\nretry_backoff_s = 10\nretry_backoff_max_s = 1\n",
            "jobs.retry_backoff_max_s",
            "must not be smaller",
        ),
    ],
)
def test_bad_values_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.path == path
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.load(write(tmp_path, "[jobs\n"))


def test_values_are_typed_and_defaults_fill_in(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, '[jobs]\ntimeout_s = 5\n[queues]\npriorities = ["urgent", "bulk"]\n')
    )
    assert cfg.jobs.timeout_s == 5.0 and isinstance(cfg.jobs.timeout_s, float)
    assert cfg.jobs.max_retries == 3
    assert cfg.queues.priorities == ["urgent", "bulk"]
    assert config.Config().workers.slot_count >= 1


def test_run_with_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nlease = 3\n")
    proc = subprocess.run(
        [*PRIOQD, "run", "--config", path], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"{path}: daemon.lease: unknown key" in proc.stderr


def test_run_with_missing_config_exits_2(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    proc = subprocess.run(
        [*PRIOQD, "run", "--config", path], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"{path}: file not found" in proc.stderr


def test_check_config(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*PRIOQD, "check-config", "--config", str(ROOT / "config.example.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*PRIOQD, "check-config", "--config", write(tmp_path, "[log]\nformat = 1\n")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "log.format: expected a string" in bad.stderr


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[workers]\nslots = 1.5\n", "workers.slots", "expected an integer or a string"),
        ('[tasks]\nmodules = "prioqd.examples"\n', "tasks.modules", "expected an array of strings"),
        ("[tasks]\nmodules = [1]\n", "tasks.modules", "expected an array of strings"),
    ],
)
def test_more_bad_values(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert info.value.key == key and problem in info.value.problem


def test_a_directory_or_binary_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(str(tmp_path))
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"[jobs]\ntimeout_s = 5 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        config.load(str(binary))
