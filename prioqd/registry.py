"""The ``@task`` decorator and the table of tasks it fills.

Kept free of heavy imports: worker processes import it (through ``prioqd``) before
anything else, and their start-up time is every respawn's latency.
"""

from __future__ import annotations

import functools
import importlib
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, overload

from prioqd.errors import TaskRegistryError

P = ParamSpec("P")
R = TypeVar("R")

_TASKS: dict[str, Callable[..., Any]] = {}


class Task(Generic[P, R]):
    """A function registered with ``@task``: still callable as the function itself,
    and carrying its task name and its signature (``P``, ``R``) for type checkers.

    ``Client.enqueue(square, 7)`` reads the name from here and lets mypy check the
    arguments against ``P``. Workers call the plain function (``fn``), not this.
    """

    def __init__(self, fn: Callable[P, R], name: str) -> None:
        self.fn = fn
        self.name = name
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<prioqd task {self.name!r}: {_where(self.fn)}>"


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def _register(fn: Callable[P, R], name: str | None) -> Task[P, R]:
    if isinstance(fn, Task):
        fn = fn.fn
    task_name = name or fn.__name__
    if not isinstance(task_name, str) or not task_name:
        raise TaskRegistryError(f"task name must be a non-empty string, got {task_name!r}")
    existing = _TASKS.get(task_name)
    if existing is not None and _where(existing) != _where(fn):
        raise TaskRegistryError(
            f"task name {task_name!r} is defined twice: by {_where(existing)} and by {_where(fn)}"
        )
    _TASKS[task_name] = fn
    return Task(fn, task_name)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(*, name: str | None = None) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Register a function as a prioqd task: ``@task`` or ``@task(name="...")``.

    The job JSON's ``task`` field names it; by default the function's own name. The
    result is a :class:`Task`: it calls the function as before, and producers pass it
    to ``Client.enqueue`` so that a type checker sees the arguments.
    """
    if fn is not None:
        return _register(fn, None)

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        return _register(f, name)

    return decorate


def load(modules: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """Import the task modules and return every registered task by name."""
    for module in modules:
        try:
            importlib.import_module(module)
        except TaskRegistryError:
            raise
        except BaseException as exc:
            last = traceback.format_exception_only(exc)[-1].strip()
            raise TaskRegistryError(f"cannot import task module {module!r}: {last}") from exc
    return dict(_TASKS)
