"""Screening AMQP 0-9-1 deliveries before py-amqp parses them, so that one delivery costs only
itself (used by ``rabbit://`` receivers; py-amqp is also what ``amqp://`` declares with).

py-amqp decodes a delivery's properties inside its frame parser: a message_id that is not UTF-8
(sent with another client) raises there, the connection is lost, and the broker delivers the
same message again, forever. And it joins a body of any size before anyone can look at it. The
screen sees every content header first: a body over ``limit`` (the header announces its size)
is dropped frame by frame as it arrives, never joined, and properties py-amqp cannot decode no
longer escape. Either way py-amqp gets a header without a body (and without properties if they
cannot be decoded), so its frame state stays consistent and the delivery still reaches the
consumer's callback, which finds the reason in :attr:`DeliveryScreen.problem` and hands the
delivery to the core with it: the core rejects it (dead-lettered where configured) and logs its
id, on the same connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

__all__ = ["DeliveryScreen", "raw_message_id"]

_BODY_SIZE = struct.Struct(">Q")  # a content header: class (2), weight (2), body size (8), ...
_EMPTY_HEADER = struct.pack(">HHQH", 60, 0, 0, 0)  # basic class, no body, no properties


class DeliveryScreen:
    """Reads frames with ``read_frame`` and dispatches them to a new frame handler of ``conn``
    (see the module docstring); :meth:`read_frame` replaces the connection's own."""

    def __init__(self, conn: Any, read_frame: Callable[[], tuple[int, int, Any]],
                 limit: int, describe: Callable[[BaseException], str] = repr) -> None:
        self.problem: str | None = None  # why the delivery being dispatched is refused
        self.raw_id: str | None = None  # its message_id, when py-amqp could not decode it
        self._conn = conn
        self._read = read_frame
        self._limit = limit
        self._describe = describe
        self._skip: dict[int, int] = {}  # channel -> body bytes still to drop
        self._dispatching = False
        on_method = conn.on_inbound_method

        def dispatch(channel: int, method: Any, args: Any, content: Any) -> Any:
            self._dispatching = True  # from here on a failure is not the header's
            return on_method(channel, method, args, content)

        self.on_frame = conn.on_inbound_frame = conn.frame_handler_cls(conn, dispatch)

    def read_frame(self) -> None:
        frame = self._read()
        kind, channel, payload = frame
        if kind == 3 and channel in self._skip:  # the rest of a refused body: dropped
            self._conn.bytes_recv += 1
            left = self._skip[channel] - len(payload)
            if left > 0:
                self._skip[channel] = left
            else:
                del self._skip[channel]
            return
        if kind != 2:
            self.on_frame(frame)
            return
        size = _BODY_SIZE.unpack_from(payload, 4)[0] if len(payload) >= 12 else 0
        if size > self._limit:
            self.problem = (f"its body of {size} bytes is over max_message_size="
                            f"{self._limit}; dropped unread")
            self._skip[channel] = size
            payload = payload[:4] + bytes(8) + payload[12:]  # no body for py-amqp
        self._dispatching = False
        try:
            self.on_frame((2, channel, payload))
        except Exception as exc:
            if self._dispatching:
                raise
            # py-amqp still waits for this delivery's header: give it one it can read.
            self.problem = f"its AMQP properties cannot be decoded: {self._describe(exc)}"
            self.raw_id = raw_message_id(payload)
            if size:
                self._skip[channel] = size
            self.on_frame((2, channel, _EMPTY_HEADER))
        finally:
            self.problem = self.raw_id = None


def raw_message_id(header: bytes) -> str | None:
    """The message_id property of a content header, read leniently (bytes that are not UTF-8
    escaped), or None; for logging a delivery whose properties py-amqp cannot decode."""
    try:
        flags = int.from_bytes(header[12:14], "big")
        pos = 14
        for bit in range(15, 6, -1):  # content_type .. message_id, in the order they are sent
            if not flags & (1 << bit):
                continue
            if bit == 13:  # application_headers: a table with a 4-byte length
                pos += 4 + int.from_bytes(header[pos:pos + 4], "big")
            elif bit in (12, 11):  # delivery_mode, priority: one octet
                pos += 1
            else:
                size = header[pos]
                if bit == 7:
                    return header[pos + 1:pos + 1 + size].decode("utf-8", "backslashreplace")
                pos += 1 + size
    except IndexError:
        pass
    return None
