"""Executors: how a listener runs its endpoints.

``threading`` (the default, and the only executor oslo.messaging still recommends) runs the
listener's poll loop in its own thread and calls endpoints there, one message at a time, in
arrival order. To handle more in parallel, start more listeners in the same group or pool: the
broker spreads the messages, and prefetch keeps each one's memory bounded.
"""

from __future__ import annotations

__all__ = ["EXECUTORS", "check_executor"]

EXECUTORS = ("threading",)


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        hint = " (eventlet is not supported; use threading)" if name == "eventlet" else ""
        raise ValueError(f"unknown executor {name!r}{hint}; choose one of "
                         f"{', '.join(EXECUTORS)}")
    return name
