"""The frames a zmq sender (DEALER) and listener (ROUTER) exchange, and the member address format.

Every message is a single frame (pyzmq's multipart calls cost several times a single send).
Sender -> listener, one per copy of a notification::

    b"D" + seq (u64) + flags (u8) + listener id (16 bytes) + len(message id) (u16)
         + len(headers) (u32) + message id (UTF-8) + headers + body

``headers`` is a JSON object or empty; ``body`` is the encoded notification, untouched. The
listener id names the listener the copy is meant for: after a listener dies, another may bind the
same port, and it must refuse copies addressed to its predecessor rather than take messages of a
group it never joined.

Listener -> sender, any number of sequence numbers packed as big-endian u64::

    b"A" + seqs   done (acknowledged or rejected): forget these copies
    b"R" + seqs   requeued: send these copies to a member of the same group again
    b"N" + seqs   not mine (wrong listener id): that member is gone; send them elsewhere
    b"K"          keepalive: still alive and still holding your copies

Numbers are big-endian so that hosts of either byte order interoperate.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq
from zmq.utils import z85

__all__ = ["ACK", "DATA", "KEEPALIVE", "NOBLOCK", "NOT_MINE", "RCVMORE", "REQUEUE", "SNDMORE",
           "data_frame", "encode_headers", "format_member", "get_option", "new_listener_id",
           "pack_seqs", "parse_data", "parse_member", "recv_frame", "send_frame",
           "unpack_seqs"]

DATA, ACK, REQUEUE, NOT_MINE, KEEPALIVE = b"D", b"A", b"R", b"N", b"K"

FLAG_REDELIVERED = 1

_META = struct.Struct("!QB16sHI")
_META_SIZE = 1 + _META.size


def encode_headers(headers: Mapping[str, str]) -> bytes:
    return json.dumps(dict(headers), ensure_ascii=False).encode("utf-8") if headers else b""


def data_frame(seq: int, redelivered: bool, listener_id: bytes, message_id: bytes,
               headers: bytes, body: bytes) -> bytes:
    return b"".join((DATA, _META.pack(seq, FLAG_REDELIVERED if redelivered else 0, listener_id,
                                      len(message_id), len(headers)),
                     message_id, headers, body))


def parse_data(frame: bytes) -> tuple[int, bool, bytes, str, Any, bytes, str | None]:
    """(seq, redelivered, listener id, message id, headers, body, problem) of a data frame.

    Raises ValueError when the frame cannot even be identified (too short, not a data frame).
    One that can, but whose lengths, message id or headers are wrong (a rogue or broken
    peer), comes back with ``problem`` saying what, so it can still be settled.
    """
    if len(frame) < _META_SIZE or frame[:1] != DATA:
        raise ValueError(f"malformed data frame ({len(frame)} bytes)")
    seq, flags, lid, mid_len, headers_len = _META.unpack_from(frame, 1)
    start = _META_SIZE + mid_len
    end = start + headers_len
    redelivered = bool(flags & FLAG_REDELIVERED)
    try:
        if end > len(frame):
            raise ValueError(f"lengths past the end of its {len(frame)} bytes")
        message_id = frame[_META_SIZE:start].decode("utf-8")
        headers = json.loads(frame[start:end]) if headers_len else None
    except Exception as exc:  # bad UTF-8 or JSON, nesting too deep for the parser
        message_id = frame[_META_SIZE:start].decode("utf-8", "replace")
        return (seq, redelivered, lid, message_id, None, frame[end:],
                f"malformed data frame: {type(exc).__name__}: {exc}")
    return seq, redelivered, lid, message_id, headers, frame[end:], None


def pack_seqs(kind: bytes, seqs: Iterable[int]) -> bytes:
    seqs = list(seqs)
    return kind + struct.pack(f"!{len(seqs)}Q", *seqs)


def unpack_seqs(frame: bytes) -> tuple[bytes, tuple[int, ...]]:
    body = frame[1:]
    count = len(body) // 8
    return frame[:1], struct.unpack(f"!{count}Q", body[:count * 8])


def new_listener_id() -> bytes:
    return uuid.uuid4().bytes


def format_member(endpoint: str, listener_id: bytes, credit: int,
                  server_key: bytes | None = None) -> str:
    """The address a listener registers: its endpoint, its id, how many unacknowledged copies
    one sender may hand it (its prefetch) and, with CURVE, its public key (hex: Z85 has '/')."""
    key = "/" + z85.decode(server_key).hex() if server_key else ""
    return f"{endpoint}/{listener_id.hex()}/{credit}{key}"


def parse_member(address: str) -> tuple[str, bytes, int, bytes | None]:
    """(endpoint, listener id, credit, CURVE key or None) of a registered address; ValueError
    if it is not one."""
    head, _, tail = address.rpartition("/")
    key = z85.encode(bytes.fromhex(tail)) if len(tail) == 64 else None
    endpoint, lid, credit = (head if key else address).rsplit("/", 2)
    if not endpoint.startswith("tcp://") or len(lid) != 32:
        raise ValueError(f"not a zmq listener address: {address!r}")
    value = int(credit)
    if value < 1:
        raise ValueError(f"not a zmq listener address (credit {value}): {address!r}")
    return endpoint, bytes.fromhex(lid), value, key


# pyzmq's Python-level Socket.send/recv add keyword handling and enum conversions that cost as
# much as the call itself; the hot paths call the compiled methods with plain int flags.
try:
    from zmq.backend import Socket as _CompiledSocket

    send_frame: Callable[..., Any] = _CompiledSocket.send
    recv_frame: Callable[..., Any] = _CompiledSocket.recv
    get_option: Callable[..., Any] = _CompiledSocket.get
except (ImportError, AttributeError):  # pragma: no cover - other pyzmq layouts
    send_frame, recv_frame, get_option = zmq.Socket.send, zmq.Socket.recv, zmq.Socket.get

NOBLOCK, SNDMORE, RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)
