"""TransportURL: every documented form parses, round-trips, and never shows a password."""

from __future__ import annotations

import logging
import re

import pytest

from tidings import InvalidTransportURL, TransportHost, TransportURL
from tidings.transports.url import mask_password

ROUND_TRIP = [
    "memory://",
    "memory:///test-vhost",
    "rabbit://",
    "rabbit://host",
    "rabbit://host/",
    "rabbit://guest:guest@127.0.0.1:5672/",
    "rabbit://user:pass@h1:5672,h2:5673,h3/vhost",
    "rabbit://a:x@h1,b:y@h2:5673/v",
    "rabbit://user@host:5672/",
    "rabbit://host/%2F",
    "rabbit://host/%2Fnested/vhost",
    "rabbit://[::1]:5672/",
    "rabbit://u:p@[fe80::1%25eth0]:5672,[::1]/v",
    "rabbit://host/v?heartbeat=30&durable=true",
    "rabbit://host/v?ssl_ca_file=/etc/ca.pem",
    "rabbit://host/?a=1&a=2&b=",
    "zmq+redis://127.0.0.1:6379/0",
    "zmq+sqlite:///tmp/registry.db",
    "zmq+sqlite:////tmp/registry.db",
    "zmq+sqlite:///%2Ftmp/registry.db",
    "amqp://u:p%40ss%3Aw%2Frd@host:5672/v",
]


@pytest.mark.parametrize("url", ROUND_TRIP)
def test_round_trip(url: str) -> None:
    parsed = TransportURL.parse(url)
    assert str(parsed) == url
    assert TransportURL.parse(str(parsed)) == parsed


def test_components() -> None:
    url = TransportURL.parse("rabbit://us%20er:p%40ss@h1:5672,[::1]:5673/my%2Fvhost?x=1&x=2&y=3")
    assert url.transport == "rabbit" and url.driver == "rabbit" and url.subscheme is None
    assert url.hosts == (
        TransportHost("h1", 5672, "us er", "p@ss"),
        TransportHost("::1", 5673),
    )
    assert url.virtual_host == "my/vhost"
    assert url.query == {"x": "1,2", "y": "3"}
    assert url.get_all("x") == ["1", "2"]


def test_only_the_part_before_plus_picks_the_driver() -> None:
    url = TransportURL.parse("ZMQ+Redis://127.0.0.1:6379/0")
    assert url.driver == "zmq"
    assert url.subscheme == "redis"
    assert url.hosts[0] == TransportHost("127.0.0.1", 6379)
    assert url.virtual_host == "0"


def test_empty_forms() -> None:
    assert TransportURL.parse("memory://").hosts == ()
    assert TransportURL.parse("memory://").virtual_host is None
    assert TransportURL.parse("rabbit:///").virtual_host == ""
    assert TransportURL.parse("rabbit://user:@h").hosts[0].password == ""
    assert TransportURL.parse("rabbit://?a").query == {"a": ""}


SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", [
    f"rabbit://user:{SECRET}@host:5672/",
    f"rabbit://a:{SECRET}@h1,b:{SECRET}@h2/v",
    f"amqp://u:{SECRET}@[::1]:5672/v?x=1",
])
def test_password_is_masked_in_repr_and_masked(url: str, caplog: pytest.LogCaptureFixture) -> None:
    parsed = TransportURL.parse(url)
    assert SECRET not in repr(parsed)
    assert SECRET not in parsed.masked()
    assert SECRET not in repr(parsed.hosts)
    assert "****" in parsed.masked()
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("connecting to %r", parsed)
    assert SECRET not in caplog.text
    assert SECRET in str(parsed)  # str() is the real URL, for handing to a driver


@pytest.mark.parametrize("bad, why", [
    ("rabbit//host", "missing '://'"),
    ("://host", "scheme"),
    ("1abc://host", "scheme"),
    ("rab bit://host", "scheme"),
    ("rabbit://host:notaport/", "port 'notaport'"),
    ("rabbit://host:0/", "port '0'"),
    ("rabbit://host:70000/", "port '70000'"),
    ("rabbit://host:/", "no port"),
    ("rabbit://[::1/", "closing ']'"),
    ("rabbit://[::1]x/", "unexpected"),
    ("rabbit://::1:5672/", "brackets"),
    ("rabbit://h1,,h2/", "empty host"),
    ("rabbit://host/#frag", "fragment"),
    ("rabbit://host/?=1", "no option name"),
])
def test_bad_urls_say_why(bad: str, why: str) -> None:
    with pytest.raises(InvalidTransportURL, match="invalid transport URL") as info:
        TransportURL.parse(bad)
    assert why in str(info.value)


def test_bad_url_error_masks_password() -> None:
    with pytest.raises(InvalidTransportURL) as info:
        TransportURL.parse(f"rabbit://user:{SECRET}@host:bad/")
    assert SECRET not in str(info.value)
    assert "user:****@host" in str(info.value)


@pytest.mark.parametrize("password", ["Kx7q#Zw9r", "Kx7q?Zw9r", "Kx7q/Zw9r", "Kx7q,Zw9r",
                                      "Kx7q@Zw9r", "Kx7q/Zw9r?Mv3t#Jp5s,Hd8y"])
def test_unencoded_special_characters_in_a_password_never_show(password: str) -> None:
    url = f"rabbit://user:{password}@host:5672/vhost"
    secret_parts = [p for p in re.split(r"[#?/,@]", password) if p]
    masked = mask_password(f"connect to {url} failed")
    assert "user:****@" in masked and not any(p in masked for p in secret_parts), masked
    try:
        TransportURL.parse(url)
    except InvalidTransportURL as exc:
        assert not any(p in str(exc) for p in secret_parts), str(exc)
        assert "%-encode" in str(exc)


def test_secret_query_options_are_masked_too() -> None:
    url = ("zmq://?curve_secret_key=Zq8-pasted#raw-key&token=Tk9xsecret&nkey_seed=SUAXseed"
           "&ttl=30")
    for shown in (mask_password(f"bad URL {url!r}"),
                  TransportURL.parse(url.replace("#", "%23")).masked()):
        assert not any(s in shown for s in ("Zq8", "raw-key", "Tk9x", "SUAX")), shown
        assert "ttl=30" in shown and "curve_secret_key=****" in shown, shown
    with pytest.raises(InvalidTransportURL) as err:
        TransportURL.parse(url)
    assert "Zq8" not in str(err.value) and "raw-key" not in str(err.value)


def test_not_a_string() -> None:
    with pytest.raises(InvalidTransportURL, match="must be a string"):
        TransportURL.parse(42)  # type: ignore[arg-type]


def test_mask_password_in_free_text() -> None:
    text = f"failed: rabbit://u:{SECRET}@h1:5672,v:{SECRET}@h2/ and amqp://x:{SECRET}@y"
    masked = mask_password(text)
    assert SECRET not in masked
    assert masked.count("****") == 3
    assert mask_password("rabbit://host:5672/") == "rabbit://host:5672/"


def test_programmatic_vhost_is_formatted_canonically() -> None:
    url = TransportURL("rabbit", (TransportHost("h"),), "/")
    assert str(url) == "rabbit://h/%2F"
    assert TransportURL.parse("zmq+sqlite:////tmp/x.db").virtual_host == "/tmp/x.db"


def test_with_query() -> None:
    url = TransportURL.parse("memory:///v").with_query({"prefetch": "5"})
    assert str(url) == "memory:///v?prefetch=5"
