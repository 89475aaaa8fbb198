"""The producer of the peers benchmark, run in the system's own venv:

    python peer_driver.py SYSTEM REDIS_URL

It imports ``peer_SYSTEM`` and serves JSON commands, one a line, on stdin:

    {"op": "enqueue", "kind": "trivial"|"burn", "prio": "high"|"normal"|"low",
     "prefix": "w1-", "n": 5000, "iters": 0, "pace_s": null|0|0.01}
    {"op": "quit"}

For ``enqueue`` it pushes jobs ``prefix-0`` .. ``prefix-{n-1}`` with the system's own
client API, one call per job, and answers ``{"times": [...]}``: ``time.time()`` taken
just before each job's call. ``pace_s``: null - as fast as it goes; 0 - the same (a
burst); > 0 - job k at start + k * pace_s.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time


def wait_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.05) if left > 0.002 else 0)


def main() -> int:
    system, url = sys.argv[1], sys.argv[2]
    os.environ["PEERBENCH_REDIS_URL"] = url
    producer = importlib.import_module(f"peer_{system}").Producer(url)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        kind, prio, prefix, iters = cmd["kind"], cmd["prio"], cmd["prefix"], cmd["iters"]
        pace = cmd.get("pace_s") or 0.0
        times: list[float] = []
        start = time.time()
        for k in range(cmd["n"]):
            if pace:
                wait_until(start + k * pace)
            times.append(time.time())
            producer.enqueue(kind, prio, f"{prefix}-{k}", iters)
        print(json.dumps({"times": times}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
