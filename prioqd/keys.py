"""Every Redis key and channel name prioqd uses, in one place.

The Lua script (``lua/prioqd.lua``) builds the same names from the prefix; its
header documents the layout and must change together with this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def queue(self, priority: str) -> str:
        """LIST a producer LPUSHes JSON jobs onto; daemons take from the right end."""
        return f"{self.prefix}:queue:{priority}"

    @property
    def queue_pattern(self) -> str:
        """SCAN pattern of every queue, served or not."""
        return f"{self.prefix}:queue:*"

    def priority_of(self, queue_key: str) -> str:
        return queue_key[len(self.prefix) + len(":queue:") :]

    def landing(self, daemon_id: str, priority: str) -> str:
        """LIST where a daemon's blocking BLMOVE puts a payload until its next cycle."""
        return f"{self.prefix}:landing:{daemon_id}:{priority}"

    def inflight(self, daemon_id: str) -> str:
        """HASH claim number -> "<priority>\\n<state>\\n<recoveries>\\n<payload>"."""
        return f"{self.prefix}:inflight:{daemon_id}"

    def daemon(self, daemon_id: str) -> str:
        """HASH describing a live daemon (host, pid, slots, priorities...)."""
        return f"{self.prefix}:daemon:{daemon_id}"

    @property
    def daemons(self) -> str:
        """ZSET daemon id -> lease expiry in ms (Redis clock)."""
        return f"{self.prefix}:daemons"

    def job(self, job_id: str) -> str:
        """HASH with a job's status and outcome, expiring after result_ttl_s."""
        return f"{self.prefix}:job:{job_id}"

    def done(self, job_id: str) -> str:
        """LIST holding a finished job's outcome JSON, for ``BLPOP`` by producers."""
        return f"{self.prefix}:done:{job_id}"

    @property
    def dead(self) -> str:
        """LIST of dead letters (JSON with the original payload and the reason)."""
        return f"{self.prefix}:dead"

    @property
    def scheduled(self) -> str:
        """ZSET "<priority>\\n<unique>\\n<job json>" -> due time in ms: retries, delays."""
        return f"{self.prefix}:scheduled"

    @property
    def events(self) -> str:
        """Pub/sub channel on which every attempt's outcome is published."""
        return f"{self.prefix}:events"

    @property
    def control(self) -> str:
        """Pub/sub channel: operators' notes to the daemons ("look at the state now")."""
        return f"{self.prefix}:control"

    @property
    def paused(self) -> str:
        """SET of priorities no daemon claims from."""
        return f"{self.prefix}:paused"

    @property
    def cancels(self) -> str:
        """ZSET job id -> expiry ms: cancels asked for jobs held by a daemon."""
        return f"{self.prefix}:cancels"

    @property
    def periodic(self) -> str:
        """HASH schedule name -> the last tick (ms) handled for it (enqueued, or only
        recorded); ``<name>:enqueued`` -> the last tick (ms) actually enqueued."""
        return f"{self.prefix}:periodic"

    def throughput(self, minute: int) -> str:
        """HASH status -> outcomes published in Unix minute ``minute`` (Redis clock);
        written by the script call that publishes them, expiring after an hour."""
        return f"{self.prefix}:throughput:{minute}"

    def unique(self, job_id: str) -> str:
        """STRING: the lock of a unique job ("q" queued, "<daemon>/<claim>" running)."""
        return f"{self.prefix}:unique:{job_id}"
