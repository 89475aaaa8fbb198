"""The ``@task`` decorator and the table of tasks it fills.

Kept free of heavy imports: worker processes import it (through ``prioqd``) before
anything else, and their start-up time is every respawn's latency.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from prioqd.errors import TaskRegistryError

F = TypeVar("F", bound=Callable[..., Any])

_TASKS: dict[str, Callable[..., Any]] = {}


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def _register(fn: F, name: str | None) -> F:
    task_name = name or fn.__name__
    if not isinstance(task_name, str) or not task_name:
        raise TaskRegistryError(f"task name must be a non-empty string, got {task_name!r}")
    existing = _TASKS.get(task_name)
    if existing is not None and _where(existing) != _where(fn):
        raise TaskRegistryError(
            f"task name {task_name!r} is defined twice: by {_where(existing)} and by {_where(fn)}"
        )
    _TASKS[task_name] = fn
    return fn


@overload
def task(fn: F, /) -> F: ...
@overload
def task(*, name: str | None = None) -> Callable[[F], F]: ...


def task(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Register a function as a prioqd task: ``@task`` or ``@task(name="...")``.

    The job JSON's ``task`` field names it; by default the function's own name.
    """
    if fn is not None:
        return _register(fn, None)

    def decorate(f: F) -> F:
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
