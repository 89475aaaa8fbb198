"""Registers a task name that prioqd.examples already uses: a start-up error."""

from prioqd import task


@task(name="square")
def another_square(x: int) -> int:
    return x * x
