"""The log's own pieces, without a daemon."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
import structlog

from prioqd import log


def test_the_stamp_is_structlogs_iso_utc_text() -> None:
    ours, theirs = log.IsoUtcStamper(), structlog.processors.TimeStamper(fmt="iso", utc=True)
    for _ in range(1000):  # across a second's boundary now and then
        before = theirs(None, "info", {})["timestamp"]
        stamp = ours(None, "info", {})["timestamp"]
        after = theirs(None, "info", {})["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp
        parse = datetime.datetime.fromisoformat
        # (Ours truncates to the microsecond where datetime rounds: 1 us either way.)
        tick = datetime.timedelta(microseconds=1)
        assert parse(before) - tick <= parse(stamp) <= parse(after) + tick


def test_a_stamp_on_the_second_has_no_fraction_as_structlogs(monkeypatch: Any) -> None:
    monkeypatch.setattr(log.time, "time", lambda: 1_800_000_000.0)
    assert log.IsoUtcStamper()(None, "info", {})["timestamp"] == "2027-01-15T08:00:00Z"
    monkeypatch.setattr(log.time, "time", lambda: 1_800_000_000.25)
    assert log.IsoUtcStamper()(None, "info", {})["timestamp"] == "2027-01-15T08:00:00.250000Z"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configure_stamps_every_line(fmt: str, tmp_path: Any) -> None:
    out = (tmp_path / "log").open("w")
    log.configure("info", fmt, stream=out)
    log.get_logger(daemon_id="d").info("hello", job_id="j")
    log.configure("info", "json")  # flushes the writer; back to stdout
    out.close()
    text = (tmp_path / "log").read_text()
    assert "hello" in text and re.search(r"\d\d:\d\d:\d\d(\.\d{6})?Z", text), text


def test_a_logger_kept_across_a_reconfigure_follows_its_level_and_stream(tmp_path: Any) -> None:
    """The daemon's parts keep one logger, whose methods it keeps too (looked up once a
    configuration): a reload that changes the level or the stream must still reach them."""
    first, second = (tmp_path / "one").open("w"), (tmp_path / "two").open("w")
    try:
        log.configure("info", "json", stream=first)
        lg = log.get_logger(daemon_id="d")
        lg.info("one")
        lg.debug("hidden")
        assert not lg.debug_enabled
        log.configure("debug", "json", stream=second)
        assert lg.debug_enabled
        lg.info("two")
        lg.debug("shown")
    finally:
        log.configure("info", "json")  # flushes the writer; back to stdout
        first.close()
        second.close()
    one, two = (tmp_path / "one").read_text(), (tmp_path / "two").read_text()
    assert '"one"' in one and "hidden" not in one and "two" not in one
    assert '"two"' in two and '"shown"' in two and '"daemon_id":"d"' in two
