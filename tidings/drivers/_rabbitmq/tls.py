"""The TLS URL options of the drivers that reach RabbitMQ, checked once into :class:`TLSSettings`.

``rabbit://`` (AMQP 0-9-1, py-amqp) and ``amqp://`` (AMQP 1.0, proton) take the same TLS options
with the same meaning, so one URL query works for both: ``ssl`` turns TLS on (and the default
port to 5671), ``ssl_ca_file`` names the CA bundle that signed the broker's certificate (default:
the system's CAs), ``ssl_cert_file``/``ssl_key_file`` a client certificate, and
``ssl_verify_hostname`` (on by default) checks that the certificate names the URL's host. The
certificate itself is always verified. The declarations, the checks of their combinations and
the advice a failed handshake deserves are written here, once; a driver only hands the settings
to its own TLS library. Pure logic apart from :meth:`TLSSettings.check_files`, which reads the
files with the standard library so that a bad path fails when the transport is built.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tidings.transports.base import Option
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportURL

__all__ = ["DEFAULT_TLS_PORT", "TLS_OPTIONS", "TLSSettings", "ssl_error_text", "tls_settings"]

DEFAULT_TLS_PORT = 5671
"""RabbitMQ's TLS listener (AMQP 0-9-1 and, with the plugin, AMQP 1.0): the port with ssl=true."""

TLS_OPTIONS: dict[str, Option[Any]] = {
    "ssl": Option(bool, False, "connect with TLS (default port 5671)"),
    "ssl_ca_file": Option(str, "", "CA bundle that signs the broker's certificate (default: "
                                   "the system's CAs)"),
    "ssl_cert_file": Option(str, "", "client certificate for TLS client authentication"),
    "ssl_key_file": Option(str, "", "private key of ssl_cert_file"),
    "ssl_verify_hostname": Option(bool, True, "check that the broker's certificate names the "
                                              "host in the URL"),
}

_FILES = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")

# What OpenSSL says, lower-cased, grouped by what the user should check.
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure",
            "http request")
# The broker hung up mid-handshake. With TLS 1.3 a refused or missing client certificate often
# looks like this: the client finishes first and then reads EOF instead of the broker's alert.
_EOF = ("unexpected eof", "eof occurred in violation of protocol", "connection reset")
_CLIENT_REFUSED = ("certificate required", "alert bad certificate", "alert unknown ca",
                   "alert certificate unknown", "alert handshake failure",
                   "alert access denied")
_NAME_MISMATCH = ("mismatch", "hostname")
_CA_UNTRUSTED = ("self-signed", "self signed", "unable to get local issuer",
                 "unable to get issuer", "unable to verify the first certificate")
_DATES = ("certificate has expired", "certificate is not yet valid")


