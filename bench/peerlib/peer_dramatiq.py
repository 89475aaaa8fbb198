"""Dramatiq's side of the peers benchmark, as its docs set up priorities on Redis.

Dramatiq's priority is an actor's (``priority``, lower runs first) and orders only a
worker's in-process work queue; the Redis broker itself is FIFO per queue. So, as
Dramatiq users do, each priority has its own queue (``high``, ``normal``, ``low``)
and its own actors, and the workers consume all three: a high message is fetched
by the ``high`` queue's consumer and overtakes the low messages prefetched locally.
Broker: ``RedisBroker`` with its default middleware, URL from the environment.
"""

from __future__ import annotations

import os

import dramatiq
import peerbench_common as common
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["PEERBENCH_REDIS_URL"])
dramatiq.set_broker(broker)

#: Actor priority per level: lower numbers run first.
PRIORITY = {"high": 0, "normal": 50, "low": 100}
ACTORS = {
    (kind, prio): dramatiq.actor(fn, actor_name=f"{kind}_{prio}", queue_name=prio, priority=level)
    for kind, fn in (("trivial", common.trivial), ("burn", common.burn))
    for prio, level in PRIORITY.items()
}


class Producer:
    def __init__(self, url: str) -> None:
        pass

    def enqueue(self, kind: str, prio: str, job_id: str, iters: int) -> None:
        actor = ACTORS[(kind, prio)]
        if kind == "trivial":
            actor.send(job_id)
        else:
            actor.send(job_id, iters)
