"""RQ's side of the peers benchmark. RQ has no priority within a queue: as its docs
say, one queue per priority, and the workers are given them in order (``rq
worker-pool -n 2 high normal low``): a worker takes from ``high`` first. Jobs call the
shared bodies by reference; the default worker class (a forked work horse per job)."""

from __future__ import annotations

import peerbench_common as common
from redis import Redis
from rq import Queue


class Producer:
    def __init__(self, url: str) -> None:
        connection = Redis.from_url(url)
        self.queues = {p: Queue(p, connection=connection) for p in ("high", "normal", "low")}

    def enqueue(self, kind: str, prio: str, job_id: str, iters: int) -> None:
        if kind == "trivial":
            self.queues[prio].enqueue(common.trivial, job_id)
        else:
            self.queues[prio].enqueue(common.burn, job_id, iters)
