"""nats:// on a private three-server JetStream cluster with replicated streams (``replicas=3``,
``retention=limits``: see QUERY), one server SIGKILLed in the middle of a stream of 3,000
notifications from a BackgroundNotifier.

The cluster is private (tidings.testing.natscluster: three ``nats-server -js`` processes of the
installed binary on free ports, routed to each other, stores on /dev/shm when there is one),
started once for the module and killed with its data afterwards; the shared server on 4222 is
never touched. Every client's URL lists the three servers. The victim is the server the
notifier is connected to, and before the kill the stream's leader and its consumers' leaders
are moved there (leader step-downs), so one SIGKILL takes out, at once, the notifier's
connection, the stream leader that confirms publishes and the consumer leaders that deliver;
listeners connected there (their servers are picked at random) lose their connections too.

Waits are on conditions with bounds, never bare sleeps; the test fails (never skips) in CI when
nats-server is missing, and skips naming it elsewhere.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tidings
from tidings import Target
from tidings.testing.checker import DeliveryLog
from tidings.testing.natscluster import NatsCluster, nats_server_binary

from .scenarios import FAST
from .support import WAIT, LogWatch, Recorder, started, summary, uid, unavailable, wait_until

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
RETRY_LOG = "tidings.transports.retry"

N = 3_000
RATE = 600.0
"""Notifications offered per second: the stream goes on through the kill and the failover."""
KILL_AT = 1_000
"""The kill waits until every group has processed this many (the stream is still offering)."""
PREFETCH = 32
PIPELINE = 64
MEMBERS = 2
"""Listeners per group, each on a transport (so a connection) of its own."""
QUERY = (f"replicas=3&retention=limits&max_age=600&ack_wait=2&send_timeout=2&prefetch={PREFETCH}&"
         + FAST.replace("connect_timeout=2", "connect_timeout=10"))
"""retention=limits: on nats-server before 2.11 a replicated stream with *interest* retention and
two consumers (the group and a pool) drops messages the slower consumer has not had yet, with or
without faults (docs/nats.md, "A JetStream cluster"), which is the server's loss, not the one
this test looks for;
ack_wait=2: what a lost connection held comes back after 2 s (30 s by default);
send_timeout=2: a publish whose ack died with the stream leader is retried after 2 s;
connect_timeout=10: also the bound on JetStream API calls; creating a replicated consumer
answers once the consumer's first leader is elected, which can take several seconds."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    """Three clustered private JetStream servers for the module (a second or two to start)."""
    if nats_server_binary() is None:
        unavailable("nats-server is not installed here, so no private NATS cluster can be "
                    "started (apt-get install nats-server)")
    with NatsCluster(3, tmpfs=True) as c:
        yield c


class PacedStream:
    """Offers keys ``first``..n-1 to a BackgroundNotifier at ``rate`` per second from its own
    thread; ``offered`` is the next key to offer."""

    def __init__(self, notifier: tidings.BackgroundNotifier, first: int, n: int,
                 rate: float) -> None:
        self.notifier = notifier
        self.first = first
        self.n = n
        self.rate = rate
        self.offered = first
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-stream", daemon=True)

    def start(self) -> PacedStream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            for key in range(self.first, self.n):
                if self._stop.is_set():
                    return
                self.notifier.info({}, "reliability.tick", {"key": key})
                self.offered = key + 1
                if key % 10 == 9:
                    self._stop.wait(10 / self.rate)  # the offered rate, not a synchronisation
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)


def _state(cluster: NatsCluster, stream: str) -> list[dict[str, Any]]:
    """What the running servers say of ``stream`` and its consumers, for failure messages."""
    out = []
    for detail in cluster.streams():
        if detail.get("name") == stream:
            out.append({"state": detail.get("state"), "cluster": detail.get("cluster"),
                        "consumers": [{k: c.get(k) for k in (
                            "name", "delivered", "ack_floor", "num_ack_pending",
                            "num_redelivered", "num_waiting", "num_pending", "cluster")}
                            for c in detail.get("consumer_detail") or []]})
    return out


def _processed_since(recorder: Recorder, t0: float, min_key: int = 0) -> float | None:
    """Seconds from ``t0`` to the first processing at or after it of a key >= ``min_key``."""
    later = [t for t, k in recorder.ack_times() if t >= t0 and k >= min_key]
    return min(later) - t0 if later else None


