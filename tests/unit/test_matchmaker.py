"""The matchmakers (memory, sqlite, Redis) against one contract: groups per (exchange, routing
key), exchange isolation, TTL expiry and refresh, the generation counter, and the loader.

The Redis backend runs against the server on 127.0.0.1:6379 under a fresh namespace per test,
purged afterwards; the sqlite one against a file in the test's temporary directory, including
from another process.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tidings.matchmaker.base import (
    NO_POOL,
    MatchMaker,
    Registration,
    available_matchmakers,
    check_ttl,
    get_matchmaker,
    load_matchmaker_class,
)
from tidings.matchmaker.client import Directory, Registrar
from tidings.matchmaker.sqlite import runtime_dir
from tidings.testing.brokers import require_service
from tidings.transports.errors import DriverLoadFailure, TransportUnreachable
from tidings.transports.url import TransportURL

ADDR = "tcp://127.0.0.1:{port}/" + "ab" * 16 + "/8"


def addr(port: int) -> str:
    return ADDR.format(port=port)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Re-check ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def mm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MatchMaker]:
    ns = f"t-{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        maker = get_matchmaker("memory", f"zmq:///{ns}", ns)
    elif request.param == "sqlite":
        maker = get_matchmaker("sqlite", f"zmq+sqlite:///{tmp_path}/mm.db", ns)
    else:
        require_service("redis")
        maker = get_matchmaker("redis", "zmq+redis://127.0.0.1:6379/0", ns)
    try:
        yield maker
    finally:
        if request.param == "redis":
            maker.purge()  # type: ignore[attr-defined]
        maker.close()


def test_groups_per_exchange_and_routing_key(mm: MatchMaker) -> None:
    mm.register([Registration("nova", "notifications.info", NO_POOL, addr(1)),
                 Registration("nova", "notifications.info", NO_POOL, addr(2)),
                 Registration("nova", "notifications.info", "billing", addr(3)),
                 Registration("nova", "notifications.error", "billing", addr(3)),
                 Registration("glance", "notifications.info", NO_POOL, addr(4))], ttl=30)
    found = mm.lookup("nova", "notifications.info")
    assert {g: [m.address for m in ms] for g, ms in found.items()} == {
        NO_POOL: [addr(1), addr(2)], "billing": [addr(3)]}
    assert all(0 < m.expires_in <= 30 for ms in found.values() for m in ms)
    # The exchange is part of the key: glance's listener is not nova's, and vice versa.
    assert [m.address for m in mm.lookup("glance", "notifications.info")[NO_POOL]] == [addr(4)]
    assert mm.lookup("cinder", "notifications.info") == {}
    assert list(mm.lookup("nova", "notifications.error")) == ["billing"]


def test_unregister_and_generation(mm: MatchMaker) -> None:
    a = Registration("ex", "rk", "pool", addr(1))
    b = Registration("ex", "rk", "pool", addr(2))
    g0 = mm.generation()
    assert mm.register([a, b], ttl=30) == 2
    g1 = mm.generation()
    assert g1 != g0
    # A refresh is not a change: senders keep their cached lookups.
    assert mm.register([a, b], ttl=30) == 0
    assert mm.generation() == g1
    mm.unregister([a])
    g2 = mm.generation()
    assert g2 != g1
    assert [m.address for m in mm.lookup("ex", "rk")["pool"]] == [addr(2)]
    mm.unregister([a])  # already gone: no change, no error
    assert mm.generation() == g2
    mm.unregister([b])
    assert mm.lookup("ex", "rk") == {}


def test_ttl_expiry_and_refresh(mm: MatchMaker) -> None:
    short = Registration("ex", "rk", NO_POOL, addr(1))
    kept = Registration("ex", "rk", NO_POOL, addr(2))
    mm.register([short, kept], ttl=0.4)
    assert len(mm.lookup("ex", "rk")[NO_POOL]) == 2
    deadline = time.monotonic() + 5.0
    # Refresh one of them while the other is left to die, as a dead listener would.
    while len(mm.lookup("ex", "rk").get(NO_POOL, [])) == 2:
        assert time.monotonic() < deadline, "the unrefreshed registration never expired"
        mm.register([kept], ttl=0.4)
        time.sleep(0.05)
    assert [m.address for m in mm.lookup("ex", "rk")[NO_POOL]] == [addr(2)]
    # Coming back after expiring is a new registration (the generation moves).
    gen = mm.generation()
    assert mm.register([short], ttl=30) == 1
    assert mm.generation() != gen


def test_registrar_keeps_entries_alive_until_removed(mm: MatchMaker) -> None:
    """A Registrar registers at once, refreshes past the TTL, unregisters on remove() and, for
    what is left, on stop()."""
    first = [Registration("ex", "rk", "pool", addr(1))]
    second = [Registration("ex", "rk", "pool", addr(2))]
    ttl = 1.5  # refreshed every 0.5 s: a loaded machine may stall the refresher for 1 s
    registrar = Registrar(mm, ttl=ttl)
    try:
        registrar.add(first)
        registrar.add(second)
        until = time.monotonic() + 2 * ttl  # twice the TTL: only the refreshes keep them
        while time.monotonic() < until:  # and at no moment is one of them missing
            assert len(mm.lookup("ex", "rk")["pool"]) == 2
            time.sleep(0.05)
        registrar.remove(first)
        assert [m.address for m in mm.lookup("ex", "rk")["pool"]] == [addr(2)]
    finally:
        registrar.stop()
    assert mm.lookup("ex", "rk") == {}
    registrar.remove(second)  # after stop(): nothing to do, the registry is not touched


def test_a_refresh_never_brings_back_a_removed_registration(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """remove() while a refresh that read the entry is talking to the registry: the removal
    waits for it, so the refresh cannot re-register what was just unregistered (a closed
    listener would stay registered for a whole TTL)."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    mm = get_matchmaker("memory", f"zmq+memory:///{ns}", ns)
    first = [Registration("ex", "rk", "pool", addr(1))]
    in_refresh, release = threading.Event(), threading.Event()
    register = mm.register
    calls: list[int] = []

    def slow_first_refresh(registrations: Sequence[Registration], ttl: float) -> int:
        calls.append(len(registrations))
        if len(calls) == 2:  # the first refresh, after add()'s own registration
            in_refresh.set()
            assert release.wait(30)
        return register(registrations, ttl)

    monkeypatch.setattr(mm, "register", slow_first_refresh)
    registrar = Registrar(mm, ttl=0.3)
    try:
        registrar.add(first)
        assert in_refresh.wait(30), "no refresh started"
        removing = threading.Thread(target=registrar.remove, args=(first,))
        removing.start()
        removing.join(0.2)
        assert removing.is_alive(), "remove() did not wait for the refresh under way"
        release.set()
        removing.join(30)
        assert not removing.is_alive()
        assert mm.lookup("ex", "rk") == {}
    finally:
        release.set()
        registrar.stop()


