"""Slot tokens: a job is taken off Redis only while a token is held."""

from __future__ import annotations


class Slots:
    """``total`` tokens, one per worker process.

    Unlike ``asyncio.Semaphore`` it hands out several free tokens at once, can be
    resized on a reload, and can lend a token it does not have (``take_one``): a
    higher-priority job that lands while every token is out is taken at once and the
    debt is paid by the next token given back. ``release`` never raises: it runs in
    done-callbacks.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total  # below 0 while in debt

    @property
    def busy(self) -> int:
        return self.total - self.free

    def try_acquire(self, n: int) -> int:
        got = max(0, min(n, self.free))
        self.free -= got
        return got

    def take_one(self) -> None:
        self.free -= 1

    def release(self, n: int = 1) -> None:
        self.free += n

    def resize(self, total: int) -> None:
        self.free += total - self.total
        self.total = total


class BatchSlot:
    """The slot token one batch holds, given back exactly once.

    A batch of several gives it back halfway, so the next batch is claimed while the
    worker runs the rest (and then waits in the pool's queue, not the worker for
    Redis); a lone job when it ends, or earlier by a timer (see ``Dispatcher``).
    """

    __slots__ = ("_left", "_release_at", "_released", "_slots")

    def __init__(self, slots: Slots, jobs_in_batch: int) -> None:
        self._slots = slots
        self._left = jobs_in_batch
        self._release_at = jobs_in_batch // 2
        self._released = False

    def job_done(self) -> bool:
        """One of its jobs ended; True if that gave the token back."""
        self._left -= 1
        return self._left <= self._release_at and self.release()

    def release(self) -> bool:
        if self._released:
            return False
        self._released = True
        self._slots.release()
        return True
