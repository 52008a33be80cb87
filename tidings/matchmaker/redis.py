"""Redis matchmaker: the registry behind ``zmq+redis://[user:pass@]host:6379/0``.

For listeners and notifiers on many hosts. The URL's first host is the Redis server (default
127.0.0.1:6379), its virtual host the database number (default 0), its user and password the
Redis ACL credentials.

Layout, all under the hash tag ``{<namespace>}`` so the keys share one Redis Cluster slot:

* ``{ns}:route:["exchange", "routing key"]`` -- a sorted set whose members are
  ``["group", "address"]`` scored by their expiry in milliseconds of the Redis server's clock;
  the key itself expires once its longest-lived member has;
* ``{ns}:generation`` -- incremented when a member is added or removed.

Registration, unregistration and lookup each run as one Lua script, so they are atomic and use
the server's ``TIME``: expiry never depends on the clients' clocks agreeing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from tidings.matchmaker.base import MatchMaker, Member, Registration, check_ttl
from tidings.transports.errors import TidingsError, TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["RedisMatchMaker"]

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] generation, KEYS[2..] route keys; ARGV[1] ttl ms, ARGV[2..] members (one per route key)
_REGISTER = """
if redis.replicate_commands then redis.replicate_commands() end
""" + _NOW + """
local ttl = tonumber(ARGV[1])
local added = 0
for i = 2, #KEYS do
  local key = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  added = added + redis.call('ZADD', key, now + ttl, ARGV[i])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
if added > 0 then redis.call('INCR', KEYS[1]) end
return added
"""

# KEYS[1] generation, KEYS[2..] route keys; ARGV[1..] members (one per route key)
_UNREGISTER = """
local removed = 0
for i = 2, #KEYS do
  removed = removed + redis.call('ZREM', KEYS[i], ARGV[i - 1])
end
if removed > 0 then redis.call('INCR', KEYS[1]) end
return removed
"""

# KEYS[1] route key -> {now, member, score, member, score, ...} of live members
_LOOKUP = _NOW + """
local r = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
table.insert(r, 1, tostring(now))
return r
"""


class RedisMatchMaker(MatchMaker):
    """A registry in one Redis server (or cluster slot); see the module docstring."""

    name = "redis"

    def __init__(self, url: TransportURL, namespace: str = "tidings") -> None:
        super().__init__(url, namespace)
        if len(url.hosts) > 1:
            raise ValueError(
                f"{url.masked()}: the Redis matchmaker talks to one server; give one host "
                f"(Redis Sentinel and client-side sharding are not supported)")
        host = url.hosts[0] if url.hosts else None
        db_text = (url.virtual_host or "0").strip("/") or "0"
        if not db_text.isdigit():
            raise ValueError(
                f"{url.masked()}: the path of a zmq+redis URL is the Redis database number, "
                f"e.g. zmq+redis://127.0.0.1:6379/0, not {db_text!r}")
        self._where = f"redis://{(host and host.hostname) or '127.0.0.1'}:" \
                      f"{(host and host.port) or 6379}/{db_text}"
        self._client = redis.Redis(
            host=(host and host.hostname) or "127.0.0.1", port=(host and host.port) or 6379,
            db=int(db_text), username=host.username if host else None,
            password=host.password if host else None,
            socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30,
            # One immediate retry heals a pooled connection the server closed; anything longer
            # is the core's retry policy's call (a listener's refresh retries on its own).
            retry=Retry(NoBackoff(), 1))
        tag = "{" + namespace + "}"
        self._gen_key = f"{tag}:generation"
        self._route_prefix = f"{tag}:route:"
        self._register = self._client.register_script(_REGISTER)
        self._unregister = self._client.register_script(_UNREGISTER)
        self._lookup = self._client.register_script(_LOOKUP)

    # -- helpers -------------------------------------------------------------------------
    def _route_key(self, exchange: str, routing_key: str) -> str:
        return self._route_prefix + json.dumps([exchange, routing_key], ensure_ascii=False)

    @staticmethod
    def _member(r: Registration) -> str:
        return json.dumps([r.group, r.address], ensure_ascii=False)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.exceptions.AuthenticationError as exc:
            raise TidingsError(
                f"redis matchmaker at {self._where}: authentication failed ({exc}); check the "
                f"user and password in the transport URL") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise TransportUnreachable(
                f"redis matchmaker at {self._where} unreachable while {what}: {exc}; check "
                f"that Redis runs there") from exc

    # -- the contract -------------------------------------------------------------------------
    def register(self, registrations: Sequence[Registration], ttl: float) -> int:
        ttl_ms = max(1, int(check_ttl(ttl) * 1000))
        if not registrations:
            return 0
        keys = [self._gen_key] + [self._route_key(r.exchange, r.routing_key)
                                  for r in registrations]
        args: list[Any] = [ttl_ms] + [self._member(r) for r in registrations]
        return int(self._call("registering", lambda: self._register(keys=keys, args=args)))

    def unregister(self, registrations: Sequence[Registration]) -> None:
        if not registrations:
            return
        keys = [self._gen_key] + [self._route_key(r.exchange, r.routing_key)
                                  for r in registrations]
        args = [self._member(r) for r in registrations]
        self._call("unregistering", lambda: self._unregister(keys=keys, args=args))

    def lookup(self, exchange: str, routing_key: str) -> dict[str, list[Member]]:
        key = self._route_key(exchange, routing_key)
        reply = self._call("looking up listeners", lambda: self._lookup(keys=[key]))
        now = float(reply[0])
        out: dict[str, list[Member]] = {}
        for i in range(1, len(reply) - 1, 2):
            group, address = json.loads(reply[i])
            out.setdefault(group, []).append(Member(address, (float(reply[i + 1]) - now) / 1000))
        for members in out.values():
            members.sort(key=lambda m: m.address)
        return out

    def generation(self) -> int:
        value = self._call("reading the generation", lambda: self._client.get(self._gen_key))
        return int(value or 0)

    def close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        return f"redis matchmaker {self._where} namespace={self.namespace!r}"

    def purge(self) -> int:
        """Delete every key of this namespace (tests and tooling); returns how many went."""
        keys = list(self._call("purging", lambda: list(
            self._client.scan_iter(match=self._glob() + "*", count=500))))
        if keys:
            self._call("purging", lambda: self._client.delete(*keys))
        return len(keys)

    def _glob(self) -> str:
        tag = "{" + self.namespace + "}"
        return "".join("\\" + c if c in "*?[]\\" else c for c in tag)