def test_directory_caches_until_the_registry_changes(mm: MatchMaker) -> None:
    """Directory: a lookup is reused while nothing changes; this process's registrations (made
    through a Registrar) are seen at once, another process's within the check interval."""
    directory = Directory(mm, max_age=30, check_interval=0.2)
    registrar = Registrar(mm, ttl=30)
    try:
        empty = directory.route("ex", "rk")
        assert empty.groups == {} and directory.route("ex", "rk") is empty
        registrar.add([Registration("ex", "rk", NO_POOL, addr(1))])  # this process: at once
        local = directory.route("ex", "rk")
        assert local.groups == {NO_POOL: (addr(1),)} and local.stamp > empty.stamp
        mm.register([Registration("ex", "rk", "pool", addr(2))], ttl=30)  # "another process"
        wait_for(lambda: "pool" in directory.route("ex", "rk").groups, 2.0,
                 "the other registration to be seen")
    finally:
        registrar.stop()
        mm.unregister([Registration("ex", "rk", "pool", addr(2))])


def test_registration_validation() -> None:
    with pytest.raises(ValueError, match="exchange"):
        Registration("", "rk", NO_POOL, addr(1))
    with pytest.raises(ValueError, match="group"):
        Registration("ex", "rk", None, addr(1))  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="time-to-live"):
            check_ttl(bad)


def test_loader_through_entry_points() -> None:
    assert {"memory", "redis", "sqlite"} <= set(available_matchmakers())
    assert load_matchmaker_class("memory").name == "memory"
    with pytest.raises(DriverLoadFailure, match=r"installed matchmakers: .*memory"):
        load_matchmaker_class("nosuch")


def test_memory_registries_are_shared_per_vhost_and_namespace() -> None:
    ns = uuid.uuid4().hex
    one = get_matchmaker("memory", "zmq:///v1", ns)
    two = get_matchmaker("memory", "zmq:///v1", ns)
    other_vhost = get_matchmaker("memory", "zmq:///v2", ns)
    one.register([Registration("ex", "rk", NO_POOL, addr(1))], ttl=30)
    assert list(two.lookup("ex", "rk")) == [NO_POOL]
    assert other_vhost.lookup("ex", "rk") == {}
    with pytest.raises(ValueError, match="takes no host"):
        get_matchmaker("memory", "zmq://somehost/", ns)


