"""sqlite matchmaker: the registry behind ``zmq://`` and ``zmq+sqlite:///path/file.db``, for
several processes on one host with nothing installed (no server; Python's own sqlite3).

The URL path is the database file. ``zmq+sqlite:///tidings.db`` is relative to the working
directory; an absolute path takes a fourth slash, as in SQLAlchemy:
``zmq+sqlite:////tmp/tidings.db`` (``zmq+sqlite:///%2Ftmp/tidings.db`` means the same). The file
and its tables are created on first use; the directory must exist. Without a path
(``zmq+sqlite://``, and plain ``zmq://``) it is the user's default registry,
``registry.db`` in :func:`runtime_dir`, so that every process of one user on one host finds the
others with no configuration.

The database runs in WAL mode with a busy timeout, so readers (notifiers looking up listeners)
never block the writers (listeners refreshing their entries) and concurrent writers queue up
instead of failing. Expiry uses the host's wall clock, which all processes on the host share.
It is meant for one host: sqlite over a network filesystem does not lock reliably.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tidings.matchmaker.base import MatchMaker, Member, Registration, check_ttl
from tidings.transports.errors import TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["DEFAULT_FILE", "SqliteMatchMaker", "runtime_dir"]

DEFAULT_FILE = "registry.db"

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tidings_registrations (
    namespace TEXT NOT NULL, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
    grp TEXT NOT NULL, address TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (namespace, exchange, routing_key, grp, address)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_generation (
    namespace TEXT PRIMARY KEY, generation INTEGER NOT NULL) WITHOUT ROWID;
"""


def _enable_wal(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Switch to WAL. When several processes open a new file at once, this switch can fail at
    once with "database is locked" (SQLite's busy timeout does not cover it), so try again,
    for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            pause.wait(0.05)


def runtime_dir() -> str:
    """The per-user directory of the default registry, created with mode 0700:
    ``$XDG_RUNTIME_DIR/tidings`` (a tmpfs only this user can read, emptied at logout), or else
    ``$XDG_CACHE_HOME/tidings`` (``~/.cache/tidings``). ValueError if it cannot be made, or if
    it is not a directory this user owns (another user's registry would let them direct our
    notifications); a directory of ours that others may read is narrowed to 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (os.path.isabs(base) and os.path.isdir(base)):
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "tidings")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
        uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            raise ValueError(f"{path!r} is not a directory owned by this user; remove it, or "
                             f"name a registry file: zmq+sqlite:////abs/path/tidings.db")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise ValueError(f"cannot create the default zmq registry directory {path!r} "
                         f"({exc.strerror or exc}); set XDG_RUNTIME_DIR, or name a registry "
                         f"file: zmq+sqlite:////abs/path/tidings.db") from None
    return path


class SqliteMatchMaker(MatchMaker):
    """A registry in one sqlite file shared by the processes of a host."""

    name = "sqlite"

    def __init__(self, url: TransportURL, namespace: str = "tidings") -> None:
        super().__init__(url, namespace)
        if url.hosts:
            raise ValueError(
                f"{url.masked()}: the sqlite matchmaker takes a file path, not a host; write "
                f"zmq+sqlite:////abs/path/tidings.db (absolute, four slashes) or "
                f"zmq+sqlite:///tidings.db (relative to the working directory)")
        self.path = os.path.abspath(url.virtual_host) if url.virtual_host else \
            os.path.join(runtime_dir(), DEFAULT_FILE)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """Open (or, in a forked child, reopen) the connection; the caller holds the lock."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise ValueError(f"sqlite matchmaker: directory {folder!r} of {self.path!r} does not "
                             f"exist; create it or use another path in the transport URL")
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise TransportUnreachable(
                f"sqlite matchmaker cannot open {self.path!r}: {exc}; check the path and its "
                f"permissions") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._connect()
            try:
                return fn(conn)
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # locked past the busy timeout
                    raise TransportUnreachable(
                        f"sqlite matchmaker {self.path!r} failed while {what}: {exc}") from exc
                raise

    @staticmethod
    def _bump(conn: sqlite3.Connection, namespace: str) -> None:
        conn.execute("INSERT INTO tidings_generation (namespace, generation) VALUES (?, 1) "
                     "ON CONFLICT (namespace) DO UPDATE SET generation = generation + 1",
                     (namespace,))

    # -- the contract -----------------------------------------------------------------------
    def register(self, registrations: Sequence[Registration], ttl: float) -> int:
        ttl = check_ttl(ttl)
        ns = self.namespace

        def do(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            added = 0
            for r in registrations:
                key = (ns, r.exchange, r.routing_key, r.group, r.address)
                cur = conn.execute(
                    "UPDATE tidings_registrations SET expires = ? WHERE namespace = ? AND "
                    "exchange = ? AND routing_key = ? AND grp = ? AND address = ? "
                    "AND expires > ?", (now + ttl, *key, now))
                if cur.rowcount == 0:
                    conn.execute("INSERT OR REPLACE INTO tidings_registrations VALUES "
                                 "(?, ?, ?, ?, ?, ?)", (*key, now + ttl))
                    added += 1
            if added:
                # Forget the long dead now and then, so the table does not grow for ever.
                conn.execute("DELETE FROM tidings_registrations WHERE namespace = ? AND "
                             "expires < ?", (ns, now - 60.0))
                self._bump(conn, ns)
            conn.execute("COMMIT")
            return added

        return self._run("registering", do)

    def unregister(self, registrations: Sequence[Registration]) -> None:
        ns = self.namespace

        def do(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            removed = 0
            for r in registrations:
                removed += conn.execute(
                    "DELETE FROM tidings_registrations WHERE namespace = ? AND exchange = ? AND "
                    "routing_key = ? AND grp = ? AND address = ?",
                    (ns, r.exchange, r.routing_key, r.group, r.address)).rowcount
            if removed:
                self._bump(conn, ns)
            conn.execute("COMMIT")

        self._run("unregistering", do)

    def lookup(self, exchange: str, routing_key: str) -> dict[str, list[Member]]:
        def do(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            return conn.execute(
                "SELECT grp, address, expires FROM tidings_registrations WHERE namespace = ? "
                "AND exchange = ? AND routing_key = ? AND expires > ? ORDER BY grp, address",
                (self.namespace, exchange, routing_key, time.time())).fetchall()

        rows = self._run("looking up listeners", do)
        now = time.time()
        out: dict[str, list[Member]] = {}
        for group, address, expires in rows:
            out.setdefault(group, []).append(Member(address, expires - now))
        return out

    def generation(self) -> int:
        def do(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT generation FROM tidings_generation WHERE namespace = ?",
                               (self.namespace,)).fetchone()
            return int(row[0]) if row else 0

        return self._run("reading the generation", do)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def describe(self) -> str:
        return f"sqlite matchmaker {self.path} namespace={self.namespace!r}"
