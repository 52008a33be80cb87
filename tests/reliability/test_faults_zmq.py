"""zmq:// under faults, with figures: a pool member SIGKILLed mid-stream (sqlite matchmaker),
and a restart of the Redis matchmaker (a PRIVATE redis-server, never the shared one).

tests/functional/test_zmq_processes.py already checks the kill on both registries (nothing lost,
duplicates only among what the killed member had handled) and a frozen member's expiry; here the
same kill is measured with the delivery checker, and the registry restart is new.

What zmq promises, and so what these tests hold it to: at least once *while the sending
transport lives* (copies wait in the sender's window until acknowledged and move to another
member when theirs dies); nothing is kept for a group with no registered member, and a send that
finds no listener at all fails (NoListener) and is retried under the caller's policy -- so with
retry=None what is sent while the registry is empty after a matchmaker restart waits for the
listeners to register again (each retry logged), and the gap is measured and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.testing.checker import DeliveryLog

from .support import (
    WAIT,
    ListenerProcess,
    LogWatch,
    RedisServer,
    SendStream,
    summary,
    uid,
    wait_until,
)

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
RETRY_LOG = "tidings.transports.retry"


def _registered(transport: tidings.Transport, topic: str) -> dict[str, int]:
    try:
        return transport._driver.registered("openstack", f"{topic}.info")  # type: ignore[attr-defined]
    except tidings.TransportUnreachable:
        return {}


def test_zmq_pool_member_sigkilled_mid_stream(tmp_path: Path, figures: Figures) -> None:
    """Two pool members in child processes; the victim blocks on its 31st message and so holds
    a window of unacknowledged copies. SIGKILL it in the middle of a 3,000-message stream: the
    sender moves its copies to the survivor. Lost: 0 (the sender lives); duplicates only of
    what the victim had processed without its acknowledgement getting out."""
    n, prefetch = 3000, 8
    url = f"zmq+sqlite:///{tmp_path}/registry.db?ttl=2"
    topic, pool = f"kill-{uid()}", f"workers-{uid()}"
    log = DeliveryLog()
    victim = ListenerProcess("victim", url, log, topic=topic, pool=pool, prefetch=prefetch,
                             hold_after=30)
    survivor = ListenerProcess("survivor", url, log, topic=topic, pool=pool, prefetch=prefetch)
    transport = tidings.get_notification_transport(f"{url}&retry_interval=0.05")
    try:
        victim.wait_ready()
        survivor.wait_ready()
        wait_until(lambda: _registered(transport, topic) == {pool: 2}, "both members registered")
        notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=None,
                                    raise_on_failure=True)
        stream = SendStream(notifier, log, range(n), pace=0.0002).start()
        assert victim.holding.wait(WAIT), "the victim never took its window"
        assert stream.wait_sent(n // 2), stream.errors
        sent_before_kill = len(stream.done_times())
        t_kill = time.monotonic()
        victim.kill()
        assert stream.join(WAIT) and not stream.failed and not stream.errors
        assert log.wait_acked(range(n), WAIT), log.report().counts
        recovery = time.monotonic() - t_kill
        wait_until(lambda: transport._driver._sender.unacknowledged == 0,  # type: ignore
                   "the sender's window to drain")
    finally:
        victim.kill()
        survivor.stop()
        transport.cleanup()
    report = log.report()
    figures("zmq: pool member SIGKILLed mid-stream (sqlite)", **summary(report),
            recovery_s=recovery, sent_before_kill=sent_before_kill,
            victim_processed=len(victim.processed_keys()),
            survivor_processed=len(survivor.processed_keys()))
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    assert set(report.duplicated) <= set(victim.processed_keys()), report.duplicated
    assert sent_before_kill < n, "the stream ended before the kill: not mid-stream"


def test_zmq_redis_matchmaker_restart_mid_stream(tmp_path: Path, figures: Figures) -> None:
    """Listeners (two pool members, child processes) registered in a private Redis with
    ttl=1.5 s; a notifier streams ~200/s with retry=None. Redis is SIGKILLed (no RDB, no AOF)
    and started empty on the same port: sends retry while it is down; once it is back, sends
    find no listener until the listeners' next refresh (every ttl/3) registers them again, fail
    with NoListener and are retried (logged) until then. Nothing is lost."""
    ttl = 1.5
    with RedisServer(tmp_path) as redis:
        url = redis.url(f"namespace=rel-{uid()}&ttl={ttl}&lookup_interval=0.05")
        topic, pool = f"mm-{uid()}", f"workers-{uid()}"
        log = DeliveryLog()
        members = [ListenerProcess(f"m{i}", url, log, topic=topic, pool=pool, prefetch=16)
                   for i in range(2)]
        transport = tidings.get_notification_transport(
            f"{url}&retry_interval=0.05&retry_max_interval=0.2&send_timeout=2")
        try:
            for m in members:
                m.wait_ready()
            wait_until(lambda: _registered(transport, topic) == {pool: 2},
                       "both members registered")
            notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=None,
                                        raise_on_failure=True)
            with LogWatch(RETRY_LOG, "failed") as retries:
                stream = SendStream(notifier, log, range(100_000), pace=0.005).start()
                assert stream.wait_sent(200), stream.errors
                t_kill = time.monotonic()
                redis.kill()
                assert retries.wait_for(5, WAIT), "sends did not notice the registry was gone"
                t_start = time.monotonic()
                redis.start()
                t_up = time.monotonic()
                wait_until(lambda: _registered(transport, topic) == {pool: 2},
                           "the members to register again", every=0.01)
                t_registered = time.monotonic()
                count = len(stream.done_times())
                assert stream.wait_sent(count + 200), stream.errors
                stream.stop()
                assert stream.join(WAIT) and not stream.failed and not stream.errors
                done = stream.done_times()
                before = [k for t, k in done if t < t_kill]
                after = [k for t, k in done if t > t_registered + 0.25]
                assert log.wait_acked(before + after, WAIT), log.report().counts
                # Let any copy still in the window arrive before the verdict.
                wait_until(lambda: transport._driver._sender.unacknowledged == 0,  # type: ignore
                           "the sender's window to drain")
                send_retries = retries.count
        finally:
            for m in members:
                m.stop()
            transport.cleanup()
    report = log.report()
    in_gap = {k for t, k in done if t_kill <= t <= t_registered + 0.25}
    acked_after = [t for m in members for t, k in m.processed if k in after]
    figures("zmq: Redis matchmaker restart mid-stream", **summary(report),
            recovery_s=(min(acked_after) - t_up) if acked_after else None,
            redis_down_s=t_start - t_kill, redis_start_s=t_up - t_start,
            registration_gap_s=t_registered - t_up, ttl=ttl, send_retries=send_retries,
            sent_in_gap=len(in_gap))
    assert not report.unexpected and not report.duplicated, report.counts
    # A send that found the registry empty waited (retry=None) for the listeners to register
    # again instead of going to nobody.
    assert not report.lost, list(report.lost)[:10]
