"""rabbit:// against oslo.messaging 18 and a raw pika consumer, same broker, same run.

Every workload runs in this process against the RabbitMQ on 127.0.0.1:5672, in a fresh virtual
host (deleted afterwards), with the same notification (a v2 envelope of about 400 bytes):

* ``oslo publish`` / ``tidings publish``: a Notifier sends N notifications from one thread;
  both wait for the broker's publisher confirm before ``info()`` returns.
* ``oslo publish x4`` / ``tidings publish x4``: four threads share one Notifier (oslo.messaging
  gives each thread a pooled connection; tidings pipelines their confirms on one). Reported
  with its ratio for information; the target compares the single-thread figures.
* ``py-amqp publish``: the floor for a blocking confirmed send, a bare py-amqp loop
  (``basic_publish_confirm``, one round trip each) with the same body. Reported for information.
* ``tidings publish bg``: a BackgroundNotifier takes N notifications from one thread and
  sends them pipelined (up to 64 published before their confirmations are awaited); the clock
  stops when ``flush()`` returns, i.e. when the broker has confirmed every one. oslo.messaging
  has no equivalent, so it is compared with the same ``oslo publish``.
* ``oslo drain`` / ``tidings drain`` / ``pika drain``: N notifications wait in the queue; the
  clock runs from starting the consumer until it has received (and acknowledged) all of them.
  oslo.messaging and tidings go through a notification listener and an ``info`` endpoint; pika is
  a bare ``basic_consume`` loop with prefetch and an ``ack(multiple=True)`` every 32 messages.
  tidings and pika use the same prefetch; oslo.messaging runs with its defaults.
* ``oslo drain io`` / ``tidings drain io``: the same drain with an endpoint that waits 10 ms
  per notification (a database write), both on their default ``threading`` executor (a pool
  of 64 threads); tidings with the same prefetch as above.
* ``oslo e2e`` / ``tidings e2e``: a listener runs while a Notifier sends N from one thread
  (``x4``: from four; ``bg``: through a pipelined BackgroundNotifier); the clock stops at the
  last endpoint call.

Rounds are interleaved (every workload once per round) so that the load of a shared machine hits
them alike; the table shows each rate's median and range, then the ratios against the targets:
drain >= 4x oslo and >= 70% of pika; I/O-bound drain >= 1.5x oslo; confirmed publish >= 2.5x
oslo; end to end >= 4x oslo.

    python benchmarks/bench_rabbit.py [--messages 1500] [--drain-messages 8000] [--rounds 2]
                                      [--io-messages 2000] [--prefetch 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from _common import Counter

from tidings.testing.brokers import rabbit_vhost

HOST, PORT = "127.0.0.1", 5672
PAYLOAD = {"instance_id": "6f1b0c1e-0d6a-4c1b-9b59-0c3d7c3a1f0e", "state": "active",
           "host": "compute-17", "flavor": {"vcpus": 2, "ram": 4096, "disk": 40},
           "image": "cirros-0.6.2", "tenant": "b" * 32, "note": "x" * 120}
CTXT = {"request_id": "req-5b7f0a52-1d0e-4f8e-9d0c-1a2b3c4d5e6f", "user_id": "u" * 32,
        "project_id": "p" * 32}


def _timed_sends(send: Callable[[], None], n: int, threads: int) -> float:
    """Call ``send`` n times from ``threads`` threads; the rate from first to last return."""
    per_thread = n // threads

    def work() -> None:
        for _ in range(per_thread):
            send()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - began)


def _wait(counter: Counter, what: str, timeout: float = 300.0) -> None:
    if not counter.done.wait(timeout):
        raise RuntimeError(f"{what}: only {counter.count}/{counter.expected} arrived")


class Bench:
    def __init__(self, vhost: str, prefetch: int) -> None:
        self.vhost = vhost
        self.prefetch = prefetch
        self.messages = 1500
        self.url = f"rabbit://guest:guest@{HOST}:{PORT}/{vhost}"
        from oslo_config import cfg

        self.conf = cfg.ConfigOpts()
        self.conf([], project="tidings-bench")

    # -- helpers ------------------------------------------------------------------------
    def _topic(self) -> str:
        return f"bench-{uuid.uuid4().hex[:8]}"

    def _prefill(self, topic: str, n: int) -> None:
        """Put n notifications in queue <topic>.info, declared as both libraries declare it."""
        import pika

        from tidings.transports import envelope

        conn = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT, self.vhost))
        ch = conn.channel()
        ch.exchange_declare("openstack", "topic", durable=False, auto_delete=False)
        queue = f"{topic}.info"
        ch.queue_declare(queue, durable=False, auto_delete=False)
        ch.queue_bind(queue, "openstack", queue)
        props = pika.BasicProperties(content_type="application/json",
                                     content_encoding="utf-8", delivery_mode=2)
        for i in range(n):
            msg = envelope.pack_context(
                {"message_id": str(uuid.uuid4()), "publisher_id": "bench.host",
                 "event_type": "compute.instance.update", "priority": "INFO",
                 "payload": dict(PAYLOAD, seq=i), "timestamp": "2026-11-22 10:00:00.000000"},
                dict(CTXT))
            ch.basic_publish("openstack", queue, envelope.encode(msg), props)
        deadline = time.monotonic() + 60
        while ch.queue_declare(queue, passive=True).method.message_count < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefill of {queue} did not reach {n} messages")
            time.sleep(0.05)
        conn.close()

    # -- oslo.messaging -----------------------------------------------------------------
    def _oslo_transport(self) -> Any:
        import oslo_messaging

        return oslo_messaging.get_notification_transport(self.conf, url=self.url)

    def oslo_publish(self, n: int, threads: int = 1) -> float:
        import oslo_messaging

        transport = self._oslo_transport()
        try:
            notifier = oslo_messaging.Notifier(transport, "bench.host", driver="messagingv2",
                                               topics=[self._topic()])
            notifier.info(CTXT, "warm.up", PAYLOAD)
            return _timed_sends(lambda: notifier.info(CTXT, "compute.instance.update",
                                                      PAYLOAD), n, threads)
        finally:
            transport.cleanup()

    def oslo_drain(self, n: int, wait: float = 0.0) -> float:
        import oslo_messaging

        topic = self._topic()
        self._prefill(topic, n)
        transport = self._oslo_transport()
        counter = Counter(n, wait)
        listener = oslo_messaging.get_notification_listener(
            transport, [oslo_messaging.Target(topic=topic)], [counter], executor="threading")
        try:
            began = time.perf_counter()
            listener.start()
            _wait(counter, "oslo drain")
            return n / (time.perf_counter() - began)
        finally:
            listener.stop()
            listener.wait()
            transport.cleanup()

    def oslo_e2e(self, n: int, threads: int = 1) -> float:
        import oslo_messaging

        topic = self._topic()
        transport = self._oslo_transport()
        counter = Counter(n)
        listener = oslo_messaging.get_notification_listener(
            transport, [oslo_messaging.Target(topic=topic)], [counter], executor="threading")
        listener.start()
        try:
            notifier = oslo_messaging.Notifier(transport, "bench.host", driver="messagingv2",
                                               topics=[topic])
            counter.expected = n - n % threads
            began = time.perf_counter()
            _timed_sends(lambda: notifier.info(CTXT, "compute.instance.update", PAYLOAD), n,
                         threads)
            _wait(counter, "oslo e2e")
            return counter.expected / (time.perf_counter() - began)
        finally:
            listener.stop()
            listener.wait()
            transport.cleanup()

    # -- raw pika -----------------------------------------------------------------------
    def pika_drain(self, n: int) -> float:
        import pika

        topic = self._topic()
        self._prefill(topic, n)
        conn = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT, self.vhost))
        ch = conn.channel()
        ch.basic_qos(prefetch_count=self.prefetch)
        count = 0
        began = time.perf_counter()
        for method, _props, body in ch.consume(f"{topic}.info", inactivity_timeout=30):
            if method is None:
                raise RuntimeError(f"pika drain: only {count}/{n} arrived")
            json.loads(body)  # what any consumer does with a body, at the least
            count += 1
            if count % 32 == 0 or count == n:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if count == n:
                break
        rate = n / (time.perf_counter() - began)
        ch.cancel()
        conn.close()
        return rate

    def amqp_publish(self, n: int) -> float:
        """The floor of a blocking confirmed send: a bare py-amqp loop, one confirm each."""
        import amqp

        from tidings.transports import envelope

        topic = self._topic()
        conn = amqp.Connection(f"{HOST}:{PORT}", virtual_host=self.vhost, confirm_publish=True)
        conn.connect()
        ch = conn.channel()
        ch.exchange_declare("openstack", "topic", durable=False, auto_delete=False)
        ch.queue_declare(f"{topic}.info", durable=False, auto_delete=False)
        ch.queue_bind(f"{topic}.info", "openstack", f"{topic}.info")
        msg = envelope.pack_context(
            {"message_id": str(uuid.uuid4()), "publisher_id": "bench.host",
             "event_type": "compute.instance.update", "priority": "INFO", "payload": PAYLOAD,
             "timestamp": "2026-11-22 10:00:00.000000"}, dict(CTXT))

        def send() -> None:
            ch.basic_publish_confirm(
                amqp.Message(envelope.encode(msg), content_type="application/json",
                             content_encoding="utf-8", delivery_mode=2),
                exchange="openstack", routing_key=f"{topic}.info")
        try:
            send()
            return _timed_sends(send, n, 1)
        finally:
            conn.close()

    # -- tidings ------------------------------------------------------------------------
    def _tidings_transport(self) -> Any:
        import tidings

        return tidings.get_notification_transport(f"{self.url}?prefetch={self.prefetch}")

    def _tidings_notifier(self, transport: Any, topic: str, background: bool) -> Any:
        import tidings

        if background:
            return tidings.BackgroundNotifier(transport, "bench.host", topics=[topic],
                                              queue_size=max(1000, self.messages))
        return tidings.Notifier(transport, "bench.host", topics=[topic], raise_on_failure=True)

    def tidings_publish(self, n: int, threads: int = 1, background: bool = False) -> float:
        """With ``background``, the clock stops when flush() returns: when the broker has
        confirmed every notification, as with the blocking Notifier."""
        transport = self._tidings_transport()
        try:
            notifier = self._tidings_notifier(transport, self._topic(), background)
            notifier.info(CTXT, "warm.up", PAYLOAD)
            if not background:
                return _timed_sends(lambda: notifier.info(CTXT, "compute.instance.update",
                                                          PAYLOAD), n, threads)
            notifier.flush(60)
            began = time.perf_counter()
            for _ in range(n):
                notifier.info(CTXT, "compute.instance.update", PAYLOAD)
            if not notifier.flush(300):
                raise RuntimeError(f"background publish: {notifier.pending()} not confirmed")
            rate = n / (time.perf_counter() - began)
            stats = notifier.stats.snapshot()
            notifier.close()
            if stats["failed"]:
                raise RuntimeError(f"background publish: {stats['failed']} failed")
            return rate
        finally:
            transport.cleanup()

    def tidings_drain(self, n: int, wait: float = 0.0) -> float:
        import tidings

        topic = self._topic()
        self._prefill(topic, n)
        transport = self._tidings_transport()
        counter = Counter(n, wait)
        listener = tidings.get_notification_listener(transport, [tidings.Target(topic=topic)],
                                                     [counter])
        try:
            began = time.perf_counter()
            listener.start()
            _wait(counter, "tidings drain")
            return n / (time.perf_counter() - began)
        finally:
            listener.stop()
            listener.wait(30)
            transport.cleanup()

    def tidings_e2e(self, n: int, threads: int = 1, background: bool = False) -> float:
        import tidings

        topic = self._topic()
        transport = self._tidings_transport()
        counter = Counter(n)
        listener = tidings.get_notification_listener(transport, [tidings.Target(topic=topic)],
                                                     [counter])
        listener.start()
        notifier = self._tidings_notifier(transport, topic, background)
        try:
            counter.expected = n - n % threads
            began = time.perf_counter()
            _timed_sends(lambda: notifier.info(CTXT, "compute.instance.update", PAYLOAD), n,
                         threads)
            _wait(counter, "tidings e2e")
            return counter.expected / (time.perf_counter() - began)
        finally:
            if background:
                notifier.close()
            listener.stop()
            listener.wait(30)
            transport.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500,
                        help="notifications per publish and end-to-end run (default 1500)")
    parser.add_argument("--drain-messages", type=int, default=8000,
                        help="notifications per drain run (default 8000)")
    parser.add_argument("--io-messages", type=int, default=2000,
                        help="notifications per drain with a 10 ms endpoint (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--only", default="",
                        help="run only the workloads whose name contains this, e.g. 'drain io'")
    parser.add_argument("--prefetch", type=int, default=128,
                        help="prefetch of the tidings listener and the pika consumer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")  # oslo's eventlet deprecation noise

    results: dict[str, list[float]] = {}
    with rabbit_vhost("tidings-bench") as vhost:  # fresh vhost, deleted afterwards
        bench = Bench(vhost, args.prefetch)
        bench.messages = args.messages
        n, d, io = args.messages, args.drain_messages, args.io_messages
        workloads: list[tuple[str, Callable[[], float]]] = [
            ("oslo publish", lambda: bench.oslo_publish(n)),
            ("py-amqp publish", lambda: bench.amqp_publish(n)),
            ("tidings publish", lambda: bench.tidings_publish(n)),
            ("oslo publish x4", lambda: bench.oslo_publish(n, threads=4)),
            ("tidings publish x4", lambda: bench.tidings_publish(n, threads=4)),
            ("tidings publish bg", lambda: bench.tidings_publish(n, background=True)),
            ("oslo drain", lambda: bench.oslo_drain(d)),
            ("pika drain", lambda: bench.pika_drain(d)),
            ("tidings drain", lambda: bench.tidings_drain(d)),
            ("oslo drain io", lambda: bench.oslo_drain(io, wait=0.01)),
            ("tidings drain io", lambda: bench.tidings_drain(io, wait=0.01)),
            ("oslo e2e", lambda: bench.oslo_e2e(n)),
            ("tidings e2e", lambda: bench.tidings_e2e(n)),
            ("tidings e2e bg", lambda: bench.tidings_e2e(n, background=True)),
            ("oslo e2e x4", lambda: bench.oslo_e2e(n, threads=4)),
            ("tidings e2e x4", lambda: bench.tidings_e2e(n, threads=4)),
        ]
        workloads = [(name, run) for name, run in workloads if args.only in name]
        for r in range(args.rounds):
            for name, run in workloads:
                rate = run()
                results.setdefault(name, []).append(rate)
                print(f"round {r + 1}: {name:<20} {rate:>9,.0f} msg/s", file=sys.stderr,
                      flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nrabbit:// benchmark, {args.rounds} round(s), publish/e2e N={args.messages}, "
          f"drain N={args.drain_messages}, prefetch={args.prefetch}")
    print(f"{'workload':<22}{'median msg/s':>14}{'min':>10}{'max':>10}")
    for name, values in results.items():
        print(f"{name:<22}{med[name]:>14,.0f}{min(values):>10,.0f}{max(values):>10,.0f}")
    def ratio(ours: str, theirs: str) -> float | None:
        return med[ours] / med[theirs] if ours in med and theirs in med else None

    checks = [
        ("drain vs oslo", ratio("tidings drain", "oslo drain"), 4.0),
        ("drain vs raw pika", ratio("tidings drain", "pika drain"), 0.70),
        ("drain, 10 ms endpoint, vs oslo", ratio("tidings drain io", "oslo drain io"), 1.5),
        ("confirmed publish vs oslo", ratio("tidings publish", "oslo publish"), 2.5),
        ("  pipelined (background)", ratio("tidings publish bg", "oslo publish"), 2.5),
        ("end to end vs oslo", ratio("tidings e2e", "oslo e2e"), 4.0),
        ("  pipelined (background)", ratio("tidings e2e bg", "oslo e2e"), 4.0),
        ("publish vs raw py-amqp", ratio("tidings publish", "py-amqp publish"), None),
        ("publish x4 vs oslo x4", ratio("tidings publish x4", "oslo publish x4"), None),
        ("end to end x4 vs oslo x4", ratio("tidings e2e x4", "oslo e2e x4"), None),
    ]
    print(f"\n{'ratio':<32}{'measured':>10}{'target':>10}")
    for name, value, target in checks:
        if value is None:
            continue
        if target is None:
            print(f"{name:<32}{value:>10.2f}{'(info)':>10}")
        else:
            print(f"{name:<32}{value:>10.2f}{target:>10.2f}  "
                  f"{'met' if value >= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
