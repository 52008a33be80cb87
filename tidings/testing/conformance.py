"""The conformance suite: what every tidings driver promises, as one reusable set of tests.

A driver's test module enables it in two steps (see docs/conformance.md)::

    import pytest
    from tidings.testing.conformance import DriverConformance

    @pytest.fixture
    def tidings_url_factory():
        made = []
        def make():                      # a new, isolated URL on every call
            made.append(new_vhost())
            return f"mydriver://127.0.0.1/{made[-1]}"
        yield make
        for vhost in made:               # clean up after the test
            delete_vhost(vhost)

    class TestMyDriverConformance(DriverConformance):
        pass

The suite reads the driver's declared :class:`~tidings.transports.base.Capabilities` from a
loaded transport (never from the URL scheme) and runs what applies. A feature the driver does not
declare has its tests skipped with the reason, and a refusal test runs instead, checking that
building a listener that needs the feature raises ``NotImplementedError`` before ``start()``.
A driver that declares a feature and fails its tests fails the suite: declarations are promises.

Each scenario is a separate test named for the promise it checks, uses the public API where it
can and the driver level (``Transport.listen`` / ``IncomingMessage``) where the promise is about
the driver itself (double settlement, prefetch, close). Delivery-count scenarios end with the
Jepsen-style checker of :mod:`tidings.testing.checker`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from tidings.notify.dispatcher import PRIORITIES, NotificationResult
from tidings.notify.filter import NotificationFilter
from tidings.notify.listener import get_batch_notification_listener, get_notification_listener
from tidings.notify.notifier import BackgroundNotifier
from tidings.testing.checker import DeliveryLog
from tidings.testing.conformance_harness import (
    Harness,
    Inbox,
    MemberGate,
    Received,
    RecordingBatchEndpoint,
    RecordingEndpoint,
)
from tidings.transports.base import Binding, Capabilities, Option
from tidings.transports.errors import InvalidTransportOption, TransportClosed
from tidings.transports.loader import load_driver_class
from tidings.transports.signing import SignatureError, SigningKeys
from tidings.transports.transport import CORE_OPTIONS, get_notification_transport
from tidings.transports.url import TransportHost

__all__ = ["DriverConformance", "Harness", "Inbox", "Received", "RecordingEndpoint"]


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name}={raw!r} must be a number of seconds") from None


class DriverConformance:
    """Subclass as ``Test<Driver>Conformance`` and provide a ``tidings_url_factory`` fixture.

    Class attributes a driver may override (sparingly; they are bounds, not tolerances):
    ``timeout`` bounds every wait for something that must happen; ``quiet`` is the window in
    which something that must not happen is watched for; ``bulk_messages`` and
    ``bulk_notifiers`` size the throughput scenario.
    """

    timeout: ClassVar[float] = _env_float("TIDINGS_CONFORMANCE_TIMEOUT", 15.0)
    quiet: ClassVar[float] = _env_float("TIDINGS_CONFORMANCE_QUIET", 0.6)
    bulk_messages: ClassVar[int] = 10_000
    bulk_notifiers: ClassVar[int] = 4
    bulk_timeout: ClassVar[float] = _env_float("TIDINGS_CONFORMANCE_BULK_TIMEOUT", 120.0)

    @pytest.fixture
    def tidings_harness(self, tidings_url_factory: Any) -> Iterator[Harness]:
        """One fresh URL per test; everything built from it is torn down after the test."""
        url = tidings_url_factory()
        h = Harness(url, timeout=self.timeout, quiet=self.quiet)
        try:
            yield h
        finally:
            h.close()

    # == the declaration itself ===========================================================
    def test_capabilities_are_declared_consistently(self, tidings_harness: Harness) -> None:
        """Capabilities are data the core can check; dependent flags come with their base."""
        caps = tidings_harness.capabilities
        assert isinstance(caps, Capabilities), (
            f"{tidings_harness.driver_name}: capabilities must be a tidings.transports.base."
            f"Capabilities instance, not {type(caps).__name__}")
        assert tidings_harness.driver_name, "the driver class must set a non-empty `name`"
        if caps.requeue_to_other_member:
            assert caps.requeue, "requeue_to_other_member is declared without requeue"
        for name, opt in load_driver_class(tidings_harness.base_url.driver).options.items():
            assert isinstance(opt, Option), f"option {name!r} must be an Option"
            assert name not in CORE_OPTIONS, f"option {name!r} redeclares a core option"

    # == sending and receiving ============================================================
    def test_send_receive(self, tidings_harness: Harness) -> None:
        """One notification arrives once, whole: context, publisher, event type, payload."""
        h = tidings_harness
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        ctxt = {"user_id": "u-1", "request_id": f"req-{h.uid}"}
        payload = {"key": "one", "size": 3, "tags": ["a", "b"], "nested": {"x": 1.5}}
        h.notifier().info(ctxt, "conformance.simple", payload)
        got = inbox.wait_keys(["one"], h.timeout)
        assert len(got) == 1
        r: Received = got[0]
        assert (r.method, r.event_type, r.publisher_id) == ("info", "conformance.simple",
                                                             "conformance.host")
        assert r.payload == payload
        assert r.ctxt == ctxt
        assert r.metadata["message_id"] and r.metadata["timestamp"]

    def test_send_receive_v1_format(self, tidings_harness: Harness) -> None:
        """The unversioned ``messaging`` format (no envelope) is received the same way."""
        h = tidings_harness
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        h.notifier(driver="messaging").warn({"a": 1}, "conformance.v1", {"key": "v1"})
        r = inbox.wait_keys(["v1"], h.timeout)[0]
        assert (r.method, r.event_type, r.ctxt) == ("warn", "conformance.v1", {"a": 1})

    def test_every_priority_reaches_its_method(self, tidings_harness: Harness) -> None:
        """Each priority is routed to the endpoint method of that name, and only to it."""
        h = tidings_harness
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        n = h.notifier()
        sends = {"audit": n.audit, "debug": n.debug, "info": n.info, "warn": n.warn,
                 "warning": n.warning, "error": n.error, "critical": n.critical,
                 "sample": n.sample}
        for name, send in sends.items():
            send({}, f"conformance.{name}", {"key": name})
        got = inbox.wait_keys(sends, h.timeout)
        assert sorted(r.key for r in got) == sorted(sends)
        methods = {r.key: r.method for r in got}
        expected = {name: ("warn" if name == "warning" else name) for name in sends}
        assert methods == expected
        assert set(expected.values()) == set(PRIORITIES)

    def test_several_topics_on_one_listener(self, tidings_harness: Harness) -> None:
        """One listener with several targets receives from each of them."""
        h = tidings_harness
        inbox = Inbox()
        t1, t2 = f"{h.topic}-a", f"{h.topic}-b"
        h.listener([RecordingEndpoint(inbox)], [h.target(t1), h.target(t2)])
        h.notifier(topics=[t1]).info({}, "conformance.topics", {"key": "from-a"})
        h.notifier(topics=[t2]).error({}, "conformance.topics", {"key": "from-b"})
        got = inbox.wait_keys(["from-a", "from-b"], h.timeout)
        assert Counter(r.key for r in got) == {"from-a": 1, "from-b": 1}

    def test_independent_topics(self, tidings_harness: Harness) -> None:
        """A listener on one topic never sees another topic's messages."""
        h = tidings_harness
        inbox = Inbox()
        t1, t2 = f"{h.topic}-a", f"{h.topic}-b"
        h.listener([RecordingEndpoint(inbox, "A")], [h.target(t1)])
        h.listener([RecordingEndpoint(inbox, "B")], [h.target(t2)])
        na, nb = h.notifier(topics=[t1]), h.notifier(topics=[t2])
        # Uneven counts, one side after the other: two listeners wrongly sharing one queue
        # would each get a mix, whatever order the broker hands messages out in.
        for i in range(4):
            na.info({}, "conformance.topic", {"key": f"a{i}"})
        for i in range(3):
            nb.info({}, "conformance.topic", {"key": f"b{i}"})
        # Sentinels last: a message wrongly routed to the other topic's queue would sit before
        # them in that queue, so once both sentinels are in, nothing misrouted is still coming.
        na.info({}, "conformance.topic", {"key": "a-end"})
        nb.info({}, "conformance.topic", {"key": "b-end"})
        inbox.wait_keys(["a0", "a1", "a2", "a3", "a-end"], h.timeout, member="A")
        inbox.wait_keys(["b0", "b1", "b2", "b-end"], h.timeout, member="B")
        assert sorted(inbox.keys("A")) == ["a-end", "a0", "a1", "a2", "a3"]
        assert sorted(inbox.keys("B")) == ["b-end", "b0", "b1", "b2"]

    def test_exchange_isolation(self, tidings_harness: Harness) -> None:
        """Same topic on two exchanges: each listener sees only its own exchange's messages."""
        h = tidings_harness
        h.require("exchanges")
        inbox = Inbox()
        xa, xb = f"xa-{h.uid}", f"xb-{h.uid}"
        h.listener([RecordingEndpoint(inbox, "A")], [h.target(exchange=xa)])
        h.listener([RecordingEndpoint(inbox, "B")], [h.target(exchange=xb)])
        na, nb = h.notifier(exchange=xa), h.notifier(exchange=xb)
        for i in range(4):
            na.info({}, "conformance.exchange", {"key": f"a{i}"})
        for i in range(3):
            nb.info({}, "conformance.exchange", {"key": f"b{i}"})
        na.info({}, "conformance.exchange", {"key": "a-end"})
        nb.info({}, "conformance.exchange", {"key": "b-end"})
        inbox.wait_keys(["a0", "a1", "a2", "a3", "a-end"], h.timeout, member="A")
        inbox.wait_keys(["b0", "b1", "b2", "b-end"], h.timeout, member="B")
        assert sorted(inbox.keys("A")) == ["a-end", "a0", "a1", "a2", "a3"]
        assert sorted(inbox.keys("B")) == ["b-end", "b0", "b1", "b2"]

    def test_default_exchange_is_the_transports(self, tidings_harness: Harness) -> None:
        """A transport's default_exchange is where Targets without an exchange go."""
        h = tidings_harness
        inbox = Inbox()
        exchange = f"dx-{h.uid}"
        t = h.transport(default_exchange=exchange)
        h.listener([RecordingEndpoint(inbox)], [h.target(exchange=exchange)])
        h.notifier(t).info({}, "conformance.default-exchange", {"key": "dx"})
        inbox.wait_keys(["dx"], h.timeout)

    # == groups and pools =================================================================
    def _gated_members(self, h: Harness, inbox: Inbox, names: list[str],
                       gate: MemberGate) -> list[RecordingEndpoint]:
        return [RecordingEndpoint(inbox, name, on_message=lambda r: gate.arrive(r.member))
                for name in names]

    def test_no_pool_group_delivers_each_message_once(self, tidings_harness: Harness) -> None:
        """Listeners without a pool form one group: each message once across it, all get some."""
        h = tidings_harness
        inbox = Inbox()
        members = ["A", "B", "C"]
        gate = MemberGate(members, min(5.0, h.timeout))
        for ep in self._gated_members(h, inbox, members, gate):
            h.listener([ep], prefetch=2)
        keys = [f"m{i}" for i in range(30)]
        n = h.notifier()
        for k in keys:
            n.info({}, "conformance.group", {"key": k})
        inbox.wait_keys(keys, h.timeout)
        counts = Counter(inbox.keys())
        assert counts == dict.fromkeys(keys, 1), f"duplicates: {counts - Counter(keys)}"
        per_member = Counter(r.member for r in inbox.items)
        assert set(per_member) == set(members), f"a member got nothing: {dict(per_member)}"

    def test_pools_get_one_copy_each_split_inside(self, tidings_harness: Harness) -> None:
        """Every pool (and the no-pool group) gets its own copy; members of a pool split it."""
        h = tidings_harness
        h.require("pools", instead="test_pools_undeclared_raise_not_implemented")
        inbox = Inbox()
        gate = MemberGate(["p1-a", "p1-b"], min(5.0, h.timeout))
        p1, p2 = f"p1-{h.uid}", f"p2-{h.uid}"
        for ep in self._gated_members(h, inbox, ["p1-a", "p1-b"], gate):
            h.listener([ep], pool=p1, prefetch=2)
        h.listener([RecordingEndpoint(inbox, "p2")], pool=p2)
        h.listener([RecordingEndpoint(inbox, "group")])
        keys = [f"m{i}" for i in range(20)]
        n = h.notifier()
        for k in keys:
            n.info({}, "conformance.pools", {"key": k})
        inbox.wait_keys(keys, h.timeout, member="p2")
        inbox.wait_keys(keys, h.timeout, member="group")
        inbox.wait_for(lambda items: set(keys) <= {r.key for r in items
                                                   if r.member.startswith("p1")},
                       h.timeout, "every message in pool p1")
        p1_keys = inbox.keys("p1-a") + inbox.keys("p1-b")
        assert Counter(p1_keys) == dict.fromkeys(keys, 1), "pool p1 must get each message once"
        assert inbox.keys("p1-a") and inbox.keys("p1-b"), "both members of p1 must get some"
        assert Counter(inbox.keys("p2")) == dict.fromkeys(keys, 1)
        assert Counter(inbox.keys("group")) == dict.fromkeys(keys, 1)

    def test_pool_joining_late_gets_what_is_sent_after(self, tidings_harness: Harness) -> None:
        """A pool that joins late receives everything sent after it joined, nothing from before,
        and its arrival takes nothing from the pools already there."""
        h = tidings_harness
        h.require("pools", instead="test_pools_undeclared_raise_not_implemented")
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox, "early")], pool=f"early-{h.uid}")
        n = h.notifier()
        before = [f"before{i}" for i in range(5)]
        after = [f"after{i}" for i in range(5)]
        for k in before:
            n.info({}, "conformance.late", {"key": k})
        inbox.wait_keys(before, h.timeout, member="early")
        h.listener([RecordingEndpoint(inbox, "late")], pool=f"late-{h.uid}")
        for k in after:
            n.info({}, "conformance.late", {"key": k})
        inbox.wait_keys(after, h.timeout, member="late")
        inbox.wait_keys(after, h.timeout, member="early")
        assert sorted(inbox.keys("late")) == sorted(after)
        assert Counter(inbox.keys("early")) == dict.fromkeys(before + after, 1)

    def test_member_joining_late_shares_the_work(self, tidings_harness: Harness) -> None:
        """A member joining a running group takes a share of what follows, and nothing twice."""
        h = tidings_harness
        inbox = Inbox()
        gate = MemberGate(["A", "B"], min(5.0, h.timeout))
        opened = threading.Event()

        def first_member(r: Received) -> None:
            if opened.is_set():
                gate.arrive("A")

        h.listener([RecordingEndpoint(inbox, "A", on_message=first_member)], prefetch=2)
        n = h.notifier()
        before = [f"before{i}" for i in range(6)]
        after = [f"after{i}" for i in range(20)]
        for k in before:
            n.info({}, "conformance.late-member", {"key": k})
        inbox.wait_keys(before, h.timeout, member="A")
        opened.set()
        h.listener([RecordingEndpoint(inbox, "B", on_message=lambda r: gate.arrive("B"))],
                   prefetch=2)
        for k in after:
            n.info({}, "conformance.late-member", {"key": k})
        inbox.wait_keys(after, h.timeout)
        assert Counter(inbox.keys()) == dict.fromkeys(before + after, 1)
        assert inbox.keys("B"), "the member that joined late got none of the new messages"
        assert not set(inbox.keys("B")) & set(before)

    # == requeue ==========================================================================
    def test_requeue_comes_back(self, tidings_harness: Harness) -> None:
        """An endpoint returning REQUEUE (allow_requeue=True) gets the message again."""
        h = tidings_harness
        h.require("requeue", instead="test_requeue_undeclared_raises_not_implemented")
        inbox = Inbox()
        seen: Counter[Any] = Counter()

        def once_requeue(r: Received) -> Any:
            seen[r.key] += 1
            if r.key == "again" and seen[r.key] == 1:
                return NotificationResult.REQUEUE
            return None

        listener = h.listener([RecordingEndpoint(inbox, on_message=once_requeue)],
                              allow_requeue=True)
        n = h.notifier()
        n.info({}, "conformance.requeue", {"key": "again"})
        n.info({}, "conformance.requeue", {"key": "plain"})
        inbox.wait_for(lambda items: [r.key for r in items].count("again") >= 2
                       and "plain" in [r.key for r in items], h.timeout,
                       "the requeued message a second time")
        h.stop(listener)
        stats = listener.stats.snapshot()
        assert stats["requeued"] == 1 and stats["acknowledged"] == 2, stats
        assert Counter(inbox.keys()) == {"again": 2, "plain": 1}

    def test_requeue_reaches_another_member_when_first_is_gone(
            self, tidings_harness: Harness) -> None:
        """A message requeued by a member that then leaves is delivered to another member."""
        h = tidings_harness
        h.require("requeue", "requeue_to_other_member")
        inbox = Inbox()
        b_joined = threading.Event()
        holder: dict[str, Any] = {}

        def a_gives_up(r: Received) -> Any:
            assert b_joined.wait(h.timeout), "member B never joined"
            holder["a"].stop()
            return NotificationResult.REQUEUE

        a = h.listener([RecordingEndpoint(inbox, "A", on_message=a_gives_up)],
                       allow_requeue=True, start=False)
        holder["a"] = a
        a.start()
        h.notifier().info({}, "conformance.requeue-other", {"key": "x"})
        inbox.wait_keys(["x"], h.timeout, member="A")
        h.listener([RecordingEndpoint(inbox, "B")], allow_requeue=True)
        b_joined.set()
        inbox.wait_keys(["x"], h.timeout, member="B",
                        what="the message member A requeued, at member B")
        assert a.wait(h.timeout), "member A did not stop"
        assert inbox.keys("B") == ["x"]

    # == refusing what is not declared ====================================================
    def test_pools_undeclared_raise_not_implemented(self, tidings_harness: Harness) -> None:
        """Without 'pools', building a pooled listener raises NotImplementedError at once."""
        h = tidings_harness
        h.require_absent("pools", "the pool")
        t = h.transport()
        endpoint = RecordingEndpoint(Inbox())
        with pytest.raises(NotImplementedError, match="pool"):
            get_notification_listener(t, [h.target()], [endpoint], pool="p")
        with pytest.raises(NotImplementedError, match="pool"):
            get_batch_notification_listener(t, [h.target()], [endpoint], pool="p",
                                            batch_size=2)
        with pytest.raises(NotImplementedError, match="pool"):
            t.join_consumer_pool(lambda m: None, "p", f"{h.topic}.info")
        with pytest.raises(NotImplementedError, match="pool"):
            t.listen([Binding(h.default_exchange, f"{h.topic}.info")], "p")

    def test_requeue_undeclared_raises_not_implemented(self, tidings_harness: Harness) -> None:
        """Without 'requeue', building a listener with allow_requeue=True raises at once."""
        h = tidings_harness
        h.require_absent("requeue", "the requeue")
        t = h.transport()
        endpoint = RecordingEndpoint(Inbox())
        with pytest.raises(NotImplementedError, match="requeue"):
            get_notification_listener(t, [h.target()], [endpoint], allow_requeue=True)
        with pytest.raises(NotImplementedError, match="requeue"):
            get_batch_notification_listener(t, [h.target()], [endpoint], allow_requeue=True,
                                            batch_size=2)
        # allow_requeue=False is always fine, and the listener works
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        h.notifier().info({}, "conformance.no-requeue", {"key": "ok"})
        inbox.wait_keys(["ok"], h.timeout)

    # == batches and filters ==============================================================
    def test_batch_size(self, tidings_harness: Harness) -> None:
        """A batch listener hands over full batches of batch_size."""
        h = tidings_harness
        inbox = Inbox()
        endpoint = RecordingBatchEndpoint(inbox)
        h.batch_listener([endpoint], batch_size=5, batch_timeout=60)
        keys = [f"m{i}" for i in range(10)]
        n = h.notifier()
        for k in keys:
            n.info({}, "conformance.batch", {"key": k})
        inbox.wait_keys(keys, h.timeout)
        assert [len(b) for b in endpoint.batches] == [5, 5], endpoint.batches
        assert sorted(k for b in endpoint.batches for k in b) == sorted(keys)

    def test_batch_timeout(self, tidings_harness: Harness) -> None:
        """A partial batch is flushed once batch_timeout has passed since its first message."""
        h = tidings_harness
        inbox = Inbox()
        endpoint = RecordingBatchEndpoint(inbox)
        h.batch_listener([endpoint], batch_size=100, batch_timeout=0.5)
        began = time.monotonic()
        n = h.notifier()
        for k in ("a", "b", "c"):
            n.info({}, "conformance.batch-timeout", {"key": k})
        inbox.wait_keys(["a", "b", "c"], h.timeout)
        elapsed = time.monotonic() - began
        assert elapsed >= 0.45, f"a partial batch was flushed after {elapsed:.2f}s, before " \
                                f"batch_timeout=0.5"
        assert sum(len(b) for b in endpoint.batches) == 3
        assert all(len(b) <= 3 for b in endpoint.batches)

    def test_batch_groups_priorities(self, tidings_harness: Harness) -> None:
        """A batch method gets only its own priority's notifications."""
        h = tidings_harness
        inbox = Inbox()
        endpoint = RecordingBatchEndpoint(inbox)
        h.batch_listener([endpoint], batch_size=4, batch_timeout=0.3)
        n = h.notifier()
        n.info({}, "e", {"key": "i1"})
        n.error({}, "e", {"key": "e1"})
        n.info({}, "e", {"key": "i2"})
        n.error({}, "e", {"key": "e2"})
        got = inbox.wait_keys(["i1", "i2", "e1", "e2"], h.timeout)
        assert {r.key: r.method for r in got} == {"i1": "info", "i2": "info", "e1": "error",
                                                  "e2": "error"}

    def test_filters(self, tidings_harness: Harness) -> None:
        """Endpoints with a filter_rule see only what matches; the rest is still acknowledged."""
        h = tidings_harness
        inbox = Inbox()
        compute = RecordingEndpoint(inbox, "compute",
                                    filter_rule=NotificationFilter(event_type=r"^compute\."))
        api = RecordingEndpoint(inbox, "api", filter_rule=NotificationFilter(
            publisher_id=r"^api", payload={"state": "^active$"}))
        ctx = RecordingEndpoint(inbox, "ctx",
                                filter_rule=NotificationFilter(context={"project": "^p1$"}))
        everything = RecordingEndpoint(inbox, "all")
        listener = h.listener([compute, api, ctx, everything])
        sends: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
                 ("compute.host", "compute.instance.create", {"state": "active"}, {}, "c1"),
                 ("api.host", "image.upload", {"state": "active"}, {"project": "p1"}, "a1"),
                 ("api.host", "image.delete", {"state": "deleted"}, {}, "a2"),
                 ("other", "volume.attach", {"state": 1}, {"project": "p2"}, "o1")]
        for publisher, event, payload, ctxt, key in sends:
            h.notifier(publisher_id=publisher).info(ctxt, event, {**payload, "key": key})
        inbox.wait_keys(["c1", "a1", "a2", "o1"], h.timeout, member="all")
        h.stop(listener)
        assert sorted(inbox.keys("compute")) == ["c1"]
        assert sorted(inbox.keys("api")) == ["a1"]
        assert sorted(inbox.keys("ctx")) == ["a1"]
        assert sorted(inbox.keys("all")) == ["a1", "a2", "c1", "o1"]
        assert listener.stats.snapshot()["acknowledged"] == 4

    # == lifecycle ========================================================================
    def test_stop_with_messages_in_flight_loses_nothing(self, tidings_harness: Harness) -> None:
        """Stopping with messages received but unacknowledged hands them to the next member:
        the checker finds nothing lost and nothing acknowledged twice."""
        h = tidings_harness
        h.require("at_least_once")
        log = DeliveryLog()
        keys = [f"m{i}" for i in range(12)]
        holder: dict[str, Any] = {}

        def first_batch_then_stop(batch: list[Received]) -> None:
            for r in batch:
                log.acked(r.key)
            holder["first"].stop()

        inbox = Inbox()
        for r_key in keys:
            log.sent(r_key)
        first = h.batch_listener(
            [RecordingBatchEndpoint(inbox, "first", on_batch=first_batch_then_stop)],
            batch_size=5, batch_timeout=60, start=False)
        holder["first"] = first
        first.start()
        n = h.notifier()
        for k in keys:
            n.info({}, "conformance.in-flight", {"key": k})
        assert first.wait(h.timeout), "the first listener did not stop"
        acked_first = log.acked_ids()
        assert len(acked_first) == 5, f"the first listener handled {sorted(map(str, acked_first))}"

        def record(r: Received) -> None:
            log.delivered(r.key)
            log.acked(r.key)

        h.listener([RecordingEndpoint(inbox, "second", on_message=record)])
        assert log.wait_acked(keys, h.timeout), (
            f"never acknowledged: {sorted(set(keys) - log.acked_ids())}")
        report = log.report()
        report.assert_valid(at_least_once=True, allow_duplicates=False)
        assert not set(inbox.keys("second")) & acked_first

    def test_close_returns_unsettled_messages(self, tidings_harness: Harness) -> None:
        """Driver level: close() gives back every unsettled message, and only those."""
        h = tidings_harness
        h.require("at_least_once")
        t = h.transport()
        binding = Binding(h.default_exchange, f"{h.topic}.info")
        first = h.raw_listener(t, [binding], prefetch=10)
        keys = [f"m{i}" for i in range(5)]
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), keys)
        got = h.poll_until(first, 5)
        assert sorted(h.key_of(m) for m in got) == keys
        for m in got[:2]:
            assert m.ack()
        h.close_raw(first)
        second = h.raw_listener(t, [binding], prefetch=10)
        back = h.poll_until(second, 3)
        back += h.poll_quiet(second)
        assert sorted(h.key_of(m) for m in back) == sorted(h.key_of(m) for m in got[2:])
        for m in back:
            assert m.ack()

    def test_start_stop_start_again(self, tidings_harness: Harness) -> None:
        """A stopped listener can be started again and receives again."""
        h = tidings_harness
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)])
        n = h.notifier()
        n.info({}, "conformance.restart", {"key": "first"})
        inbox.wait_keys(["first"], h.timeout)
        h.stop(listener)
        assert not listener.running
        expected = ["first", "second"]
        if h.has("stores_without_listener"):
            n.info({}, "conformance.restart", {"key": "while-stopped"})
            expected.append("while-stopped")
        listener.start()
        listener.start()  # a second start() while running is a no-op
        n.info({}, "conformance.restart", {"key": "second"})
        inbox.wait_keys(expected, h.timeout)
        h.stop(listener)
        assert Counter(inbox.keys()) == dict.fromkeys(expected, 1)

    def test_sent_before_listener_starts_waits(self, tidings_harness: Harness) -> None:
        """With stores_without_listener, a notification sent before any listener is kept."""
        h = tidings_harness
        h.require("stores_without_listener")
        n = h.notifier()
        for k in ("early1", "early2"):
            n.info({}, "conformance.early", {"key": k})
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        inbox.wait_keys(["early1", "early2"], h.timeout)

    # == payloads =========================================================================
    def test_one_mib_payload(self, tidings_harness: Harness) -> None:
        """A 1 MiB payload arrives intact."""
        h = tidings_harness
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        chunk = hashlib.sha256(h.uid.encode()).hexdigest()
        blob = (chunk * (1024 * 1024 // len(chunk) + 1))[:1024 * 1024]
        h.notifier().info({}, "conformance.big", {"key": "big", "blob": blob})
        r = inbox.wait_keys(["big"], h.timeout)[0]
        assert len(r.payload["blob"]) == len(blob)
        assert r.payload["blob"] == blob

    def test_non_ascii_payload(self, tidings_harness: Harness) -> None:
        """Non-ASCII text survives in payload, context, event type and publisher, v1 and v2."""
        h = tidings_harness
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox)])
        text = "naïve café — 日本語 — Ελληνικά — עברית — 🎉🚀 — \u2028 — \\ \" '"
        ctxt = {"user_name": "Zoë Ñandú", "note": text}
        for driver in ("messagingv2", "messaging"):
            n = h.notifier(driver=driver, publisher_id="compute.höst-ü")
            n.info(ctxt, "conformance.ünïcode", {"key": driver, "text": text, text: [text]})
        got = inbox.wait_keys(["messagingv2", "messaging"], h.timeout)
        for r in got:
            assert r.payload["text"] == text and r.payload[text] == [text]
            assert r.ctxt == ctxt
            assert r.event_type == "conformance.ünïcode"
            assert r.publisher_id == "compute.höst-ü"

    # == volume ===========================================================================
    @pytest.mark.slow
    def test_many_messages_from_concurrent_notifiers(self, tidings_harness: Harness) -> None:
        """10,000 notifications from 4 notifier threads into a 2-member group: the checker finds
        none lost, none acknowledged twice, none unexpected, and prefetch is never exceeded."""
        h = tidings_harness
        log = DeliveryLog()
        prefetch = 32
        over_prefetch: list[dict[str, Any]] = []
        listeners: list[Any] = []

        def endpoint_for(member: str) -> RecordingEndpoint:
            def record(r: Received) -> None:
                log.delivered(r.key)
                log.acked(r.key)
                if h.has("prefetch"):
                    snap = listeners[members.index(member)].stats.snapshot()
                    if snap["in_flight"] > prefetch:
                        over_prefetch.append(snap)
            return RecordingEndpoint(_NullInbox(), member, on_message=record)

        members = ["A", "B"]
        for member in members:
            listeners.append(h.listener([endpoint_for(member)], prefetch=prefetch, start=False))
        for listener in listeners:
            listener.start()
        total, senders = self.bulk_messages, self.bulk_notifiers
        keys = [f"s{s}-{i}" for s in range(senders) for i in range(total // senders)]
        errors: list[BaseException] = []

        transports = [h.transport() for _ in range(senders)]

        def send(sender: int) -> None:
            n = h.notifier(transports[sender], publisher_id=f"sender-{sender}")
            try:
                for i in range(total // senders):
                    key = f"s{sender}-{i}"
                    try:
                        n.info({}, "conformance.bulk", {"key": key})
                    except Exception:
                        log.send_failed(key)
                        raise
                    log.sent(key)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(s,), name=f"conformance-sender-{s}")
                   for s in range(senders)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + self.bulk_timeout
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "senders did not finish in time"
        assert not errors, f"sending failed: {errors[0]!r}"
        done = log.wait_acked(keys, max(0.0, deadline - time.monotonic()))
        h.stop(*listeners)
        report = log.report()
        assert done, f"not every message was acknowledged in time: {report.counts}"
        report.assert_valid(at_least_once=True, allow_duplicates=False)
        assert report.counts["acknowledged"] == len(keys)
        acked = sum(int(x.stats.snapshot()["acknowledged"]) for x in listeners)
        assert acked == len(keys), f"{acked} acknowledgements for {len(keys)} messages"
        assert not over_prefetch, f"more than prefetch={prefetch} in flight: {over_prefetch[0]}"

    def test_background_notifier_pipelines_and_flush_means_sent(
            self, tidings_harness: Harness) -> None:
        """A BackgroundNotifier's backlog goes through the driver's ``send_many`` (pipelined,
        or the contract's one-by-one default): after ``flush()`` every notification was sent
        (none failed), and the group receives each exactly once."""
        h = tidings_harness
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)])
        notifier = BackgroundNotifier(h._default_transport(), "conformance.host",
                                      topics=[h.topic], retry=3, pipeline=16)
        keys = [f"bg-{i}" for i in range(300)]
        try:
            for key in keys:
                notifier.info({}, "conformance.background", {"key": key})
            assert notifier.flush(h.timeout), f"{notifier.pending()} not sent in time"
            stats = notifier.stats.snapshot()
            assert stats["sent"] == len(keys) and stats["failed"] == 0, stats
            inbox.wait_keys(keys, h.timeout)
        finally:
            notifier.close(h.timeout)
            h.stop(listener)
        got = inbox.keys()
        assert sorted(got) == sorted(keys), f"duplicates: {len(got) - len(set(got))}"

    # == bad input and failures ===========================================================
    def test_malformed_message_is_rejected_and_listener_keeps_going(
            self, tidings_harness: Harness) -> None:
        """Bodies that are not notifications are rejected (not requeued), the listener goes on."""
        h = tidings_harness
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)])
        t = h._default_transport()
        target = h.target(f"{h.topic}.info")
        bad = [b"\xff\xfe\x00 not utf-8", b"this is not json", b"[1, 2, 3]",
               b'{"oslo.version": "9.0", "oslo.message": "{}"}',
               b'{"oslo.version": "2.0", "oslo.message": "[]"}',
               b'{"priority": 5, "event_type": "x"}']
        for i, body in enumerate(bad):
            t.send_raw(target, body, message_id=f"bad-{i}", retry=3)
        n = h.notifier()
        n.info({}, "conformance.after-bad", {"key": "good1"})
        inbox.wait_keys(["good1"], h.timeout)
        n.info({}, "conformance.after-bad", {"key": "good2"})
        inbox.wait_keys(["good2"], h.timeout)
        h.stop(listener)
        stats = listener.stats.snapshot()
        assert stats["rejected"] == len(bad), stats
        assert stats["acknowledged"] == 2, stats
        assert stats["received"] == len(bad) + 2, f"a rejected message came back: {stats}"
        assert inbox.keys() == ["good1", "good2"]

    def test_join_consumer_pool_gets_the_whole_message(self, tidings_harness: Harness) -> None:
        """join_consumer_pool's callback gets the whole wire message as a dict, v1 or v2; a
        callback that raises has its message rejected, not redelivered."""
        h = tidings_harness
        h.require("pools", instead="test_pools_undeclared_raise_not_implemented")
        inbox = Inbox()

        def callback(message: dict[str, Any]) -> None:
            inbox.add(message)
            if message["payload"]["key"] == "boom":
                raise RuntimeError("callback failure (expected by the conformance test)")

        handle = h.join_pool(callback, f"jcp-{h.uid}", f"{h.topic}.info")
        ctxt = {"user_id": "u-9", "roles": ["admin"]}
        h.notifier().info(ctxt, "conformance.jcp", {"key": "v2", "n": 1})
        h.notifier(driver="messaging").info(ctxt, "conformance.jcp", {"key": "v1"})
        h.notifier().info({}, "conformance.jcp", {"key": "boom"})
        h.notifier().info({}, "conformance.jcp", {"key": "end"})
        inbox.wait_for(lambda items: {m["payload"]["key"] for m in items} >=
                       {"v1", "v2", "boom", "end"}, h.timeout, "four pool messages")
        h.stop(handle)
        by_key = {m["payload"]["key"]: m for m in inbox.items}
        for key in ("v1", "v2"):
            m = by_key[key]
            assert m["event_type"] == "conformance.jcp" and m["priority"] == "INFO"
            assert m["publisher_id"] == "conformance.host"
            assert m["message_id"] and m["timestamp"]
            assert m["_context_user_id"] == "u-9" and m["_context_roles"] == ["admin"]
            assert "oslo.message" not in m and "oslo.version" not in m
        assert by_key["v2"]["payload"] == {"key": "v2", "n": 1}
        assert [m["payload"]["key"] for m in inbox.items].count("boom") == 1
        stats = handle.stats.snapshot()
        assert stats["rejected"] == 1 and stats["acknowledged"] == 3, stats

    def test_second_settlement_is_a_no_op(self, tidings_harness: Harness) -> None:
        """Driver level: a second ack/requeue/reject of a message does nothing (no channel
        error), and the listener keeps working."""
        h = tidings_harness
        t = h.transport()
        binding = Binding(h.default_exchange, f"{h.topic}.info")
        target = h.target(f"{h.topic}.info")
        listener = h.raw_listener(t, [binding])
        h.send_raw_keys(t, target, ["m1"])
        [m1] = h.poll_until(listener, 1)
        assert m1.ack() is True
        assert (m1.ack(), m1.requeue(), m1.reject()) == (False, False, False)
        assert m1.settled == "ack"
        h.send_raw_keys(t, target, ["m2"])
        [m2] = h.poll_until(listener, 1)
        assert h.key_of(m2) == "m2"
        if h.has("requeue"):
            assert m2.requeue() is True
            assert (m2.ack(), m2.requeue(), m2.reject()) == (False, False, False)
            [again] = h.poll_until(listener, 1)
            assert h.key_of(again) == "m2"
            m2 = again
        assert m2.ack() is True
        assert m2.reject() is False
        # The acknowledged messages never come back, whether the listener stays or goes.
        assert h.poll_quiet(listener) == []
        h.close_raw(listener)
        fresh = h.raw_listener(t, [binding])
        h.send_raw_keys(t, target, ["m3"])
        got = h.poll_until(fresh, 1) + h.poll_quiet(fresh)
        assert [h.key_of(m) for m in got] == ["m3"]
        assert got[0].ack()

    def test_settlement_from_another_thread(self, tidings_harness: Harness) -> None:
        """Driver level: ack() may be called from a thread other than the polling one."""
        h = tidings_harness
        t = h.transport()
        binding = Binding(h.default_exchange, f"{h.topic}.info")
        listener = h.raw_listener(t, [binding], prefetch=1)
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), ["m1", "m2"])
        m1, *rest = h.poll_until(listener, 1)
        done: list[bool] = []
        worker = threading.Thread(target=lambda: done.append(m1.ack()))
        worker.start()
        worker.join(h.timeout)
        assert done == [True]
        got = rest or h.poll_until(listener, 1)
        assert [h.key_of(m) for m in [m1, *got]] == ["m1", "m2"]
        assert got[0].ack()

    def test_endpoint_exception_is_rejected_without_requeue(self, tidings_harness: Harness) -> None:
        """allow_requeue=False: an endpoint that raises (or asks REQUEUE) gets the message
        rejected -- logged, not acknowledged, not redelivered -- and the listener goes on."""
        h = tidings_harness
        inbox = Inbox()

        def policy(r: Received) -> Any:
            if r.key == "boom":
                raise RuntimeError("endpoint failure (expected by the conformance test)")
            if r.key == "requeue-me":
                return NotificationResult.REQUEUE
            return None

        listener = h.listener([RecordingEndpoint(inbox, on_message=policy)])
        n = h.notifier()
        for k in ("boom", "requeue-me", "ok1"):
            n.info({}, "conformance.policy", {"key": k})
        inbox.wait_keys(["ok1"], h.timeout)
        n.info({}, "conformance.policy", {"key": "ok2"})
        inbox.wait_keys(["ok2"], h.timeout)
        h.stop(listener)
        assert Counter(inbox.keys()) == {"boom": 1, "requeue-me": 1, "ok1": 1, "ok2": 1}
        stats = listener.stats.snapshot()
        assert (stats["rejected"], stats["acknowledged"], stats["requeued"]) == (2, 2, 0), stats

    def test_endpoint_exception_requeues_when_allowed(self, tidings_harness: Harness) -> None:
        """allow_requeue=True: an endpoint that raises gets the message again."""
        h = tidings_harness
        h.require("requeue", instead="test_requeue_undeclared_raises_not_implemented")
        inbox = Inbox()
        seen: Counter[Any] = Counter()

        def fail_once(r: Received) -> None:
            seen[r.key] += 1
            if seen[r.key] == 1:
                raise RuntimeError("endpoint failure (expected by the conformance test)")

        listener = h.listener([RecordingEndpoint(inbox, on_message=fail_once)],
                              allow_requeue=True)
        h.notifier().info({}, "conformance.policy", {"key": "flaky"})
        inbox.wait_for(lambda items: len(items) >= 2, h.timeout, "the failed message again")
        h.stop(listener)
        stats = listener.stats.snapshot()
        assert (stats["requeued"], stats["acknowledged"]) == (1, 1), stats

    def test_prefetch_bounds_messages_in_flight(self, tidings_harness: Harness) -> None:
        """Driver level: a listener never holds more than prefetch unsettled messages."""
        h = tidings_harness
        h.require("prefetch")
        t = h.transport()
        listener = h.raw_listener(t, [Binding(h.default_exchange, f"{h.topic}.info")],
                                  prefetch=3)
        keys = [f"m{i}" for i in range(8)]
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), keys)
        held = h.poll_until(listener, 3)
        held += h.poll_quiet(listener)
        assert len(held) == 3, f"{len(held)} unsettled messages with prefetch=3"
        received = list(held)
        for m in held[:2]:
            assert m.ack()
        held = held[2:]
        while len(received) < len(keys):
            more = h.poll_until(listener, 1)
            received += more
            held += more
            assert len(held) <= 3, f"{len(held)} unsettled messages with prefetch=3"
            for m in list(held):
                assert m.ack()
                held.remove(m)
        for m in held:
            m.ack()
        assert sorted(h.key_of(m) for m in received) == sorted(keys)

    def test_a_notifier_with_several_topics_reaches_each_topics_listeners(
            self, tidings_harness: Harness) -> None:
        """One notification sent to two topics reaches the listeners of both. It carries the
        same message_id on each: a driver that de-duplicates by message_id across routing keys
        loses one copy and fails here."""
        h = tidings_harness
        inbox = Inbox()
        t1, t2 = f"{h.topic}-a", f"{h.topic}-b"
        h.listener([RecordingEndpoint(inbox, "A")], [h.target(t1)])
        h.listener([RecordingEndpoint(inbox, "B")], [h.target(t2)])
        notifier = h.notifier(topics=[t1, t2])
        for i in range(3):
            notifier.info({}, "conformance.topics", {"key": f"k{i}"})
        keys = ["k0", "k1", "k2"]
        inbox.wait_keys(keys, h.timeout, member="A")
        inbox.wait_keys(keys, h.timeout, member="B")
        ids = {m: sorted(r.metadata["message_id"] for r in inbox.items if r.member == m)
               for m in "AB"}
        assert ids["A"] == ids["B"], "each topic's copy carries the notification's message_id"
        assert sorted(inbox.keys("A")) == keys and sorted(inbox.keys("B")) == keys

    def test_a_delivery_names_the_route_it_was_sent_to_or_nothing(
            self, tidings_harness: Harness) -> None:
        """Driver level: a delivery's ``exchange`` and ``routing_key`` are where it was sent,
        in the broker's words, or both None where the driver cannot tell (signatures are then
        checked against the listener's bindings). Never another route."""
        h = tidings_harness
        t = h.transport()
        routes = [(h.default_exchange, f"{h.topic}.info"), (h.default_exchange, f"{h.topic}.error")]
        listener = h.raw_listener(t, [Binding(*r) for r in routes])
        sent = {}
        for exchange, routing_key in routes:
            message_id, body = h.wire(routing_key)
            t.send_raw(h.target(routing_key, exchange), body, message_id=message_id, retry=3)
            sent[routing_key] = (exchange, routing_key)
        got = h.poll_until(listener, 2)
        for m in got:
            route = (m.exchange, m.routing_key)
            assert route in ((None, None), sent[h.key_of(m)]), (
                f"a message sent to {sent[h.key_of(m)]} reports {route}")
            m.ack()

    def test_a_signed_message_re_published_elsewhere_is_rejected(
            self, tidings_harness: Harness) -> None:
        """Driver level: signatures bind a message to its exchange and routing key. A captured
        signed body re-published to another routing key (another priority) or another exchange
        fails verification there, whatever the driver reports of the route; the same body where
        it was signed for passes, and after verification the message id is the signed one."""
        h = tidings_harness
        keys = SigningKeys({"conformance": b"c" * 32}, active="conformance", require=True)
        t = h.transport(signing=keys)
        home = Binding(h.default_exchange, f"{h.topic}.info")
        moved = [Binding(h.default_exchange, f"{h.topic}.error"),
                 Binding(f"conf-other-{h.uid}", f"{h.topic}.info")]
        elsewhere = h.raw_listener(t, moved)
        at_home = h.raw_listener(t, [home])
        signed_id = str(uuid.uuid4())
        captured = t.encode_notification(
            h.target(home.routing_key),
            {}, {"message_id": signed_id, "publisher_id": "conformance.host",
                 "event_type": "conformance.signed", "priority": "INFO",
                 "payload": {"key": "captured"}, "timestamp": "2026-01-01 00:00:00.000000"})
        for b in [*moved, home]:
            t.send_raw(h.target(b.routing_key, b.exchange), captured.body,
                       message_id="sender-chosen-id", retry=3)
        for m in h.poll_until(elsewhere, 2):
            with pytest.raises(SignatureError, match="delivered via"):
                t.decode(m, moved)
            assert m.reject()
        [m] = h.poll_until(at_home, 1)
        assert t.decode(m, [home])["payload"] == {"key": "captured"}
        assert m.message_id == signed_id, "after verification the id is the signed one"
        assert m.ack()

    def test_an_idle_listener_gets_a_notification_without_waiting_out_a_poll(
            self, tidings_harness: Harness) -> None:
        """Latency: with receive() timeouts of 2 s, a notification sent to an idle listener
        arrives in well under that. A driver that returns only when its timeout ends (or
        delivers one message per timeout) fails here."""
        h = tidings_harness
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)], start=False)
        listener._loop.poll_interval = 2.0
        listener.start()
        notifier = h.notifier()
        notifier.info({}, "conformance.latency", {"key": "warm-up"})
        inbox.wait_keys(["warm-up"], h.timeout)
        took = []
        for i in range(5):
            time.sleep(0.3)  # not a wait for a result: idle time, so receive() is blocked
            began = time.monotonic()
            notifier.info({}, "conformance.latency", {"key": f"l{i}"})
            inbox.wait_keys([f"l{i}"], h.timeout)
            took.append(time.monotonic() - began)
        took.sort()
        assert took[2] < 1.0, (f"an idle listener took {took} s to get a notification: "
                               f"receive() must return as soon as a message is there")

    def test_concurrent_endpoints_stay_within_prefetch_and_settle_each_once(
            self, tidings_harness: Harness) -> None:
        """Endpoints run on the worker pool: several at once (an endpoint that waits on I/O
        does not hold up the next message), never more than prefetch at a time, and each
        message handled and acknowledged exactly once."""
        h = tidings_harness
        inbox = Inbox()
        lock = threading.Lock()
        running = [0, 0]  # now, most at once

        def slow(r: Received) -> None:
            with lock:
                running[0] += 1
                running[1] = max(running[1], running[0])
            time.sleep(0.05)  # an endpoint waiting on a database
            with lock:
                running[0] -= 1

        listener = h.listener([RecordingEndpoint(inbox, on_message=slow)], prefetch=4,
                              pool_size=16)
        keys = [f"c{i}" for i in range(40)]
        notifier = h.notifier()
        for key in keys:
            notifier.info({}, "conformance.concurrent", {"key": key})
        inbox.wait_keys(keys, h.timeout)
        h.stop(listener)
        assert sorted(inbox.keys()) == sorted(keys), "a message was handled twice"
        assert running[1] <= 4, f"{running[1]} endpoints ran at once with prefetch=4"
        assert running[1] > 1, "endpoints ran one at a time on the threading executor"
        stats = listener.stats.snapshot()
        assert stats["acknowledged"] == len(keys) and stats["in_flight"] == 0, stats

    def test_send_and_listen_after_cleanup_raise(self, tidings_harness: Harness) -> None:
        """After cleanup(), sending and listening raise TransportClosed saying what to do."""
        h = tidings_harness
        t = h.transport()
        early = h.listener([RecordingEndpoint(Inbox())], transport=t, start=False)
        n = h.notifier(t)
        t.cleanup()
        t.cleanup()  # idempotent
        with pytest.raises(TransportClosed, match="get_notification_transport"):
            n.info({}, "conformance.closed", {"key": "x"})
        with pytest.raises(TransportClosed):
            t.send_raw(h.target(), b"{}", message_id="x")
        with pytest.raises(TransportClosed):
            get_notification_listener(t, [h.target()], [RecordingEndpoint(Inbox())])
        with pytest.raises(TransportClosed):
            t.listen([Binding(h.default_exchange, f"{h.topic}.info")])
        with pytest.raises(TransportClosed):
            early.start()

    def test_cleanup_with_a_running_listener_lets_it_stop(self, tidings_harness: Harness) -> None:
        """cleanup() while a listener runs must not leave stop()/wait() hanging."""
        h = tidings_harness
        t = h.transport()
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)], transport=t)
        h.notifier(t).info({}, "conformance.cleanup", {"key": "k"})
        inbox.wait_keys(["k"], h.timeout)
        t.cleanup()
        h.stop(listener)

    def test_bad_url_option_fails_fast(self, tidings_harness: Harness) -> None:
        """An unknown or ill-typed URL option fails when the transport is built, naming the
        option and the accepted ones, without revealing the password or touching the broker."""
        h = tidings_harness
        secret = f"s3cret-{uuid.uuid4().hex[:8]}"
        base = h.url()
        hosts = base.hosts or (TransportHost(),)
        first = hosts[0]
        with_secret = type(base)(base.transport, (TransportHost(
            first.hostname, first.port, first.username or "user", secret), *hosts[1:]),
            base.virtual_host, base.query_items)
        cases = [("no_such_option", "1"), ("prefetch", "many"), ("send_timeout", "soon")]
        for name, opt in load_driver_class(base.driver).options.items():
            if opt.choices:
                cases.append((name, "not-one-of-the-choices"))
            elif opt.type in (int, float, bool):
                cases.append((name, "not-a-number"))
        for name, raw in cases:
            url = with_secret.with_query([*base.query_items, (name, raw)])
            began = time.monotonic()
            with pytest.raises(InvalidTransportOption) as info:
                get_notification_transport(url)
            assert time.monotonic() - began < 5, f"{name}={raw} took long to be refused"
            message = str(info.value)
            assert name in message, message
            assert secret not in message and secret not in repr(info.value)
            if name == "no_such_option":
                assert "prefetch" in message, "the error should list the accepted options"


class _NullInbox(Inbox):
    """An inbox that keeps nothing: the bulk scenario records into its DeliveryLog instead."""

    def add(self, item: Any) -> None:
        return None


def scenario_names() -> list[str]:
    """Every scenario in the suite, for docs and the CLI."""
    return sorted(name for name in vars(DriverConformance) if name.startswith("test_"))