def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = get_matchmaker("sqlite", f"zmq+sqlite:///{tmp_path}/a.db")
    assert absolute.path == f"{tmp_path}/a.db"  # type: ignore[attr-defined]
    encoded = get_matchmaker("sqlite", TransportURL.parse(str(TransportURL(
        "zmq+sqlite", virtual_host=f"{tmp_path}/a.db"))))
    assert encoded.path == f"{tmp_path}/a.db"  # type: ignore[attr-defined]
    monkeypatch.chdir(tmp_path)
    relative = get_matchmaker("sqlite", "zmq+sqlite:///rel.db")
    assert relative.path == str(tmp_path / "rel.db")  # type: ignore[attr-defined]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    default = get_matchmaker("sqlite", "zmq+sqlite://")  # no path: the user's default file
    assert default.path == str(tmp_path / "run" / "tidings" / "registry.db")  # type: ignore
    missing = get_matchmaker("sqlite", f"zmq+sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(ValueError, match="does not exist"):
        missing.generation()


def test_the_default_registry_directory_is_private(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """$XDG_RUNTIME_DIR/tidings, else $XDG_CACHE_HOME/tidings, else ~/.cache/tidings: made
    0700, narrowed to 0700 if others could read it, refused if it is not a directory of
    ours (a symlink planted by another user, a file)."""
    run, cache, home = tmp_path / "run", tmp_path / "cache", tmp_path / "home"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert runtime_dir() == str(run / "tidings")
    assert stat.S_IMODE((run / "tidings").stat().st_mode) == 0o700
    (run / "tidings").chmod(0o755)
    assert runtime_dir() == str(run / "tidings")
    assert stat.S_IMODE((run / "tidings").stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "not-there"))  # unusable: the next
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert runtime_dir() == str(cache / "tidings")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(home))
    assert runtime_dir() == str(home / ".cache" / "tidings")
    assert stat.S_IMODE((home / ".cache" / "tidings").stat().st_mode) == 0o700
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    (run / "tidings").rmdir()
    (run / "tidings").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="not a directory owned by this user"):
        runtime_dir()
    (run / "tidings").unlink()
    (run / "tidings").write_text("")
    with pytest.raises(ValueError, match=r"default zmq registry directory|not a directory"):
        runtime_dir()


def test_sqlite_is_shared_between_processes(tmp_path: Path) -> None:
    url = f"zmq+sqlite:///{tmp_path}/shared.db"
    child = textwrap.dedent(f"""
        from tidings.matchmaker.base import Registration, get_matchmaker
        mm = get_matchmaker("sqlite", {url!r}, "procs")
        mm.register([Registration("ex", "rk", "pool", {addr(7)!r})], ttl=30)
        print(sorted(mm.lookup("ex", "parent")))
    """)
    parent = get_matchmaker("sqlite", url, "procs")
    parent.register([Registration("ex", "parent", NO_POOL, addr(8))], ttl=30)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "['']"  # the child saw the parent's no-pool registration
    assert [m.address for m in parent.lookup("ex", "rk")["pool"]] == [addr(7)]


def test_redis_url_and_secrets() -> None:
    require_service("redis")
    maker = get_matchmaker("redis", "zmq+redis://user:s3cret@127.0.0.1:6379/3", "x")
    assert "s3cret" not in maker.describe() and "s3cret" not in repr(maker)
    with pytest.raises(ValueError, match="database number"):
        get_matchmaker("redis", "zmq+redis://127.0.0.1:6379/zero")
    with pytest.raises(ValueError, match="one server"):
        get_matchmaker("redis", "zmq+redis://h1:6379,h2:6379/0")


def test_redis_unreachable_is_retryable() -> None:
    # Nothing listens on port 1: a connection error the core's retry policy may retry.
    maker = get_matchmaker("redis", "zmq+redis://127.0.0.1:1/0", "down")
    with pytest.raises(TransportUnreachable, match="unreachable"):
        maker.generation()


def test_redis_keys_expire_with_their_members() -> None:
    require_service("redis")
    import redis

    ns = f"t-{uuid.uuid4().hex[:12]}"
    maker = get_matchmaker("redis", "zmq+redis://127.0.0.1:6379/0", ns)
    try:
        maker.register([Registration("ex", "rk", NO_POOL, addr(1))], ttl=5)
        client = redis.Redis()
        keys = list(client.scan_iter(match="{" + ns + "}:route:*"))
        assert len(keys) == 1
        assert 0 < client.pttl(keys[0]) <= 5000  # the key goes when its last member does
    finally:
        maker.purge()  # type: ignore[attr-defined]
