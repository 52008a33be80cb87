"""rabbit:// on a three-node RabbitMQ cluster with quorum queues, with nodes SIGKILLed in turn
under a stream of 10,000 notifications from a BackgroundNotifier.

The cluster is private (tidings.testing.rabbitcluster: three nodes of the installed RabbitMQ on
free ports, data on /dev/shm when there is one), started once for the module and killed with
its data afterwards; the shared broker on 5672 is never touched. Every client lists all three
nodes in its URL, each in its own order, so that the queue leaders, the listeners and the
notifier start on three different nodes and each kill hits one of them:

1. the node that leads every queue (the queues were declared through it),
2. the node the listeners are connected to (they fail over to the first node, back by then),
3. the node the notifier is connected to (it fails over too).

A killed node is started again, and its replicas are back online, before the next kill: a
three-node quorum queue keeps its majority through one node down, not two. A second test kills
the node that both leads a queue and carries the notifier's connection, the case where RabbitMQ
3.10 refuses a new channel's publishes for good (see the test's docstring).
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
from tidings.testing.rabbitcluster import RabbitCluster
from tidings.testing.rabbitnode import rabbitmq_installed
from tidings.transports.base import Binding

from .scenarios import FAST
from .support import (
    WAIT,
    LogWatch,
    Recorder,
    SendStream,
    started,
    summary,
    uid,
    unavailable,
    wait_until,
)

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
RETRY_LOG = "tidings.transports.retry"

N = 10_000
RATE = 400.0
"""Notifications offered per second: the stream has to outlast the three kills and restarts."""
SEGMENTS = (0, 2_500, 5_000, 7_500, N)
"""The stream is let through one segment per kill, so every kill lands mid-stream whatever the
machine's speed; the last segment runs after the third restart."""
MID_SEGMENT = 300
"""A kill waits until every pool has processed this many notifications of its segment."""
PREFETCH = 32
PIPELINE = 64


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three clustered private nodes for the module (about 20 s to start, in parallel)."""
    if not rabbitmq_installed():
        unavailable("RabbitMQ is not installed here, so no private cluster can be started "
                    "(apt-get install rabbitmq-server)")
    with RabbitCluster(3, tmpfs=True) as c:
        yield c


class PacedStream:
    """Offers keys 0..n-1 to a BackgroundNotifier at ``rate`` per second from its own thread,
    never past the limit ``allow()`` last set, and keeps how many it has offered."""

    def __init__(self, notifier: tidings.BackgroundNotifier, n: int, rate: float) -> None:
        self.notifier = notifier
        self.n = n
        self.rate = rate
        self.offered = 0
        self.errors: list[BaseException] = []
        self._limit = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-stream", daemon=True)

    def start(self) -> PacedStream:
        self._thread.start()
        return self

    def allow(self, limit: int) -> None:
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        self.allow(self.n)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            for key in range(self.n):
                with self._cond:
                    deadline = time.monotonic() + 4 * WAIT
                    while key >= self._limit:
                        if not self._cond.wait(deadline - time.monotonic()):
                            raise TimeoutError(f"the stream waited {4 * WAIT:.0f}s at {key}")
                if self._stop.is_set():
                    return
                self.notifier.info({}, "reliability.tick", {"key": key})
                self.offered = key + 1
                if key % 10 == 9:
                    self._stop.wait(10 / self.rate)  # the offered rate, not a synchronisation
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)


def _acked_since(recorder: Recorder, t0: float, min_key: int = 0) -> float | None:
    """Seconds from ``t0`` to the first processing at or after it of a key >= ``min_key``."""
    later = [t for t, k in recorder.ack_times()
             if t >= t0 and isinstance(k, int) and k >= min_key]
    return min(later) - t0 if later else None


def _each_processed(recorders: list[Recorder], count: int) -> Callable[[], bool]:
    """A condition: every recorder has processed ``count`` notifications."""
    return lambda: all(len(r.ack_times()) >= count for r in recorders)


def _each_acked_since(recorders: list[Recorder], t0: float,
                      min_key: int = 0) -> Callable[[], bool]:
    """A condition: every recorder has processed a key >= ``min_key`` since ``t0``."""
    return lambda: all(_acked_since(r, t0, min_key) is not None for r in recorders)


def test_quorum_pools_lose_nothing_while_three_nodes_are_sigkilled_in_turn(
        cluster: RabbitCluster, figures: Figures) -> None:
    """10,000 notifications from a BackgroundNotifier (pipeline 64, retry=None) to the no-pool
    group and two pools on quorum queues, each consumer in its own transport. The leader of
    every queue, then the listeners' node, then the notifier's node are SIGKILLed mid-stream,
    each started again before the next kill. Every pool processes every notification (lost 0,
    by the Jepsen-style checker); duplicates are counted and bounded; after each kill the
    time to the next notification processed in each pool is recorded, and the time to the
    first one sent after the kill."""
    cluster.start()  # every node, whatever an earlier test left down
    tag = uid()
    topic = f"cluster-{tag}"
    pools: dict[str, str | None] = {"group": None, "pool a": f"a-{tag}", "pool b": f"b-{tag}"}
    queues = {"group": f"{topic}.info", "pool a": f"a-{tag}", "pool b": f"b-{tag}"}
    query = f"quorum=true&prefetch={PREFETCH}&send_timeout=10&{FAST}"

    # Quorum queues are led by the node that declared them: declare all three through node 0.
    setup = tidings.get_notification_transport(cluster.url(order=[0], query=query))
    try:
        for pool in pools.values():
            setup.listen([Binding("openstack", f"{topic}.info")], pool, 1).close()
    finally:
        setup.cleanup()

    logs = {name: DeliveryLog() for name in pools}
    recorders = {name: Recorder(log) for name, log in logs.items()}
    everyone = list(recorders.values())
    transports = [tidings.get_notification_transport(cluster.url(order=[1, 0], query=query))
                  for _ in pools]
    sender = tidings.get_notification_transport(cluster.url(order=[2, 0], query=query))
    kills: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            retries = stack.enter_context(LogWatch(RETRY_LOG, "failed (attempt"))
            for (name, pool), transport in zip(pools.items(), transports, strict=True):
                stack.enter_context(started(tidings.get_notification_listener(
                    transport, [Target(topic=topic)], [recorders[name]], pool=pool)))
            notifier = tidings.BackgroundNotifier(sender, "reliability", topics=[topic],
                                                  retry=None, queue_size=N, pipeline=PIPELINE)
            stream = PacedStream(notifier, N, RATE).start()
            stack.callback(stream.stop)
            began = time.monotonic()

            def leader() -> str:
                # Node 0 leads them all unless an election moved one: take the node that
                # leads the most pool queues.
                led = cluster.leaders()
                pool_leaders = [led[q] for q in (queues["pool a"], queues["pool b"]) if q in led]
                assert pool_leaders, led
                return max(pool_leaders, key=pool_leaders.count)

            def connected(needle: str) -> Callable[[], str]:
                def find() -> str:
                    found = [c.node for c in cluster.connections() if needle in c.name]
                    assert len(found) == 1, (needle, cluster.connections())
                    return found[0]
                return find

            targets = [("leader", leader),
                       ("listener node", connected(f"listener pool '{pools['pool a']}'")),
                       ("notifier node", connected("tidings publisher"))]
            for i, (what, find) in enumerate(targets):
                # rabbitmqctl first (seconds on a busy machine), then the segment: the kill
                # follows its first few hundred at once, with the rest of it still to come.
                node = find()
                stream.allow(SEGMENTS[i + 1])
                goal = SEGMENTS[i] + MID_SEGMENT
                wait_until(_each_processed(everyone, goal),
                           f"{goal} notifications processed in every pool before killing the "
                           f"{what}")
                offered = stream.offered
                t_kill = time.monotonic()
                cluster.kill(node)
                wait_until(_each_acked_since(everyone, t_kill),
                           f"every pool processing again after the {what} was killed")
                wait_until(_each_acked_since(everyone, t_kill, offered),
                           f"a notification sent after the {what} was killed, in every pool")
                t_start = time.monotonic()
                cluster.start(node)
                started_s = time.monotonic() - t_start
                online_s = cluster.wait_members_online(queues.values(), timeout=WAIT)
                kills.append({
                    "what": what, "node": cluster.index(node), "offered": offered,
                    "next": {n: _acked_since(r, t_kill) for n, r in recorders.items()},
                    "fresh": {n: _acked_since(r, t_kill, offered)
                              for n, r in recorders.items()},
                    "restart_s": started_s, "online_s": online_s})
            stream.allow(N)
            assert stream.join(WAIT) and not stream.errors, stream.errors
            assert notifier.flush(2 * WAIT), f"{notifier.pending()} still unconfirmed"
            took = time.monotonic() - began
            stats = notifier.stats.snapshot()
            assert notifier.close(5)
            assert stats["sent"] == N and stats["failed"] == 0, stats
            for name, log in logs.items():
                for key in range(N):
                    log.sent(key)
                assert log.wait_acked(range(N), WAIT), (name, log.report().counts)
    finally:
        sender.cleanup()
        for transport in transports:
            transport.cleanup()

    # The kills hit three different nodes.
    assert sorted(k["node"] for k in kills) == [0, 1, 2], kills
    reports = {name: log.report() for name, log in logs.items()}
    for name, report in reports.items():
        # Per kill, in order (leader / listeners' node / notifier's node): seconds to the next
        # notification processed, and to the first one offered after the kill.
        extra: dict[str, Any] = {
            "next_s": "/".join(f"{k['next'][name]:.2f}" for k in kills),
            "first_new_s": "/".join(f"{k['fresh'][name]:.2f}" for k in kills)}
        if name == "group":
            extra.update(killed="/".join(str(k["node"]) for k in kills),
                         offered_at_kills="/".join(str(k["offered"]) for k in kills),
                         restart_s="/".join(f"{k['restart_s']:.1f}" for k in kills),
                         replicas_online_s="/".join(f"{k['online_s']:.1f}" for k in kills),
                         send_retries=retries.count, stream_s=round(took, 1))
        figures(f"rabbit cluster: quorum, 3 nodes SIGKILLed in turn ({name})",
                **summary(report),
                recovery_s=max(k["next"][name] for k in kills),
                **extra)
    for report in reports.values():
        report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Processed twice only: the listeners' windows when their node died, and a pipelined
    # batch (or a few single retries) whose confirmations died with a node.
    bound = len(kills) * (PREFETCH + PIPELINE)
    for name, report in reports.items():
        assert len(report.duplicated) <= bound, (name, report.counts)


def test_a_notifier_on_the_leaders_node_sends_on_after_that_node_is_sigkilled(
        cluster: RabbitCluster, figures: Figures) -> None:
    """The notifier is connected to the node that leads the quorum queue, and that node is
    SIGKILLed. The retry connects to another node, whose new channel publishes before the
    queue's record names the new leader: RabbitMQ 3.10 refuses that publish (basic.nack), and
    every later one on the same channel, for good. The driver takes a new connection after a
    refusal, so the sends (retry=None) go through within seconds and the listener, on a third
    node, processes every one."""
    cluster.start()
    victim, other, third = 0, 1, 2
    topic = f"leader-{uid()}"
    queue = f"{topic}.info"
    query = f"quorum=true&send_timeout=10&{FAST}"
    setup = tidings.get_notification_transport(cluster.url(order=[victim], query=query))
    try:
        setup.listen([Binding("openstack", queue)], None, 1).close()
    finally:
        setup.cleanup()
    log = DeliveryLog()
    endpoint = Recorder(log)
    receiving = tidings.get_notification_transport(cluster.url(order=[third, other],
                                                               query=query))
    sending = tidings.get_notification_transport(cluster.url(order=[victim, other],
                                                             query=query))
    try:
        listener = tidings.get_notification_listener(receiving, [Target(topic=topic)],
                                                     [endpoint])
        with started(listener), LogWatch("tidings.drivers.rabbit", "refused a message") as renewed:
            notifier = tidings.Notifier(sending, "reliability", topics=[topic], retry=None,
                                        raise_on_failure=True)
            before = SendStream(notifier, log, range(50)).start()
            assert before.join(WAIT) and not before.failed and not before.errors
            assert log.wait_acked(range(50), WAIT), log.report().counts
            led = cluster.leaders()
            publishers = [c.node for c in cluster.connections()
                          if "publisher" in c.name and "send-stream" in c.name]
            name = cluster.nodes[victim].node_name
            assert led.get(queue) == name and publishers == [name], (led, publishers)
            t_kill = time.monotonic()
            cluster.kill(victim)
            after = SendStream(notifier, log, range(50, 100)).start()
            assert after.join(WAIT), "the sends did not get through after the leader died"
            assert not after.failed and not after.errors, (after.failed, after.errors)
            assert log.wait_acked(range(100), WAIT), log.report().counts
    finally:
        sending.cleanup()
        receiving.cleanup()
    report = log.report()
    figures("rabbit cluster: the notifier's node led the queue, SIGKILLed", **summary(report),
            recovery_s=_acked_since(endpoint, t_kill),
            first_send_after_kill_s=after.done_times()[0][0] - t_kill,
            refused_then_reconnected=renewed.count)
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    assert len(report.duplicated) <= 1, report.duplicated
