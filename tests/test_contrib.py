"""contrib/: the Prometheus alerting rules and the Grafana dashboard, checked with
Debian's ``promtool`` against the metrics a real daemon exports."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import ROOT, Config, Daemon, free_port, push, wait_for, wait_status
from webhelpers import need_tool

RULES = ROOT / "contrib" / "prometheus" / "prioqd-alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "prioqd-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "prioqd-dashboard.json"

#: The metric names the issue fixes (histograms and counters by their base name).
METRICS = {
    "prioqd_jobs_total",
    "prioqd_job_duration_seconds",
    "prioqd_job_wait_seconds",
    "prioqd_queue_depth",
    "prioqd_queue_paused",
    "prioqd_scheduled_jobs",
    "prioqd_dead_letters",
    "prioqd_slots",
    "prioqd_worker_restarts_total",
    "prioqd_redis_errors_total",
    "prioqd_daemons_alive",
    "prioqd_build_info",
}
ALERTS = {
    "PrioqdQueueGrowing",
    "PrioqdJobsWaitTooLong",
    "PrioqdOldestJobStuck",
    "PrioqdDeadLettersRising",
    "PrioqdNoDaemonAlive",
    "PrioqdRedisErrors",
}


def promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> str:
    tool = need_tool("promtool", "prometheus")
    out = subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, input=stdin
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def names_in(expr: str) -> set[str]:
    return {base_name(n) for n in re.findall(r"\bprioqd_[a-z_]+", expr)}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


# --- alerting rules ----------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_alert_rules_fire_when_they_should_and_not_otherwise() -> None:
    # Unit tests with synthetic series: growing vs steady vs paused queues, stuck
    # queues, slow waits, dead letters, no daemon, Redis errors.
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_every_asked_for_alert_is_there_and_tested() -> None:
    rules = RULES.read_text()
    tests = RULE_TESTS.read_text()
    for alert in ALERTS:
        assert f"alert: {alert}\n" in rules, alert
        assert f"alertname: {alert}\n" in tests, alert
    used = names_in(rules)
    assert used <= METRICS, used - METRICS


# --- the dashboard ---------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(p["title"] for p in dash["panels"])
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance"}


def test_dashboard_queries_use_the_metric_names_and_are_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    used: set[str] = set()
    for _, expr in exprs:
        used |= names_in(expr)
    assert used <= METRICS, used - METRICS
    # Every metric of the issue has a panel.
    assert used == METRICS, METRICS - used
    # promtool parses PromQL in rule files: one recording rule per query, with
    # Grafana's variables replaced by what they expand to.
    rules: dict[str, Any] = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, (_, expr) in enumerate(exprs):
        promql = (
            expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        )
        rules["groups"][0]["rules"].append({"record": f"dashboard:panel_{i}", "expr": promql})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", str(path))


# --- against a real daemon's /metrics ----------------------------------------------------------


@pytest.mark.slow
def test_the_daemon_exports_every_name_the_rules_and_dashboard_use(
    r: redis.Redis, config: Config, daemon: Daemon
) -> None:
    port = free_port()
    daemon(config(metrics={"listen": f"127.0.0.1:{port}"}))
    push(r, "high", {"id": "c1", "task": "square", "args": [2], "enqueued_at": 1.0})
    wait_status(r, ["c1"])

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = wait_for(lambda: "prioqd_job_wait_seconds_bucket" in (t := scrape()) and t, 10)
    exported = {
        base_name(m) if t in ("histogram", "summary") else m
        for m, t in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    }
    exported |= {f"{m}_total" for m in exported} | {f"{m}_info" for m in exported}
    used = names_in(RULES.read_text())
    for _, expr in dashboard_exprs():
        used |= names_in(expr)
    assert used <= exported, used - exported
    # promtool's lint of the exposition itself (names, units, HELP texts).
    out = subprocess.run(
        [need_tool("promtool", "prometheus"), "check", "metrics"],
        input=text, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
