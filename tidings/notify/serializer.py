"""Serializers turn application objects into JSON-able data and back, as in oslo.messaging."""

from __future__ import annotations

import abc
import json
from typing import Any

__all__ = ["JsonPayloadSerializer", "NoOpSerializer", "Serializer"]


class Serializer(abc.ABC):
    """Hooks applied to payloads and contexts on the way out and on the way in."""

    @abc.abstractmethod
    def serialize_entity(self, ctxt: Any, entity: Any) -> Any: ...

    @abc.abstractmethod
    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any: ...

    @abc.abstractmethod
    def serialize_context(self, ctxt: Any) -> dict[str, Any]: ...

    @abc.abstractmethod
    def deserialize_context(self, ctxt: dict[str, Any]) -> Any: ...


class NoOpSerializer(Serializer):
    """Pass everything through; a context object is turned into a dict via ``to_dict()``."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def serialize_context(self, ctxt: Any) -> dict[str, Any]:
        if ctxt is None:
            return {}
        if isinstance(ctxt, dict):
            return ctxt
        to_dict = getattr(ctxt, "to_dict", None)
        if callable(to_dict):
            return dict(to_dict())
        raise TypeError(f"cannot send a context of type {type(ctxt).__name__}: pass a dict, an "
                        f"object with to_dict(), or a serializer that converts it")

    def deserialize_context(self, ctxt: dict[str, Any]) -> Any:
        return ctxt


class JsonPayloadSerializer(NoOpSerializer):
    """Make payloads JSON-safe on the way out (datetimes and other objects become strings)."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return json.loads(json.dumps(entity, default=str))
