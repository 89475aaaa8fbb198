"""The ops of the Lua ``cycle`` command, one frozen dataclass per op.

Each class's ``args`` is the one place on the Python side that knows its argument
layout; the comment above the op's function in ``lua/prioqd.lua`` is the other. An
op also carries what the daemon needs once its result is back (the job, the run),
so results are matched to ops by type, not by tagged tuples.

Result codes shared by every op that names a claim (see the Lua header): >= 0 it
applied (or had applied before), ``LOST`` the claim was recovered by another
daemon, ``FAILED`` a key had the wrong type and the job went to the dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from prioqd.jobs import Ending, Job, Rejected, RunResult

LOST = -1
FAILED = -2
#: The job could not even be dead-lettered (the dead-letter key has the wrong type).
STUCK = -3
#: ``Finish`` only: the job has run before; record its start, then its end.
NOT_FIRST = -4
#: ``Adopt`` only: a repeat of an Adopt that applied, whose claim was settled since.
ADOPTED_BEFORE = 0

Arg = str | bytes


def _flat(fields: Mapping[str, str]) -> list[Arg]:
    out: list[Arg] = [str(2 * len(fields))]
    for k, v in fields.items():
        out += (k, v)
    return out


def _list(items: Sequence[Arg]) -> list[Arg]:
    return [str(len(items)), *items]


def _flags(job: Job, run: RunResult) -> str:
    """What the script must settle when the job ends: "u" a unique job's lock, "c" a
    cancel asked for it."""
    return ("u" if job.unique else "") + ("c" if run.status == "cancelled" else "")


@dataclass(frozen=True, slots=True)
class Adopt:
    """A payload the blocking wait put in our landing list becomes claim ``claim``.

    The result is the attempt number; ``ADOPTED_BEFORE`` for a repeat of an Adopt
    that applied and whose claim was settled since; ``LOST`` if the payload is no
    longer there (recovered by another daemon)."""

    job_raw: bytes
    priority: str
    claim: int

    def args(self) -> list[Arg]:
        return ["adopt", self.priority, str(self.claim), self.job_raw]


@dataclass(frozen=True, slots=True)
class Drop:
    """A landed payload goes to the dead letters by reference: one over
    max_payload_bytes (any of ``nbytes`` will do), or one whose Adopt Redis refuses
    (``sha1`` names it)."""

    priority: str
    nbytes: int
    reason: str
    sha1: str = ""

    def args(self) -> list[Arg]:
        return ["drop", self.priority, str(self.nbytes), self.reason, self.sha1]


@dataclass(frozen=True, slots=True)
class Progress:
    """A running job's progress (JSON) -> its job hash."""

    job: Job
    value: str
    ttl_s: int

    def args(self) -> list[Arg]:
        job = self.job
        return ["progress", str(job.claim), job.id, self.value, str(self.ttl_s)]


@dataclass(frozen=True, slots=True)
class Lock:
    """A unique job takes its lock before it runs; 0 if a live run of its id holds
    it (the claim is then dropped as a duplicate)."""

    job: Job
    ttl_s: int

    def args(self) -> list[Arg]:
        return ["lock", str(self.job.claim), self.job.id, str(self.ttl_s)]


@dataclass(frozen=True, slots=True)
class Start:
    """Claim -> running; the result is the attempt number."""

    job: Job
    ttl_s: int
    fields: Mapping[str, str]

    def args(self) -> list[Arg]:
        job = self.job
        pinned = job.json if job.rewritten else ""
        return ["start", str(job.claim), pinned, job.id, str(self.ttl_s), *_flat(self.fields)]


@dataclass(frozen=True, slots=True)
class Finish:
    """Claim -> succeeded in one step (the start was never written)."""

    job: Job
    run: RunResult
    ttl_s: int
    outcome: str
    fields: Mapping[str, str]

    def args(self) -> list[Arg]:
        job = self.job
        return [
            "finish",
            str(job.claim),
            job.id,
            str(self.ttl_s),
            _flags(job, self.run),
            str(job.attempt),
            self.outcome,
            *_flat(self.fields),
        ]


@dataclass(frozen=True, slots=True)
class End:
    """A started run ended: succeeded, failed (scheduled for a retry) or dead."""

    job: Job
    run: RunResult
    ending: Ending
    ttl_s: int
    outcome: str
    fields: Mapping[str, str]
    dels: Sequence[str] = ()
    dead_letter: str = ""
    #: Schedule member and due time (Redis clock, ms) of a retry.
    member: str = ""
    due_ms: int = 0

    def args(self) -> list[Arg]:
        job = self.job
        done = "0" if self.member else "1"  # a retry: the done list waits for its end
        return [
            "end", str(job.claim), job.id, str(self.ttl_s), _flags(job, self.run), done,
            self.dead_letter, self.member, str(self.due_ms), self.outcome, *_list(self.dels),
            *_flat(self.fields),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Reject:
    """A claimed payload that can never run -> dead letters."""

    rejected: Rejected
    claim: int
    ttl_s: int
    outcome: str
    dead_letter: str
    fields: Mapping[str, str]

    def args(self) -> list[Arg]:
        rej = self.rejected
        return [
            "reject", str(self.claim), rej.id, str(self.ttl_s), self.outcome, self.dead_letter,
            *_flat(self.fields),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Schedule:
    """A claimed job that is not due yet -> the schedule."""

    job: Job
    ttl_s: int
    member: str
    due_ms: int
    fields: Mapping[str, str]

    def args(self) -> list[Arg]:
        job = self.job
        return [
            "schedule", str(job.claim), job.id, str(self.ttl_s), self.member, str(self.due_ms),
            *_flat(self.fields),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Release:
    """Claims that did not run go back to the head of their queues, uncharged, in
    order (``claims`` ascending); the result is how many were still held."""

    claims: Sequence[int]
    #: The parsed jobs among them, for the log.
    jobs: Sequence[Job] = ()
    #: Why, for the log: "not run", "spill", "race"...
    why: str = ""

    def args(self) -> list[Arg]:
        return ["release", *_list([str(c) for c in self.claims])]


@dataclass(frozen=True, slots=True)
class Bury:
    """A claim whose op Redis refuses goes to the dead letters with the reason."""

    claim: int
    reason: str
    job_id: str = ""

    def args(self) -> list[Arg]:
        return ["bury", str(self.claim), self.job_id, self.reason]


@dataclass(frozen=True, slots=True)
class Restore:
    """Claims lo..hi of a claim whose reply was lost go back to their queues."""

    lo: int
    hi: int

    def args(self) -> list[Arg]:
        return ["restore", str(self.lo), str(self.hi)]


@dataclass(frozen=True, slots=True)
class Unland:
    """Everything in our landing list of ``priority`` goes back to its queue's head."""

    priority: str
    why: str = field(default="", compare=False)

    def args(self) -> list[Arg]:
        return ["unland", self.priority]


Op = Union[  # noqa: UP007
    Adopt,
    Drop,
    Progress,
    Lock,
    Start,
    Finish,
    End,
    Reject,
    Schedule,
    Release,
    Bury,
    Restore,
    Unland,
]
