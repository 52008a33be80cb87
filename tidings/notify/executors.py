"""Executors: how a listener runs its endpoints (oslo.messaging's names).

``threading`` (the default) runs endpoints on a bounded pool of worker threads, up to
``executor_thread_pool_size`` (64, oslo.messaging's default) at once, so endpoints that wait on
I/O (a database write, an HTTP call) overlap instead of queueing behind each other. Each message
is settled right after its own endpoints return, and never more than the listener's prefetch are
in flight. ``blocking`` runs them one at a time, in arrival order, on the listener's own thread,
for endpoints that need order or are not thread-safe.
"""

from __future__ import annotations

__all__ = ["DEFAULT_POOL_SIZE", "EXECUTORS", "check_executor", "workers_for"]

EXECUTORS = ("threading", "blocking")
DEFAULT_POOL_SIZE = 64


def check_executor(name: str | None) -> str:
    """The executor's name (None means ``threading``, as in oslo.messaging), or a ValueError
    that says which ones exist."""
    if name is None:
        return "threading"
    if name not in EXECUTORS:
        hint = (" (eventlet is not supported: tidings runs endpoints on threads; use "
                "'threading')" if name == "eventlet" else "")
        raise ValueError(f"unknown executor {name!r}{hint}; choose one of "
                         f"{', '.join(EXECUTORS)}")
    return name


def workers_for(executor: str | None, pool_size: int) -> int:
    """How many worker threads a listener gets: 0 for ``blocking`` (inline)."""
    if check_executor(executor) == "blocking":
        return 0
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"executor_thread_pool_size={pool_size!r} must be a positive integer")
    return pool_size
