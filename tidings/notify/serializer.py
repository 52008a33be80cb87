"""Serializers turn application objects into JSON-able data and back, as in oslo.messaging.

The notifier calls ``serialize_entity(ctxt, payload)`` and ``serialize_context(ctxt)`` (with the
context already made safe to send, see tidings.notify.notifier); what ``serialize_context``
returns is packed into the message as a dict, or through its ``to_dict()``. Listeners call
``deserialize_context`` and ``deserialize_entity`` before endpoints see a notification.
"""

from __future__ import annotations

import abc
from typing import Any

from tidings.transports.envelope import to_primitive

__all__ = ["JsonPayloadSerializer", "NoOpSerializer", "Serializer"]


class Serializer(abc.ABC):
    """Hooks applied to payloads and contexts on the way out and on the way in."""

    @abc.abstractmethod
    def serialize_entity(self, ctxt: Any, entity: Any) -> Any: ...

    @abc.abstractmethod
    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any: ...

    @abc.abstractmethod
    def serialize_context(self, ctxt: Any) -> Any: ...

    @abc.abstractmethod
    def deserialize_context(self, ctxt: Any) -> Any: ...


class NoOpSerializer(Serializer):
    """Pass everything through (oslo.messaging's: a context object is packed through its
    ``to_dict()``)."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def serialize_context(self, ctxt: Any) -> Any:
        return ctxt

    def deserialize_context(self, ctxt: Any) -> Any:
        return ctxt


class JsonPayloadSerializer(NoOpSerializer):
    """Make payloads JSON-safe on the way out, with oslo.messaging's rules
    (``jsonutils.to_primitive(entity, convert_instances=True)``)."""

    @staticmethod
    def serialize_entity(context: Any, entity: Any) -> Any:
        return to_primitive(entity, convert_instances=True)
