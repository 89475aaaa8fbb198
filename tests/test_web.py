"""The dashboard (``prioqd web``) in a real headless Chromium, against a real Redis
and real daemons: what an operator sees and what their clicks change in Redis."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    Config,
    Daemon,
    RedisServer,
    job_hash,
    prioqd,
    push,
    wait_for,
    wait_status,
    worker_gone,
    write_config,
)
from webhelpers import TOKEN, Client, WebProcess, chromium

Web = Callable[..., WebProcess]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    browser.delete_all_cookies()
    yield browser
    browser.get("about:blank")


@pytest.fixture
def web(tmp_path: Path, redis_server: RedisServer) -> Iterator[Web]:
    """Factory: ``prioqd web`` on a config of its own (fast refresh, a token file)."""
    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN + "\n")
    started: list[WebProcess] = []

    def start(*args: str, **sections: dict[str, Any]) -> WebProcess:
        web_section = {"token_file": str(token_file), "refresh_s": 0.3}
        web_section.update(sections.pop("web", {}))
        path = tmp_path / f"web-{len(started)}.toml"
        cfg = write_config(path, redis_server.url, web=web_section, **sections)
        w = WebProcess(cfg, tmp_path / "web", *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def sign_in(page: Any, w: WebProcess) -> None:
    page.get(w.url + "/login")
    page.find_element("id", "token").send_keys(TOKEN)
    click(page, "#sign-in")
    wait_for(lambda: "Sign out" in page.page_source, 10, what="signed in")


# The live part of a page is replaced every refresh: read and click in one script
# call, so an element is never used after a refresh replaced it.


def text(page: Any, css: str) -> str:
    """The visible text of the first element matching ``css`` ("" if none)."""
    return str(
        page.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
        )
    )


def content(page: Any, css: str) -> str:
    """Its textContent: markup that was rendered as text keeps its angle brackets."""
    return str(
        page.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", css
        )
    )


def click(page: Any, css: str) -> None:
    found = page.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", css
    )
    assert found, f"nothing to click at {css}"


def depth(page: Any, priority: str) -> str:
    return text(page, f'#queues tr[data-priority="{priority}"] td.depth')


def flash(page: Any) -> str:
    return text(page, "p.flash")


class Heard(list[dict[str, Any]]):
    """Messages, decoded; ``at[i]``: when message i arrived (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def hear(self, message: dict[str, Any]) -> None:
        self.at.append(time.monotonic())
        self.append(json.loads(message["data"]))


@pytest.fixture
def control(r: redis.Redis) -> Iterator[Heard]:
    """Every message published on prioqd:control during the test, decoded."""
    messages = Heard()
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(**{"prioqd:control": messages.hear})
    thread = pubsub.run_in_thread(sleep_time=0.02, daemon=True)
    wait_for(lambda: r.pubsub_numsub("prioqd:control")[0][1] >= 1, 5, what="subscribed")
    yield messages
    thread.stop()
    thread.join(5)
    pubsub.close()


# --- the overview ----------------------------------------------------------------------


def test_a_pushed_job_changes_the_depth_on_an_open_overview(
    r: redis.Redis, web: Web, page: Any
) -> None:
    w = web()
    page.get(w.url + "/")
    assert depth(page, "low") == "0"
    page.execute_script("window.sameDocument = true")
    push(r, "low", {"id": "j1", "task": "square", "args": [2]})
    wait_for(lambda: depth(page, "low") == "1", 10, what="depth 1 on the page")
    push(r, "low", {"id": "j2", "task": "square", "args": [3]})
    wait_for(lambda: depth(page, "low") == "2", 10, what="depth 2 on the page")
    # Refreshed in place (fetch), not by reloading the page.
    assert page.execute_script("return window.sameDocument") is True


def test_nothing_is_read_while_no_page_is_open(r: redis.Redis, web: Web, page: Any) -> None:
    w = web()
    page.get(w.url + "/")
    wait_for(lambda: len(w.requests("/?fragment=1")) >= 3, 10, what="refreshes while open")
    page.get("about:blank")
    time.sleep(0.5)  # a refresh already on its way may land
    before_requests = len(w.requests())
    before_commands = int(r.info("stats")["total_commands_processed"])
    time.sleep(3.0)  # ten refresh periods
    after_commands = int(r.info("stats")["total_commands_processed"])
    assert len(w.requests()) == before_requests
    # The two INFO calls themselves, and nothing else.
    assert after_commands - before_commands <= 2


def test_overview_shows_daemons_throughput_and_the_oldest_job(
    r: redis.Redis, web: Web, page: Any, daemon: Daemon, config: Config
) -> None:
    w = web(workers={"slots": 2}, web={"queues_scan_s": 0.2})
    daemon(config(workers={"slots": 2}))
    page.get(w.url + "/")
    push(r, "high", *({"id": f"t{i}", "task": "square", "args": [i]} for i in range(5)))
    wait_status(r, [f"t{i}" for i in range(5)])

    def succeeded() -> int:
        cells = page.execute_script(
            "return [...document.querySelectorAll('#throughput tbody tr td:nth-child(2)')]"
            ".map(e => e.textContent)"
        )
        return sum(int(c) for c in cells)

    wait_for(lambda: succeeded() >= 5, 10, what="5 succeeded in the throughput table")
    daemons = text(page, "#daemons")
    assert "0/2" in daemons and "high, normal, low" in daemons
    # A producer that sets enqueued_at (r.lpush bypasses the daemon: none serves "bulk").
    r.lpush("prioqd:queue:bulk", json.dumps({"task": "square", "enqueued_at": time.time() - 125}))
    wait_for(
        lambda: "unserved" in text(page, "#queues") and "2m0" in text(page, "#queues"),
        10,
        what="the bulk queue, unserved, oldest 2m0xs",
    )


def throughput_table(body: str) -> dict[str, int]:
    """The overview's throughput table summed over its minutes, by column."""
    table = re.search(r'<table id="throughput">.*?</table>', body, re.S)
    assert table, "no throughput table"
    totals = dict.fromkeys(("succeeded", "failed", "dead", "cancelled"), 0)
    rows = re.findall(r"<tr><td class=\"mono\">\d\d:\d\d</td>(.*?)</tr>", table.group(0), re.S)
    assert len(rows) == 10, rows  # the last ten minutes
    for row in rows:
        cells = re.findall(r'<td class="num">(\d+)</td>', row)
        for column, cell in zip(totals, cells, strict=True):
            totals[column] += int(cell)
    return totals


def test_throughput_shows_outcomes_from_before_the_page_was_opened(
    r: redis.Redis, web: Web, daemon: Daemon, config: Config
) -> None:
    """The daemons count outcomes in Redis as they record them: a dashboard started
    afterwards shows them at its first view."""
    cfg = config(jobs={"max_retries": 1, "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.1})
    daemon(cfg)
    push(r, "high", *({"id": f"t{i}", "task": "square", "args": [i]} for i in range(5)))
    push(r, "normal", {"id": "f", "task": "fail"}, {"id": "nope", "task": "nope"})
    wait_status(r, [*(f"t{i}" for i in range(5)), "nope"])
    wait_status(r, ["f"], ("dead",))
    r.lpush("prioqd:queue:bulk", json.dumps({"id": "c", "task": "square"}))  # nobody serves it
    assert prioqd("cancel", "--config", str(cfg), "c").returncode == 0
    w = web()
    status, body = Client(w.url).request("GET", "/")
    assert status == 200
    assert throughput_table(body) == {"succeeded": 5, "failed": 1, "dead": 2, "cancelled": 1}


# --- pause -----------------------------------------------------------------------------


def test_pause_and_resume_buttons_write_redis_and_tell_the_daemons(
    r: redis.Redis, web: Web, page: Any, control: list[dict[str, Any]]
) -> None:
    w = web()
    sign_in(page, w)
    page.get(w.url + "/")
    click(page, '#queues tr[data-priority="normal"] button.pause')
    wait_for(lambda: "paused normal" in flash(page), 10, what="the flash message")
    assert r.smembers("prioqd:paused") == {b"normal"}
    wait_for(lambda: {"op": "pause", "priorities": ["normal"]} in control, 5)
    assert "paused" in text(page, '#queues tr[data-priority="normal"]')
    click(page, '#queues tr[data-priority="normal"] button.resume')
    wait_for(lambda: "resumed normal" in flash(page), 10)
    assert r.smembers("prioqd:paused") == set()
    wait_for(lambda: {"op": "resume", "priorities": ["normal"]} in control, 5)


def test_a_paused_priority_is_not_claimed_until_resumed(
    r: redis.Redis, web: Web, page: Any, daemon: Daemon, config: Config
) -> None:
    w = web()
    daemon(config())
    sign_in(page, w)
    page.get(w.url + "/")
    click(page, '#queues tr[data-priority="normal"] button.pause')
    wait_for(lambda: "paused normal" in flash(page), 10)
    push(r, "normal", {"id": "held-back", "task": "square", "args": [3]})
    # Below the paused priority, pushed after: a daemon that claimed "held-back" would
    # have taken it first.
    push(r, "low", {"id": "goes", "task": "square", "args": [4]})
    wait_status(r, ["goes"])
    assert r.llen("prioqd:queue:normal") == 1 and job_hash(r, "held-back") == {}
    wait_for(lambda: depth(page, "normal") == "1", 10)
    click(page, '#queues tr[data-priority="normal"] button.resume')
    assert wait_status(r, ["held-back"])["held-back"]["status"] == "succeeded"


# --- cancel ----------------------------------------------------------------------------


def test_cancel_a_queued_job_from_its_page(r: redis.Redis, web: Web, page: Any) -> None:
    w = web()
    push(r, "low", *({"id": f"q{i}", "task": "square", "args": [i]} for i in range(3)))
    outcome: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(r.blpop(["prioqd:done:q1"], timeout=30)), daemon=True
    )
    waiter.start()
    sign_in(page, w)
    page.get(w.url + "/jobs/q1")
    assert text(page, "#where") == ("queued in low, position 1 from the head (of 3)")
    click(page, "button.cancel")
    wait_for(lambda: "cancelled" in flash(page), 10)
    assert text(page, "#where") == "ended: cancelled"
    waiter.join(10)
    assert outcome and json.loads(outcome[0][1])["status"] == "cancelled"
    assert job_hash(r, "q1")["status"] == "cancelled"
    assert [json.loads(x)["id"] for x in r.lrange("prioqd:queue:low", 0, -1)] == ["q2", "q0"]


def test_cancel_stops_a_running_job_within_a_second(
    r: redis.Redis,
    web: Web,
    page: Any,
    daemon: Daemon,
    config: Config,
    control: Heard,
) -> None:
    w = web()
    daemon(config(workers={"slots": 1}))
    push(r, "high", {"id": "long", "task": "nap", "args": [30000]})
    wait_status(r, ["long"], ("running",))
    worker = int(job_hash(r, "long")["worker_pid"])
    sign_in(page, w)
    page.get(w.url + "/running")
    row = text(page, 'tr[data-job="long"]')
    assert "nap" in row and "running" in row and "Cancel" in row
    click(page, 'tr[data-job="long"] a')  # to the job's page
    wait_for(lambda: text(page, "#where").startswith("running on daemon"), 10)
    click(page, "button.cancel")
    wait_for(lambda: worker_gone(worker), 10, 0.005, what="the worker killed and reaped")
    gone = time.monotonic()
    # Within a second of the note on the channel (0.5 s more for a loaded machine).
    (note_at,) = [at for m, at in zip(control, control.at, strict=True) if m["op"] == "cancel"]
    assert gone - note_at <= 1.5, gone - note_at
    wait_for(lambda: "cancelled (stopped by its daemon)" in flash(page), 10)
    assert job_hash(r, "long")["status"] == "cancelled"
    assert json.loads(r.lindex("prioqd:done:long", 0))["status"] == "cancelled"
    # Not retried, and its slot (the only one) is free again at once.
    assert r.zcard("prioqd:scheduled") == 0 and r.llen("prioqd:queue:high") == 0
    push(r, "high", {"id": "next", "task": "square", "args": [2]})
    wait_status(r, ["next"], timeout_s=5)
    # Asked through Redis (the daemon removes the mark once done) and the channel.
    assert r.zscore("prioqd:cancels", "long") is None
    assert {"op": "cancel", "ids": ["long"]} in control


# --- dead letters ----------------------------------------------------------------------


def _letter(job_id: str, **extra: Any) -> str:
    letter = {
        "reason": "RuntimeError: failed on purpose (attempt 1 of 1, no retries left)",
        "id": job_id,
        "task": "fail",
        "priority": "high",
        "payload": json.dumps({"id": job_id, "task": "fail"}),
        "attempts": 1,
        "traceback": 'Traceback (most recent call last):\n  File "x.py"\nRuntimeError: boom',
        "daemon": "d",
        "dead_at": time.time(),
    }
    letter.update(extra)
    return json.dumps(letter)


def test_requeue_one_then_all_then_purge(r: redis.Redis, web: Web, page: Any) -> None:
    w = web()
    big = json.dumps({"id": "big", "task": "square", "args": ["x" * 300]})
    r.set("prioqd:payload:abc", big)
    r.lpush(
        "prioqd:dead",
        json.dumps(
            {
                "reason": "payload is too large",
                "priority": "low",
                "payload_key": "prioqd:payload:abc",
                "bytes": len(big),
            }
        ),
        _letter("d1"),
        _letter("d2"),
    )
    sign_in(page, w)
    page.get(w.url + "/dead")
    assert text(page, "#dead-total") == "3"
    assert "RuntimeError: failed on purpose" in text(page, "li.letter")
    d1_key = hashlib.sha1(r.lindex("prioqd:dead", 1)).hexdigest()  # type: ignore[arg-type]
    assert "d1" in text(page, f'li.letter[data-key="{d1_key}"] .meta')
    click(page, f'li.letter[data-key="{d1_key}"] button.requeue')
    wait_for(lambda: "requeued 1 dead letter" in flash(page), 10)
    assert text(page, "#dead-total") == "2"
    assert r.lrange("prioqd:queue:high", 0, -1) == [
        json.dumps({"id": "d1", "task": "fail"}).encode()
    ]
    click(page, "#requeue-all")
    wait_for(lambda: "requeued 2 dead letter" in flash(page), 10)
    assert r.llen("prioqd:dead") == 0
    assert r.lrange("prioqd:queue:low", 0, -1) == [big.encode()]
    assert not r.exists("prioqd:payload:abc")

    r.lpush("prioqd:dead", _letter("d3"), _letter("d4"))
    page.get(w.url + "/dead")
    click(page, "#purge-link")
    wait_for(lambda: "Purge every dead letter?" in text(page, "main"), 10)
    assert r.llen("prioqd:dead") == 2  # asking is not purging
    click(page, "#confirm")
    click(page, "#purge")
    wait_for(lambda: "purged 2 dead letter" in flash(page), 10)
    assert r.llen("prioqd:dead") == 0


def test_a_real_dead_letter_is_requeued_and_runs_again(
    r: redis.Redis, web: Web, page: Any, daemon: Daemon, config: Config, tmp_path: Path
) -> None:
    w = web()
    daemon(config(jobs={"max_retries": 0}))
    counter = tmp_path / "flaky-count"
    push(r, "high", {"id": "fl", "task": "flaky", "args": [str(counter), 1]})
    assert wait_status(r, ["fl"])["fl"]["status"] == "dead"
    sign_in(page, w)
    page.get(w.url + "/dead")
    assert "flaky failure 1" in text(page, "li.letter")
    assert "ValueError: flaky failure 1" in content(page, "li.letter .traceback")
    click(page, "li.letter button.requeue")
    assert wait_status(r, ["fl"], ("succeeded",))["fl"]["result"] == "2"
    assert r.llen("prioqd:dead") == 0


# --- escaping --------------------------------------------------------------------------

EVIL = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"


def test_markup_in_payloads_and_tracebacks_renders_as_text(
    r: redis.Redis, web: Web, page: Any
) -> None:
    w = web()
    push(r, "low", {"id": "evil", "task": EVIL, "args": [EVIL], "kwargs": {"k": EVIL}})
    r.lpush("prioqd:dead", _letter("evil2", reason=EVIL, traceback=EVIL, task=EVIL))
    r.zadd("prioqd:scheduled", {f"low\nx/1\n{json.dumps({'id': 'evil3', 'task': EVIL})}": 1e13})
    for path in ("/jobs/evil", "/dead", "/scheduled", "/jobs/evil2"):
        page.get(w.url + path)
        assert EVIL in content(page, "main"), path
        # Nothing but the dashboard's own script and no injected image, even after a
        # live refresh has replaced the content.
        wait_for(lambda: "updated" in text(page, "#refreshed"), 10)
        assert page.execute_script("return document.scripts.length") == 1, path
        assert page.execute_script("return document.querySelectorAll('main img').length") == 0
        assert page.execute_script("return window.pwned === undefined") is True, path
        assert EVIL in content(page, "main"), path


def test_the_job_page_shows_the_journal_line_to_copy(r: redis.Redis, web: Web, page: Any) -> None:
    w = web()
    push(r, "low", {"id": "a;b$c", "task": "square", "args": [1]})
    page.get(w.url + "/jobs/a%3Bb%24c")
    assert text(page, "#journal") == "journalctl -u prioqd 'JOB_ID=a;b$c'"
    page.get(w.url + "/jobs/no-such-job")
    assert "unknown" in text(page, "#where")


# --- security --------------------------------------------------------------------------


def test_read_only_shows_no_action_and_refuses_posts(r: redis.Redis, web: Web, page: Any) -> None:
    w = web("--read-only")
    push(r, "low", {"id": "ro", "task": "square", "args": [1]})
    r.lpush("prioqd:dead", _letter("ro-dead"))
    r.zadd("prioqd:scheduled", {f"low\nx/1\n{json.dumps({'id': 'ro2', 'task': 'x'})}": 1e13})
    for path in ("/", "/running", "/jobs/ro", "/dead", "/scheduled", "/dead/purge", "/login"):
        page.get(w.url + path)
        posts = page.execute_script("return document.querySelectorAll('form[method=post]').length")
        assert posts == 0, path
        buttons = page.execute_script(
            "return [...document.querySelectorAll('button')].map(b => b.textContent)"
        )
        assert set(buttons) <= {"Find", "Copy"}, (path, buttons)
    assert "read-only" in content(page, "header")
    client = Client(w.url)
    client.request("GET", "/")  # the CSRF cookie; read-only pages have no token to copy
    token = "0" * 64
    for path, form in (("/pause", {"priority": "low"}), ("/cancel/ro", {}), ("/dead/purge",
                       {"confirm": "yes"}), ("/login", {"token": TOKEN})):  # fmt: skip
        status, body = client.request("POST", path, {"csrf": token, **form})
        assert status == 403 and "read-only" in body, path
    assert r.smembers("prioqd:paused") == set() and r.llen("prioqd:queue:low") == 1
    assert r.llen("prioqd:dead") == 1


def test_posts_without_csrf_or_auth_token_are_refused(r: redis.Redis, web: Web) -> None:
    w = web()
    client = Client(w.url)
    csrf = client.csrf()
    # Not signed in: the CSRF token alone is not enough.
    status, body = client.request("POST", "/pause", {"csrf": csrf, "priority": "low"})
    assert status == 403 and "sign in" in body
    # A wrong token signs nobody in.
    status, _ = client.request("POST", "/login", {"csrf": csrf, "token": "not-the-token-at-all"})
    assert status == 403
    assert client.sign_in() == 303
    # Signed in, but without the CSRF token, or with another browser's.
    status, body = client.request("POST", "/pause", {"priority": "low"})
    assert status == 403 and "CSRF" in body
    other = Client(w.url).csrf()
    status, _ = client.request("POST", "/pause", {"csrf": other, "priority": "low"})
    assert status == 403
    # A cookie-less POST (another site's form) is refused before anything else.
    status, _ = Client(w.url).request("POST", "/pause", {"csrf": csrf, "priority": "low"})
    assert status == 403
    assert r.smembers("prioqd:paused") == set()
    # And with both, it works: the refusals above were for the missing tokens.
    status, _ = client.request("POST", "/pause", {"csrf": csrf, "priority": "low"})
    assert status == 303 and r.smembers("prioqd:paused") == {b"low"}


def test_behind_a_proxy_links_carry_the_root_path(r: redis.Redis, web: Web) -> None:
    # The proxy strips /prioqd; the pages' links, redirects and cookies keep it.
    w = web(web={"root_path": "/prioqd"})
    client = Client(w.url)
    status, body = client.request("GET", "/login")
    assert status == 200
    assert 'href="/prioqd/dead"' in body and 'src="/prioqd/static/app.js"' in body
    assert 'action="/prioqd/login"' in body
    (cookie,) = list(client.jar)
    assert cookie.path == "/prioqd"
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', body).group(1)  # type: ignore[union-attr]
    # What the browser sends to /prioqd/... reaches the dashboard as /...
    jar = {cookie.name: str(cookie.value)}

    def post(path: str, form: dict[str, str]) -> tuple[str, str]:
        req = urllib.request.Request(
            w.url + path,
            data=urllib.parse.urlencode({"csrf": csrf, **form}).encode(),
            headers={"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())},
        )
        try:
            client.opener.open(req, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 303, exc.read()
            return exc.headers["location"], "\n".join(exc.headers.get_all("set-cookie") or [])
        raise AssertionError("expected a redirect")

    location, cookies = post("/login", {"token": TOKEN})
    assert location == "/prioqd/" and "Path=/prioqd" in cookies
    auth = re.search(r"prioqd_auth=([^;]+)", cookies)
    assert auth is not None
    jar["prioqd_auth"] = auth.group(1)
    location, _ = post("/pause", {"priority": "low"})
    assert location == "/prioqd/" and r.smembers("prioqd:paused") == {b"low"}


# --- the Host header (DNS rebinding) and odd job ids ---------------------------------------


def get_with_host(w: WebProcess, path: str, host: str, method: str = "GET") -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", w.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_a_host_header_not_allowed_is_refused(r: redis.Redis, web: Web) -> None:
    """Reading needs no sign-in: a page elsewhere whose name is rebound to this
    address would read every payload, unless foreign Host headers are refused."""
    push(r, "low", {"id": "secret", "task": "square", "args": ["payload-secret"]})
    w = web(web={"allowed_hosts": ["prioqd.example.com", "*.corp.example"]})
    for host in ("evil.example", f"evil.example:{w.port}", "127.0.0.1.evil.example", ""):
        for path in ("/", "/jobs/secret", "/healthz"):
            status, body = get_with_host(w, path, host)
            assert status == 400 and "payload-secret" not in body, (host, path, status)
        assert get_with_host(w, "/pause", host, "POST")[0] == 400
    for host in (f"127.0.0.1:{w.port}", f"localhost:{w.port}", "localhost",
                 "prioqd.example.com", "prioqd.example.com:443", "a.corp.example"):  # fmt: skip
        status, body = get_with_host(w, "/jobs/secret", host)
        assert status == 200 and "payload-secret" in body, (host, status)


def test_allowed_hosts_are_checked_at_start(config: Config) -> None:
    for bad in (["prioqd.*"], ["a b"], [""], ["host:8080"]):
        out = prioqd("web", "--config", str(config(web={"allowed_hosts": bad})), "--read-only")
        assert out.returncode == 2 and "web.allowed_hosts" in out.stderr, (bad, out.stderr)
        assert "Traceback" not in out.stderr


def test_jobs_with_the_ids_dot_and_dot_dot_have_pages_and_cancels_of_their_own(
    r: redis.Redis, web: Web
) -> None:
    """A path segment "." or ".." is resolved away by browsers (encoded or not):
    /jobs/.. would be /. Such ids go in the query."""
    for job_id in (".", ".."):
        job = {"id": job_id, "task": "square", "args": [1]}
        r.zadd("prioqd:scheduled", {f"high\nd/{job_id}\n{json.dumps(job)}": 4102444800000})
    w = web()
    client = Client(w.url)
    assert client.sign_in() == 303
    status, body = client.request("GET", "/scheduled")
    assert status == 200
    links = re.findall(r'href="(/jobs[^"]*)"', body)
    actions = re.findall(r'action="(/cancel[^"]*)"', body)
    assert sorted(links) == ["/jobs?id=.", "/jobs?id=.."]
    assert sorted(actions) == ["/cancel?id=.", "/cancel?id=.."]
    for href in links + actions:
        # Where a browser goes: the query survives the resolution of the path.
        resolved = urllib.parse.urlsplit(urllib.parse.urljoin(w.url + "/scheduled", href))
        assert resolved.path in ("/jobs", "/cancel") and resolved.query.startswith("id=.")
    status, body = client.request("GET", "/jobs?id=..")
    assert status == 200 and "scheduled" in body and 'action="/cancel?id=.."' in body
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', body).group(1)  # type: ignore[union-attr]
    status, _ = client.request("POST", "/cancel?id=..", {"csrf": csrf})
    assert status == 303
    assert job_hash(r, "..")["status"] == "cancelled" and not job_hash(r, ".")
    assert r.zcard("prioqd:scheduled") == 1


def test_a_refresh_reads_a_bounded_part_of_a_large_redis(r: redis.Redis, web: Web) -> None:
    """A job page left open on an id deep in a backlog, or nowhere, must not read the
    whole backlog at every refresh; nor the overview SCAN the keyspace each time."""
    w = web()
    n = 25_000
    with r.pipeline(transaction=False) as pipe:
        for start in range(0, n, 5_000):
            pipe.lpush(
                "prioqd:queue:normal",
                *(
                    json.dumps({"id": f"q{i}", "task": "square"})
                    for i in range(start, start + 5_000)
                ),
            )
        pipe.execute()
    client = Client(w.url)

    def calls(command: str) -> int:
        stats = r.info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("calls", 0))

    r.config_resetstat()
    status, body = client.request("GET", "/jobs/nowhere")
    assert status == 404 and 'id="search-cut"' in body, body
    assert "prioqd inspect nowhere" in body
    # 1,000 entries a read: ten of the queue, one of the (empty) dead letters.
    assert calls("lrange") <= 11, calls("lrange")
    status, body = client.request("GET", "/jobs/q500")
    assert status == 200 and "queued" in body and 'id="search-cut"' not in body
    # Past the bound the page does not find it (a cancel is offered all the same: it
    # searches to the end); the CLI searches to the end.
    assert client.sign_in() == 303
    status, body = client.request("GET", "/jobs/q15000")
    assert status == 404 and 'id="search-cut"' in body and "Cancel this job" in body
    assert "not found: no job hash" in body
    # Three job pages and three overviews: one SCAN (queue names are looked for every
    # 30 s; their depths are read each time).
    for _ in range(3):
        assert client.request("GET", "/")[0] == 200
    assert calls("scan") == 1, calls("scan")
    out = prioqd("inspect", "q15000", "--json", "--config", str(w.config))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["where"]["position"] == 15_000


# --- Redis unreachable, signing out, the job search (plain HTTP) ---------------------------


def redirect(client: Client, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
    """GET ``path`` (POST ``form`` if given): its status and where it sends the browser
    (the Location header; the client follows no redirect)."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with client.opener.open(client.base + path, data=data, timeout=30) as resp:
            return int(resp.status), ""
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.headers.get("location", ""))


def test_redis_unreachable_gives_a_503_page_and_the_dashboard_serves_again_after(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)  # the job outlives a restart
    server.start()
    w = None
    try:
        with server.client() as r:
            push(r, "low", {"id": "kept", "task": "square", "args": [2]})
        cfg = write_config(tmp_path / "web.toml", server.url)
        w = WebProcess(cfg, tmp_path / "web", "--read-only")
        client = Client(w.url)
        assert client.request("GET", "/")[0] == 200
        server.stop()
        for path in ("/", "/jobs/kept", "/running", "/dead", "/healthz"):
            status, body = client.request("GET", path)
            assert status == 503, (path, status, body)
            # A page that says what is wrong, not a traceback or an empty 500.
            assert "<h2>503</h2>" in body, (path, body)
            message = re.search(r'<p class="error" id="error">([^<]*)</p>', body)
            assert message and message.group(1).startswith("Redis: "), (path, body)
            assert "ConnectionError" in message.group(1), (path, message.group(1))
        assert w.proc.poll() is None, w.log()  # still serving
        server.start()  # the same port
        status, body = client.request("GET", "/jobs/kept")
        assert status == 200 and "queued" in body, body
        assert client.request("GET", "/")[0] == 200
        assert "Traceback" not in w.log()
    finally:
        if w is not None:
            w.stop()
        server.stop()


def test_signing_out_refuses_the_next_action_as_for_anyone_signed_out(
    r: redis.Redis, web: Web
) -> None:
    w = web()
    client = Client(w.url)
    assert client.sign_in() == 303
    status, body = client.request("GET", "/")
    assert status == 200 and "Sign out" in body
    csrf = client.csrf("/")
    status, _ = client.request("POST", "/pause", {"csrf": csrf, "priority": "low"})
    assert status == 303 and r.smembers("prioqd:paused") == {b"low"}
    # Another site's form cannot sign anyone out: the CSRF token is checked.
    status, body = client.request("POST", "/logout", {})
    assert status == 403 and "CSRF" in body
    assert "Sign out" in client.request("GET", "/")[1]

    assert redirect(client, "/logout", {"csrf": csrf}) == (303, "/")
    assert not [c for c in client.jar if c.name == "prioqd_auth"]  # cookie removed
    status, body = client.request("GET", "/")
    assert status == 200 and "signed out" in body
    assert "Sign out" not in body and 'href="/login">Sign in</a>' in body
    status, body = client.request("POST", "/pause", {"csrf": csrf, "priority": "normal"})
    assert status == 403 and "sign in with the dashboard token first" in body
    status, body = client.request("POST", "/pause", {"csrf": csrf, "priority": "low",
                                                     "action": "resume"})  # fmt: skip
    assert status == 403
    assert r.smembers("prioqd:paused") == {b"low"}  # neither action was done


def test_the_job_search_goes_to_the_jobs_page_and_refuses_what_is_not_an_id(
    r: redis.Redis, web: Web
) -> None:
    push(r, "low", {"id": "find-me", "task": "square", "args": [3]})
    push(r, "low", {"id": "a/b?c", "task": "square", "args": [4]})
    w = web()
    client = Client(w.url)
    # What the header's Find form sends (spaces around a pasted id are dropped).
    for query, page_path in (
        ("id=find-me", "/jobs/find-me"),
        ("id=%20find-me%20", "/jobs/find-me"),
        ("id=a%2Fb%3Fc", "/jobs/a%2Fb%3Fc"),
    ):
        assert redirect(client, f"/jobs?{query}") == (303, page_path), query
        status, body = client.request("GET", page_path)
        assert status == 200 and "queued" in body, (page_path, body)
    assert ">find-me<" in client.request("GET", "/jobs/find-me")[1]
    # Not an id: back to the overview, which says so.
    for query in ("id=has%20space", "id=", "id=%20%20", "id=" + "x" * 300, ""):
        assert redirect(client, f"/jobs?{query}") == (303, "/"), query
        status, body = client.request("GET", "/")
        assert status == 200 and '<p class="flash" role="status">not a job id</p>' in body
