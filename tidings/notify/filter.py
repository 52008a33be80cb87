"""NotificationFilter: let an endpoint see only the notifications it cares about.

Same meaning as oslo.messaging's: every given field is a regular expression matched (``re.match``,
anchored at the start) against a string; for ``context``, ``metadata`` and ``payload`` a dict of
key -> regex, where a missing key or a non-string value does not match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["NotificationFilter"]


class NotificationFilter:
    """Filter on publisher_id, event_type, context, metadata and payload by regex."""

    def __init__(self, context: Mapping[str, str] | None = None,
                 publisher_id: str | None = None, event_type: str | None = None,
                 metadata: Mapping[str, str] | None = None,
                 payload: Mapping[str, str] | None = None) -> None:
        self._publisher_id = self._compile("publisher_id", publisher_id)
        self._event_type = self._compile("event_type", event_type)
        self._context = self._compile_dict("context", context)
        self._metadata = self._compile_dict("metadata", metadata)
        self._payload = self._compile_dict("payload", payload)

    @staticmethod
    def _compile(what: str, pattern: str | None) -> re.Pattern[str] | None:
        if pattern is None:
            return None
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"NotificationFilter {what}={pattern!r} is not a valid regular "
                             f"expression: {exc}") from None

    @classmethod
    def _compile_dict(cls, what: str,
                      patterns: Mapping[str, str] | None) -> dict[str, re.Pattern[str]]:
        if patterns is None:
            return {}
        if not isinstance(patterns, Mapping):
            raise TypeError(f"NotificationFilter {what} must be a dict of key -> regex, "
                            f"not {type(patterns).__name__}")
        return {k: cls._compile(f"{what}[{k!r}]", v) for k, v in patterns.items()}  # type: ignore[misc]

    @staticmethod
    def _one(value: Any, regex: re.Pattern[str] | None) -> bool:
        return regex is None or (isinstance(value, str) and regex.match(value) is not None)

    @classmethod
    def _all(cls, data: Any, regexes: dict[str, re.Pattern[str]]) -> bool:
        if not regexes:
            return True
        if not isinstance(data, Mapping):
            return False
        return all(k in data and cls._one(data[k], r) for k, r in regexes.items())

    def match(self, context: Any, publisher_id: Any, event_type: Any, metadata: Any,
              payload: Any) -> bool:
        """True if every configured rule matches (oslo.messaging's argument order)."""
        return (self._one(publisher_id, self._publisher_id)
                and self._one(event_type, self._event_type)
                and self._all(context, self._context)
                and self._all(metadata, self._metadata)
                and self._all(payload, self._payload))
