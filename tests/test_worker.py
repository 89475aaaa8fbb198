"""The worker's Runner on its own: how a call's arguments and errors are told apart."""

from __future__ import annotations

import functools
from typing import Any

from prioqd.worker import Runner

CTX = ("j1", "normal", 1, 3, None, None, 60.0)


def plain(x: int) -> int:
    return x * x


async def plain_async(x: int) -> int:
    return x + 1


def raises_type_error_inside(x: int) -> int:
    raise TypeError("a bug in the task, not in the job")


calls: list[str] = []


def swallowing(fn: Any) -> Any:
    """A decorator a task author might write: it logs, and turns errors into None."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(fn.__name__)
        try:
            return fn(*args, **kwargs)
        except Exception:
            return None

    return wrapper


@swallowing
def wrapped(x: int) -> int:
    return x


def run(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, str, str]:
    _, status, result, error, *_ = Runner({"t": fn}).run(1, "t", list(args), kwargs, CTX)
    return status, result, error


def test_arguments_that_do_not_fit_a_plain_function_are_rejected() -> None:
    assert run(plain, 3) == ("ok", "9", "")
    status, _, error = run(plain, 1, 2)
    assert status == "rejected" and "task 't' rejected its arguments" in error
    status, _, error = run(plain_async, y=1)
    assert status == "rejected" and "missing a required argument: 'x'" in error
    assert run(plain_async, 1)[:2] == ("ok", "2")


def test_a_type_error_raised_inside_the_task_is_an_error_to_retry() -> None:
    status, _, error = run(raises_type_error_inside, 1)
    assert status == "error" and error == "TypeError: a bug in the task, not in the job"


def test_a_wrapped_task_is_checked_before_its_wrapper_runs() -> None:
    """Its signature is the inner function's: arguments that do not fit it are
    rejected without running the wrapper (which would have swallowed the error)."""
    calls.clear()
    status, _, error = run(wrapped, 1, 2)
    assert status == "rejected" and "too many positional arguments" in error
    assert calls == []
    assert run(wrapped, 5)[:2] == ("ok", "5") and calls == ["wrapped"]
