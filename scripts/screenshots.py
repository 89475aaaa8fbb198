"""Screenshots of the dashboard for the README (docs/img/*.png): `make screenshots`.

A throwaway redis-server, a daemon and `prioqd web`, all on free loopback ports; a
mix of jobs (a backlog, running jobs, retries, dead letters, a paused priority);
headless Chromium takes the pictures. Everything started here is stopped here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import DaemonProcess, RedisServer, push, wait_status, write_config  # noqa: E402
from webhelpers import TOKEN, WebProcess, chromium  # noqa: E402

OUT = ROOT / "docs" / "img"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis")
        server.start()
        r = server.client()
        token = work / "token"
        token.write_text(TOKEN)
        cfg = write_config(
            work / "prioqd.toml",
            server.url,
            workers={"slots": 3},
            jobs={"max_retries": 1, "retry_backoff_s": 60},
            log={"level": "info", "format": "json"},
            web={"token_file": str(token), "refresh_s": 5.0},
        )
        daemon = DaemonProcess(cfg, work / "logs")
        web = None
        try:
            daemon.start()
            web = WebProcess(cfg, work / "web")
            with chromium() as page:
                page.set_window_size(1100, 760)
                page.get(web.url + "/")  # the throughput counter starts with a view
                push(r, "high", *({"task": "square", "args": [i]} for i in range(40)))
                push(
                    r,
                    "normal",
                    {"id": "a1b2c3", "task": "fail", "args": ["<b>boom</b>"], "max_retries": 0},
                )
                push(r, "normal", {"id": "retry-me", "task": "fail", "args": ["flaky API"]})
                push(r, "high", *({"task": "nap", "args": [600000]} for _ in range(2)))
                push(
                    r, "low",
                    {"id": "report-2025-06", "task": "nap", "args": [600000],
                     "kwargs": {"tag": "monthly report"}, "enqueued_at": time.time() - 42},
                )  # fmt: skip
                wait_status(r, ["report-2025-06"], ("running",))
                push(r, "low", *({"task": "square", "args": [i], "enqueued_at": time.time() - 300}
                                 for i in range(25)))  # fmt: skip
                r.sadd("prioqd:paused", "normal")
                push(r, "normal", *({"task": "square", "args": [i]} for i in range(7)))
                time.sleep(2.5)
                page.get(web.url + "/login")
                page.find_element("id", "token").send_keys(TOKEN)
                page.find_element("id", "sign-in").click()
                time.sleep(1.5)
                page.get(web.url + "/")
                time.sleep(1.5)
                page.save_screenshot(str(OUT / "overview.png"))
                page.get(web.url + "/jobs/report-2025-06")
                time.sleep(1.0)
                page.save_screenshot(str(OUT / "job.png"))
                page.get(web.url + "/dead")
                page.execute_script(
                    "document.querySelectorAll('details').forEach(d => d.open = true)"
                )
                time.sleep(0.3)
                page.save_screenshot(str(OUT / "dead-letters.png"))
        finally:
            if web is not None:
                web.stop()
            daemon.cleanup()
            r.close()
            server.stop()
    print("\n".join(str(p.relative_to(ROOT)) for p in sorted(OUT.glob("*.png"))))
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