def test_replicated_stream_loses_nothing_when_its_leaders_server_is_sigkilled(
        cluster: NatsCluster, figures: Figures) -> None:
    """3,000 notifications from a BackgroundNotifier (pipeline 64, retry=None) to the no-pool
    group and a pool, two listeners each, on a stream with three replicas. Once every group has
    processed 1,000, the server that leads the stream and its consumers and carries the
    notifier's connection is SIGKILLed while the stream goes on. Every group processes every
    notification (lost 0, by the Jepsen-style checker), the notifier reports none failed,
    duplicates are counted and bounded, and the time to the next notification processed, and
    to the first one sent after the kill, is recorded."""
    cluster.start()  # every server, whatever an earlier test left down
    tag = uid()
    namespace, topic = f"cl-{tag}", "cluster"
    url = cluster.url(namespace, query=QUERY)
    pools: dict[str, str | None] = {"group": None, "pool": f"p-{tag}"}
    logs = {name: DeliveryLog() for name in pools}
    recorders = {name: Recorder(log) for name, log in logs.items()}
    everyone = list(recorders.values())
    listener_transports = [tidings.get_notification_transport(url)
                           for _ in range(MEMBERS * len(pools))]
    sender = tidings.get_notification_transport(url)
    stream_name = f"tidings_{namespace}_openstack"
    try:
        with contextlib.ExitStack() as stack:
            retries = stack.enter_context(LogWatch(RETRY_LOG, "failed (attempt"))
            for i, transport in enumerate(listener_transports):
                name = list(pools)[i % len(pools)]
                stack.enter_context(started(tidings.get_notification_listener(
                    transport, [Target(topic=topic)], [recorders[name]], pool=pools[name])))
            wait_until(lambda: len([c for c in cluster.leaders(stream_name) if c]) == len(pools),
                       "the stream and its consumers, with leaders")
            consumers = [c for c in cluster.leaders(stream_name) if c]
            notifier = tidings.BackgroundNotifier(sender, "reliability", topics=[topic],
                                                  retry=None, queue_size=N, pipeline=PIPELINE)
            began = time.monotonic()
            notifier.info({}, "reliability.tick", {"key": 0})  # the notifier connects
            assert notifier.flush(WAIT), "the first notification was not confirmed"

            # The victim: the notifier's server, made leader of the stream and its consumers.
            publisher = [i for i, name in cluster.connections() if "tidings publisher" in name]
            assert len(publisher) == 1, cluster.connections()
            victim = publisher[0]
            cluster.move_leaders(stream_name, victim, consumers)
            listeners_cut = sum(1 for i, name in cluster.connections()
                                if i == victim and "tidings listener" in name)

            stream = PacedStream(notifier, 1, N, RATE).start()
            stack.callback(stream.stop)
            wait_until(lambda: all(len(r.ack_times()) >= KILL_AT for r in everyone),
                       f"{KILL_AT} notifications processed in every group before the kill")
            offered = stream.offered
            unsent = N - offered + notifier.pending()
            assert unsent > 0, "every notification was confirmed before the kill: offer more"
            t_kill = time.monotonic()
            cluster.kill(victim)
            new_leader = cluster.stream_leader(stream_name, timeout=WAIT)
            elected_s = time.monotonic() - t_kill
            wait_until(lambda: all(_processed_since(r, t_kill, offered) is not None
                                   for r in everyone),
                       "a notification sent after the kill, processed in every group")
            assert stream.join(WAIT) and not stream.errors, stream.errors
            assert notifier.flush(WAIT), f"{notifier.pending()} notifications unconfirmed"
            took = time.monotonic() - began
            stats = notifier.stats.snapshot()
            assert notifier.close(5)
            assert stats["sent"] == N and stats["failed"] == 0, stats
            for log in logs.values():
                for key in range(N):
                    log.sent(key)
            for name, log in logs.items():
                assert log.wait_acked(range(N), WAIT), (
                    name, log.report().counts, sorted(log.report().lost)[:20],
                    _state(cluster, stream_name))
            rejoin_s = cluster.start(victim)
    finally:
        sender.cleanup()
        for transport in listener_transports:
            transport.cleanup()

    reports = {name: log.report() for name, log in logs.items()}
    for name, report in reports.items():
        extra: dict[str, Any] = {
            "first_new_s": round(_processed_since(recorders[name], t_kill, offered) or -1, 2)}
        if name == "group":
            extra.update(killed=victim, new_leader=new_leader, elected_s=round(elected_s, 2),
                         listeners_cut=listeners_cut, unsent_at_kill=unsent,
                         send_retries=retries.count,
                         rejoin_s=round(rejoin_s, 1), stream_s=round(took, 1))
        figures(f"nats cluster: replicas=3, leaders' server SIGKILLed ({name})",
                **summary(report), recovery_s=_processed_since(recorders[name], t_kill),
                **extra)
    for report in reports.values():
        report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Processed twice only: what a listener on the victim held (prefetch each) and what
    # listeners acknowledged to the dying consumer leader (redelivered after ack_wait).
    bound = MEMBERS * PREFETCH + PIPELINE
    for name, report in reports.items():
        assert len(report.duplicated) <= bound, (name, report.counts)
