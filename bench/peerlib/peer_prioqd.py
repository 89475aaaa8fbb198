"""prioqd's side of the peers benchmark: the shared bodies registered as prioqd tasks
(the daemon loads this module through ``[tasks] modules``), and the producer: one
LPUSH of the job JSON per job, as the README tells producers to do."""

from __future__ import annotations

import json

import peerbench_common as common

from prioqd import task

task(name="peer_trivial")(common.trivial)
task(name="peer_burn")(common.burn)


class Producer:
    def __init__(self, url: str) -> None:
        import redis  # here: the daemon's workers import this module too, and need no client

        self.client = redis.Redis.from_url(url)

    def enqueue(self, kind: str, prio: str, job_id: str, iters: int) -> None:
        if kind == "trivial":
            body = {"id": job_id, "task": "peer_trivial", "args": [job_id]}
        else:
            body = {"id": job_id, "task": "peer_burn", "args": [job_id, iters]}
        self.client.lpush(f"prioqd:queue:{prio}", json.dumps(body, separators=(",", ":")))
