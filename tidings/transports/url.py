"""Transport URLs: ``driver://[user[:pass]@]host[:port][,more hosts]/[virtual_host][?query]``.

The URL is the one piece of configuration an operator hands to tidings, so it is parsed strictly
(a typo fails here, naming the part that is wrong, not deep inside a driver) and its password is
masked wherever the URL is shown: ``repr()``, log lines and exception messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from tidings.transports.errors import InvalidTransportURL

__all__ = ["TransportHost", "TransportURL", "mask_password"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]*(\+[A-Za-z][A-Za-z0-9.\-]*)*$")
_MASK = "****"
# Anything that looks like a URL in free text: its scheme and the rest of the word. Quotes end
# it too, since error messages quote URLs.
_URL_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"]*)")
# Query options whose values are secrets (a token, a key's seed, a pasted secret key): masked
# wherever the URL is shown, whatever driver declares them.
_SECRET_OPTION = re.compile(r"secret|passw|token|seed|cred", re.IGNORECASE)
_SECRET_QUERY_IN_TEXT = re.compile(
    r"(?P<key>[?&][^=&\s'\"]*(?:secret|passw|token|seed|cred)[^=&\s'\"]*=)[^&\s'\"]*",
    re.IGNORECASE)
# Characters that end the authority of a well-formed URL.
_AUTHORITY_END = re.compile(r"[/?#]")


def _mask_host(piece: str) -> str:
    creds, at, hostport = piece.rpartition("@")
    if not at or ":" not in creds:
        return piece
    user = creds.split(":", 1)[0]
    return f"{user}:{_MASK}@{hostport}"


def mask_password(text: str) -> str:
    """Replace the password of every URL inside ``text`` with ``****``.

    Used on any string that might carry a URL the user typed (an unparsable URL, a driver's error
    message) before it reaches a log line or an exception, so a secret never leaks by accident.
    """
    return _URL_IN_TEXT.sub(_mask_url, text)


def _mask_url(match: re.Match[str]) -> str:
    """One URL: each host's password and secret query values masked. A password typed without
    %-encoding its ``/``, ``?``, ``#``, ``,`` or ``@`` makes the URL ambiguous; then everything
    from the first user's ``:`` to the last ``@`` is masked, so no part of such a password
    shows."""
    return _SECRET_QUERY_IN_TEXT.sub(rf"\g<key>{_MASK}", _mask_authority(match))


def _mask_authority(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    last_at = rest.rfind("@")
    if last_at < 0:
        return scheme + rest
    end = _AUTHORITY_END.search(rest)
    auth_end = end.start() if end else len(rest)
    pieces = rest[:auth_end].split(",")
    # A piece without credentials before one with them: "user:pa,ss@host" (or a host:port
    # list; masking that too costs only a port number in a message).
    split_password = any("@" not in p and "@" in q for i, p in enumerate(pieces)
                         for q in pieces[i + 1:])
    if last_at < auth_end and not split_password:
        return scheme + ",".join(_mask_host(p) for p in pieces) + rest[auth_end:]
    colon = rest.find(":")
    if colon < 0 or colon > last_at:
        return scheme + rest
    return f"{scheme}{rest[:colon]}:{_MASK}{rest[last_at:]}"


@dataclass(frozen=True)
class TransportHost:
    """One broker address of a URL; credentials may differ per host, as in oslo.messaging."""

    hostname: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        pw = None if self.password is None else _MASK
        return (f"TransportHost(hostname={self.hostname!r}, port={self.port!r}, "
                f"username={self.username!r}, password={pw!r})")

    def __str__(self) -> str:
        """``host:port`` (``[v6]:port``), no credentials: for log lines and errors."""
        host = self.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """``user@host:port`` for logs and errors (never the password)."""
        return f"{self.username}@{self}" if self.username else str(self)

    def _format(self, mask: bool) -> str:
        out = ""
        if self.username is not None or self.password is not None:
            out += quote(self.username or "", safe="")
            if self.password is not None:
                out += ":" + (_MASK if mask else quote(self.password, safe=""))
            out += "@"
        if self.hostname:
            out += f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        if self.port is not None:
            out += f":{self.port}"
        return out


@dataclass(frozen=True)
class TransportURL:
    """A parsed transport URL. ``str()`` gives the URL back; ``repr()`` masks passwords.

    ``transport`` is the full scheme (``zmq+redis``); ``driver`` is the part before ``+``, which
    alone picks the driver, so a driver can take sub-schemes for its own plug-ins.
    """

    transport: str
    hosts: tuple[TransportHost, ...] = ()
    virtual_host: str | None = None
    query_items: tuple[tuple[str, str], ...] = ()
    # The virtual host as it was written, so str() gives back exactly what was parsed
    # ('%2F' and '//' both mean a leading '/', and each has its users).
    _vhost_text: str | None = field(default=None, compare=False, repr=False)

    @property
    def driver(self) -> str:
        return self.transport.split("+", 1)[0].lower()

    @property
    def subscheme(self) -> str | None:
        """What follows ``+`` in the scheme (``redis`` in ``zmq+redis``), or None."""
        parts = self.transport.split("+", 1)
        return parts[1].lower() if len(parts) == 2 else None

    @property
    def query(self) -> dict[str, str]:
        """Query options as a dict; a repeated key's values are joined with ``,`` as oslo does."""
        out: dict[str, list[str]] = {}
        for key, value in self.query_items:
            out.setdefault(key, []).append(value)
        return {k: ",".join(v) for k, v in out.items()}

    def get_all(self, key: str) -> list[str]:
        """Every value given for a repeated query key, in order."""
        return [v for k, v in self.query_items if k == key]

    @classmethod
    def parse(cls, url: str | TransportURL) -> TransportURL:
        """Parse ``url``; raise :class:`InvalidTransportURL` naming what is wrong."""
        if isinstance(url, TransportURL):
            return url
        if not isinstance(url, str):
            raise InvalidTransportURL(
                f"a transport URL must be a string such as 'rabbit://user:pass@host:5672/', "
                f"not {type(url).__name__}")
        shown = mask_password(url)
        if "://" not in url:
            raise InvalidTransportURL(
                f"invalid transport URL {shown!r}: missing '://'; write it as "
                f"'driver://[user[:pass]@]host[:port][,host2]/[virtual_host][?options]'")
        scheme, rest = url.split("://", 1)
        if not _SCHEME.match(scheme):
            raise InvalidTransportURL(
                f"invalid transport URL {shown!r}: scheme {scheme!r} must start with a letter and "
                f"hold only letters, digits, '.', '-' and '+' (e.g. 'rabbit' or 'zmq+redis')")
        if "#" in rest:
            raise InvalidTransportURL(
                f"invalid transport URL {shown!r}: a fragment ('#...') has no meaning here; "
                f"%-encode '#' as %23 if it is part of a password")
        if "@" in rest.partition("/")[2] or "@" in rest.partition("?")[2]:
            raise InvalidTransportURL(
                f"invalid transport URL {shown!r}: an '@' after the host part; if the password "
                f"holds '/', '?', '#', ',' or '@', %-encode them (%2F, %3F, %23, %2C, %40)")
        rest, _, query_text = rest.partition("?")
        netloc, slash, path = rest.partition("/")
        hosts = tuple(cls._parse_host(h, shown) for h in netloc.split(",")) if netloc else ()
        if any(h == TransportHost() for h in hosts):
            raise InvalidTransportURL(f"invalid transport URL {shown!r}: empty host between commas")
        virtual_host = unquote(path) if slash else None
        return cls(transport=scheme, hosts=hosts, virtual_host=virtual_host,
                   query_items=cls._parse_query(query_text, shown),
                   _vhost_text=path if slash else None)

    @staticmethod
    def _parse_host(text: str, shown: str) -> TransportHost:
        username = password = None
        if "@" in text:
            creds, _, text = text.rpartition("@")
            user, colon, pw = creds.partition(":")
            username = unquote(user)
            password = unquote(pw) if colon else None
        hostname: str | None
        port_text = ""
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise InvalidTransportURL(
                    f"invalid transport URL {shown!r}: IPv6 host {text!r} lacks its closing ']'")
            hostname = text[1:end]
            after = text[end + 1:]
            if after and not after.startswith(":"):
                raise InvalidTransportURL(
                    f"invalid transport URL {shown!r}: unexpected {after!r} after IPv6 host")
            port_text = after[1:]
        else:
            if text.count(":") > 1:
                raise InvalidTransportURL(
                    f"invalid transport URL {shown!r}: host {text!r} has several ':'; "
                    f"put an IPv6 address in brackets, e.g. '[::1]:5672'")
            hostname, _, port_text = text.partition(":")
            hostname = unquote(hostname)
        port = None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                # Not echoed when the URL has credentials: "user:pa,ss@h" splits the password
                # at the comma and makes its first half look like a port.
                what = "a port" if "@" in shown else f"port {port_text!r}"
                raise InvalidTransportURL(
                    f"invalid transport URL {shown!r}: {what} must be a number from 1 to "
                    f"65535 (if the password holds '/', '?', '#', ',' or '@', %-encode them)")
            port = int(port_text)
        elif text.endswith(":"):
            raise InvalidTransportURL(
                f"invalid transport URL {shown!r}: ':' after host {hostname!r} but no port")
        return TransportHost(hostname=hostname or None, port=port, username=username,
                             password=password)

    @staticmethod
    def _parse_query(text: str, shown: str) -> tuple[tuple[str, str], ...]:
        items: list[tuple[str, str]] = []
        for part in text.split("&") if text else ():
            if not part:
                continue
            key, eq, value = part.partition("=")
            key = unquote(key.replace("+", " "))
            if not key:
                raise InvalidTransportURL(
                    f"invalid transport URL {shown!r}: query part {part!r} has no option name")
            items.append((key, unquote(value.replace("+", " ")) if eq else ""))
        return tuple(items)

    def with_query(self, items: Iterable[tuple[str, str]] | Mapping[str, str]) -> TransportURL:
        """A copy with other query options; handy for tests and the CLI."""
        pairs = tuple(items.items()) if isinstance(items, Mapping) else tuple(items)
        return TransportURL(self.transport, self.hosts, self.virtual_host, pairs,
                            self._vhost_text)

    def _format(self, mask: bool) -> str:
        out = f"{self.transport}://" + ",".join(h._format(mask) for h in self.hosts)
        if self.virtual_host is not None:
            vhost = self._vhost_text
            if vhost is None or unquote(vhost) != self.virtual_host:
                vhost = quote(self.virtual_host, safe="/")
                if vhost.startswith("/"):
                    vhost = "%2F" + vhost[1:]
            out += "/" + vhost
        if self.query_items:
            out += "?" + "&".join(
                f"{quote(k, safe='')}="
                f"{_MASK if mask and _SECRET_OPTION.search(k) else quote(v, safe=',/:')}"
                for k, v in self.query_items)
        return out

    def __str__(self) -> str:
        return self._format(mask=False)

    def masked(self) -> str:
        """The URL with every password replaced by ``****``: what logs and errors show."""
        return self._format(mask=True)

    def __repr__(self) -> str:
        return f"TransportURL({self.masked()!r})"
