"""CURVE for zmq:// (docs/zmq.md). Each process has a key pair (``curve_secret_key``, a
``.key_secret`` file of ``zmq.auth.create_certificates``). Its listeners are CURVE servers with
it, let in only senders whose public key is in ``curve_public_keys_dir`` (one ZAP handler per
driver context) and register their public key with their address; its senders connect only to
listeners whose registered key they trust (that directory, ``curve_server_key``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tidings.transports.errors import InvalidTransportOption

__all__ = ["REFUSALS", "Curve"]

LOG = logging.getLogger(__name__)

REFUSALS: dict[int, str] = {  # failed handshakes, as a listener sees them
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "its public key is not in curve_public_keys_dir",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "it has no CURVE key, or does not trust ours",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "it left during the handshake (no CURVE key?)"}


def _load(option: str, path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:  # the message never repeats the option's value or the file
        why = exc.strerror if isinstance(exc, OSError) else "not a certificate file"
        raise InvalidTransportOption(
            f"URL option {option}: cannot read a CURVE certificate from the file given ({why}); "
            f"make one with python -c \"import zmq.auth; "
            f"zmq.auth.create_certificates('DIR', 'NAME')\"") from None


def _invalid(text: str) -> InvalidTransportOption:
    return InvalidTransportOption("URL option " + text)


@dataclass(frozen=True, repr=False)
class Curve:
    public: bytes  # Z85, as pyzmq takes keys
    secret: bytes
    trusted: frozenset[bytes]  # public keys of the listeners we may send to
    allowed_dir: str | None  # the public certificates of the senders our listeners let in

    def __repr__(self) -> str:
        return f"<Curve public key {self.public.decode()}>"

    @classmethod
    def from_options(cls, conf: Mapping[str, Any]) -> Curve | None:
        secret_file, keys_dir, server_file = (
            conf["curve_secret_key"], conf["curve_public_keys_dir"], conf["curve_server_key"])
        if not secret_file:
            if keys_dir or server_file:
                raise _invalid("curve_public_keys_dir or curve_server_key need "
                               "curve_secret_key too (this process's .key_secret certificate)")
            return None
        if not zmq.has("curve"):
            raise _invalid("curve_secret_key: this libzmq was built without CURVE")
        public, secret = _load("curve_secret_key", secret_file)
        if not secret:
            raise _invalid("curve_secret_key: the file holds no secret key; give the "
                           ".key_secret file, not the public .key")
        if os.stat(secret_file).st_mode & 0o077:
            LOG.warning("the curve_secret_key file can be read by other users: chmod 600 it")
        trusted = {_load("curve_server_key", server_file)[0]} if server_file else set()
        if keys_dir and not os.path.isdir(keys_dir):
            raise _invalid(f"curve_public_keys_dir={keys_dir!r} is not a directory")
        trusted.update(zmq.auth.load_certificates(keys_dir) if keys_dir else ())
        if not trusted:
            raise _invalid("curve_secret_key needs curve_public_keys_dir (the deployment's "
                           "public .key certificates) or curve_server_key (the listeners' .key)")
        return cls(public, secret, frozenset(trusted), keys_dir)

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (not yet bound) a CURVE server with our key pair."""
        sock.curve_server, sock.curve_secretkey, sock.curve_publickey = (
            True, self.secret, self.public)

    def connect(self, sock: zmq.Socket, server_key: bytes) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the listener ``server_key``."""
        sock.curve_serverkey, sock.curve_secretkey, sock.curve_publickey = (
            server_key, self.secret, self.public)

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler of ``ctx``: it lets in senders whose key is in allowed_dir."""
        if self.allowed_dir is None:
            raise InvalidTransportOption(
                "a listener with curve_secret_key needs curve_public_keys_dir: the public "
                ".key certificates of the senders it lets in")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=self.allowed_dir)
        return auth
