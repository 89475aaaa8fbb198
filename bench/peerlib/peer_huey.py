"""Huey's side of the peers benchmark: ``PriorityRedisHuey`` (one Redis sorted set,
highest priority popped first), defaults otherwise; the priority is given per call
(``task(..., priority=N)``, higher runs first). Workers: ``huey_consumer
peer_huey.huey -k process -w 2``."""

from __future__ import annotations

import os

import peerbench_common as common
from huey import PriorityRedisHuey

huey = PriorityRedisHuey("peerbench", url=os.environ["PEERBENCH_REDIS_URL"])

#: Huey priority per level: higher numbers run first.
PRIORITY = {"high": 10, "normal": 5, "low": 0}
TASKS = {
    "trivial": huey.task(name="trivial")(common.trivial),
    "burn": huey.task(name="burn")(common.burn),
}


class Producer:
    def __init__(self, url: str) -> None:
        pass

    def enqueue(self, kind: str, prio: str, job_id: str, iters: int) -> None:
        if kind == "trivial":
            TASKS[kind](job_id, priority=PRIORITY[prio])
        else:
            TASKS[kind](job_id, iters, priority=PRIORITY[prio])