@dataclass(frozen=True)
class TLSSettings:
    """TLS is on; how to verify the broker and what to show it. Paths, never secrets."""

    ca_file: str = ""
    """CA bundle for the broker's certificate; empty: the system's CAs."""
    cert_file: str = ""
    """Client certificate (PEM); may also hold its key when ``key_file`` is empty."""
    key_file: str = ""
    verify_hostname: bool = True
    """Check that the certificate names the URL's host (the certificate is verified always)."""

    def ssl_options(self) -> dict[str, Any]:
        """The ``ssl=`` mapping py-amqp and kombu take (keywords of the standard library's
        ``ssl.wrap_socket``). ``server_hostname`` is present (as None) exactly when the host
        name is checked: py-amqp checks it exactly when a name is given, so the driver puts the
        host it connects to in its place."""
        opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
        if self.ca_file:
            opts["ca_certs"] = self.ca_file
        if self.cert_file:
            opts["certfile"] = self.cert_file
        if self.key_file:
            opts["keyfile"] = self.key_file
        if self.verify_hostname:
            opts["server_hostname"] = None
        return opts

    def check_files(self) -> None:
        """Load the CA bundle and the client certificate with the standard library, so a
        missing or unreadable file, a key that does not match its certificate or a key with a
        passphrase fails now, naming the option, instead of at every connection attempt."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidTransportOption(
                    f"ssl_ca_file={self.ca_file} cannot be used: {ssl_error_text(exc)}; give a "
                    f"readable PEM file with the CA certificate(s) that signed the broker's "
                    f"certificate") from None
        if self.cert_file:
            key = self.key_file or None
            try:
                ctx.load_cert_chain(self.cert_file, key, password=_no_passphrase)
            except InvalidTransportOption:
                raise
            except (OSError, ssl.SSLError) as exc:
                named = f"ssl_cert_file={self.cert_file}" + (
                    f" with ssl_key_file={self.key_file}" if key else
                    " (no ssl_key_file: the key is looked for in the same file)")
                raise InvalidTransportOption(
                    f"{named} cannot be used: {ssl_error_text(exc)}; give readable PEM files, the "
                    f"certificate and the unencrypted private key that belongs to it") from None

    def explain_handshake_failure(self, where: str, host: str | None, error: str) -> str:
        """A line for logs and TransportUnreachable: the TLS handshake with ``where`` (as
        shown, e.g. ``broker:5671``) failed with OpenSSL's ``error``, and what to check,
        chosen from what OpenSSL said. ``host`` is the name the certificate must carry."""
        low = error.lower()
        ca = (f"ssl_ca_file={self.ca_file}" if self.ca_file
              else "the system's CA certificates (no ssl_ca_file given)")
        name = (f" and that the certificate names {host!r}, the host in the URL "
                f"(ssl_verify_hostname=false skips the name check)" if self.verify_hostname
                else "")
        if any(s in low for s in _NOT_TLS):
            advice = (f"check that {where} is the broker's TLS listener (RabbitMQ: "
                      f"listeners.ssl, port {DEFAULT_TLS_PORT} by default), not a plain AMQP "
                      f"port")
        elif any(s in low for s in _CLIENT_REFUSED):
            advice = (f"the broker refused the client certificate ssl_cert_file="
                      f"{self.cert_file}: check that the broker trusts the CA that signed it"
                      if self.cert_file else
                      "the broker requires a client certificate: add ssl_cert_file and "
                      "ssl_key_file to the URL")
        elif any(s in low for s in _EOF):
            advice = ("the broker hung up during the handshake: "
                      + (f"check that it trusts the CA that signed the client certificate "
                         f"ssl_cert_file={self.cert_file}" if self.cert_file else
                         "if it requires a client certificate, add ssl_cert_file and "
                         "ssl_key_file to the URL")
                      + f"; check also that {where} is its TLS listener and that it can read "
                        f"its own certificate and key")
        elif any(s in low for s in _NAME_MISMATCH):
            advice = (f"the broker's certificate does not name {host!r}, the host in the URL: "
                      f"connect with a name the certificate lists, or set "
                      f"ssl_verify_hostname=false to skip the name check")
        elif any(s in low for s in _CA_UNTRUSTED):
            advice = f"check that {ca} holds the CA that signed the broker's certificate"
        elif any(s in low for s in _DATES):
            advice = "check the dates of the broker's certificate, and the clocks"
        elif "verify failed" in low:  # OpenSSL (as proton reports it) did not say which check
            advice = f"check that {ca} holds the CA that signed the broker's certificate{name}"
        else:
            advice = (f"check that {where} is the broker's TLS listener and that {ca} holds "
                      f"the CA that signed its certificate{name}")
        return f"TLS handshake with {where} failed ({error.strip()}); {advice}"


def _no_passphrase() -> str:
    raise InvalidTransportOption("the private key of ssl_cert_file (ssl_key_file) is encrypted "
                                 "with a passphrase, and there is no option for one: give an "
                                 "unencrypted key, readable only by the service's user")


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")


def ssl_error_text(exc: BaseException) -> str:
    """An exception of the standard library's ssl module (or a file error) as one short
    phrase: ``[SSL: X] what`` without the C source line, or the OS error's text."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return _SSL_SOURCE.sub("", str(exc)) or type(exc).__name__


def tls_settings(url: TransportURL, options: Mapping[str, Any]) -> TLSSettings | None:
    """The TLS settings of a URL whose options include :data:`TLS_OPTIONS`; None when TLS is off.

    Raises InvalidTransportOption, naming the fix, for ``ssl_*`` files given without
    ``ssl=true`` (silently connecting in clear text would be worse than failing) and for a key
    without its certificate.
    """
    files = {k: str(options.get(k) or "") for k in _FILES}
    if not options.get("ssl"):
        given = ", ".join(k for k, v in files.items() if v)
        if given:
            raise InvalidTransportOption(
                f"{given} given in {url.masked()} but TLS is off; add ssl=true to the URL")
        return None
    if files["ssl_key_file"] and not files["ssl_cert_file"]:
        raise InvalidTransportOption("ssl_key_file needs ssl_cert_file (the certificate "
                                     "it belongs to); add ssl_cert_file to the URL")
    verify = options.get("ssl_verify_hostname")
    return TLSSettings(ca_file=files["ssl_ca_file"], cert_file=files["ssl_cert_file"],
                       key_file=files["ssl_key_file"],
                       verify_hostname=True if verify is None else bool(verify))
