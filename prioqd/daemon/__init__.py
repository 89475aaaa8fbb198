"""The daemon: claim jobs under slot tokens, run them in the pool, record outcomes.

``lifecycle.py`` wires the parts together; its docstring lists them. One job's walk
from claim to outcome reads top to bottom through ``cycle.py`` (the round trip),
``dispatch.py`` (parse, batch, run, record), ``prioqd/jobs.py`` (the records) and
``prioqd/pool.py`` (the worker processes).
"""

from prioqd.daemon.lifecycle import Daemon, serve

__all__ = ["Daemon", "serve"]
