"""amqp:// against a raw python-qpid-proton loop, same broker, same run.

Every workload runs in this process against the RabbitMQ on 127.0.0.1:5672 through its AMQP 1.0
plugin, in a fresh virtual host (deleted afterwards), with the same message: a tidings v2
notification of about 500 bytes, sent as one AMQP data section with the same properties.

* ``raw publish``: a proton reactor (MessagingHandler) keeps ``--threads`` messages unsettled on
  one sender link to ``/exchange/<x>/<key>`` and counts ``accepted`` dispositions: the best a
  Python client can do with that many confirmed messages in flight. ``raw publish (window
  1000)`` is the same loop with 1,000 in flight, for information.
* ``tidings publish``: ``--threads`` threads share one transport and call ``send_raw()`` with
  the same encoded body, each call returning only once the broker accepted (confirmed) the
  message; so ``--threads`` messages are in flight, as in ``raw publish``. ``tidings notifier
  publish`` does the same through ``Notifier.info()`` (which also builds and encodes the
  notification, about 50 us of core work per message, measured on ``memory://``).
* ``raw drain``: N messages wait in a queue; a proton receiver with credit = prefetch accepts each
  and tops its credit up, as a bare consumer would.
* ``tidings drain``: the same N through a notification listener (decode, dispatch to an ``info``
  endpoint, accept), prefetch the same. ``tidings driver drain`` polls the driver's listener
  and acknowledges each message, without the notification layer.

Rounds are interleaved (each workload once per round) so that the load of a shared machine hits
them alike; the table shows each rate's median and range, then the ratios tidings / raw, whose
target is at least 0.70 for confirmed publish (transport) and listener drain (notification
listener); the exit status is 1 if either misses it. The other two ratios are printed for
information.

    python benchmarks/bench_amqp1.py [--messages 4000] [--drain-messages 10000] [--rounds 3]
                                     [--threads 16] [--prefetch 64]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
import uuid
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
TIMEOUT = 300.0


def _body() -> bytes:
    """One tidings-encoded notification, the body both sides send."""
    from tidings.transports import envelope

    msg = {"message_id": str(uuid.uuid4()), "publisher_id": "bench.host",
           "event_type": "compute.instance.update", "priority": "INFO", "payload": PAYLOAD,
           "timestamp": "2026-01-01 00:00:00.000000"}
    return envelope.encode(envelope.pack_context(msg, dict(CTXT)))


class Bench:
    def __init__(self, vhost: str, threads: int, prefetch: int) -> None:
        self.vhost = vhost
        self.threads = threads
        self.prefetch = prefetch
        self.exchange = "bench"
        self.body = _body()
        self.url = f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"

    def _topic(self) -> str:
        return f"b{uuid.uuid4().hex[:8]}"

    def _declare(self, queue: str, routing_key: str) -> None:
        import amqp

        conn = amqp.Connection(f"{HOST}:{PORT}", userid="guest", password="guest",
                               virtual_host=self.vhost)
        conn.connect()
        try:
            ch = conn.channel()
            ch.exchange_declare(self.exchange, "topic", durable=False, auto_delete=False)
            ch.queue_declare(queue, durable=False, auto_delete=False)
            ch.queue_bind(queue, self.exchange, routing_key)
        finally:
            conn.close()

    def _prefill(self, queue: str, routing_key: str, n: int) -> None:
        """Put n messages in ``queue`` over AMQP 1.0 (the raw sender, big window)."""
        self._declare(queue, routing_key)
        self._raw_send(routing_key, n, window=1000)

    # -- raw proton ---------------------------------------------------------------------------
    def _raw_send(self, routing_key: str, n: int, window: int) -> float:
        from proton import Message
        from proton.handlers import MessagingHandler
        from proton.reactor import Container

        body, vhost, address = self.body, self.vhost, f"/exchange/{self.exchange}/{routing_key}"

        class Sender(MessagingHandler):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(auto_settle=True)
                self.sent = self.accepted = 0
                self.began = self.ended = 0.0
                self.failure = ""

            def on_start(self, event: Any) -> None:
                conn = event.container.connect(f"amqp://{HOST}:{PORT}", user="guest",
                                               password="guest", virtual_host=f"vhost:{vhost}",
                                               allowed_mechs="PLAIN", reconnect=False)
                self.sender = event.container.create_sender(conn, address)
                event.container.schedule(TIMEOUT, self)

            def on_sendable(self, event: Any) -> None:
                self.pump()

            def pump(self) -> None:
                if not self.began:
                    self.began = time.perf_counter()
                s = self.sender
                while s.credit and self.sent < n and self.sent - self.accepted < window:
                    s.send(Message(body=body, inferred=True, id=str(self.sent),
                                   content_type="application/json", content_encoding="utf-8",
                                   durable=True))
                    self.sent += 1

            def on_accepted(self, event: Any) -> None:
                self.accepted += 1
                if self.accepted == n:
                    self.ended = time.perf_counter()
                    event.connection.close()
                    event.container.stop()
                else:
                    self.pump()

            def on_rejected(self, event: Any) -> None:
                self.failure = "rejected"
                event.container.stop()

            def on_timer_task(self, event: Any) -> None:
                self.failure = f"timed out with {self.accepted}/{n} accepted"
                event.container.stop()

        h = Sender()
        Container(h).run()
        if h.failure or not h.ended:
            raise RuntimeError(f"raw publish: {h.failure or 'stopped early'}")
        return n / (h.ended - h.began)

    def raw_publish(self, n: int) -> float:
        topic = self._topic()
        self._declare(topic, topic)
        return self._raw_send(topic, n, window=self.threads)

    def raw_publish_wide(self, n: int) -> float:
        topic = self._topic()
        self._declare(topic, topic)
        return self._raw_send(topic, n, window=1000)

    def raw_drain(self, n: int) -> float:
        from proton import Delivery
        from proton.handlers import MessagingHandler
        from proton.reactor import Container

        topic = self._topic()
        self._prefill(topic, topic, n)
        vhost, prefetch = self.vhost, self.prefetch

        class Receiver(MessagingHandler):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(prefetch=0, auto_accept=False)
                self.count = 0
                self.began = self.ended = 0.0
                self.failure = ""

            def on_start(self, event: Any) -> None:
                self.began = time.perf_counter()
                conn = event.container.connect(f"amqp://{HOST}:{PORT}", user="guest",
                                               password="guest", virtual_host=f"vhost:{vhost}",
                                               allowed_mechs="PLAIN", reconnect=False)
                self.receiver = event.container.create_receiver(conn, f"/amq/queue/{topic}")
                self.receiver.flow(prefetch)
                event.container.schedule(TIMEOUT, self)

            def on_message(self, event: Any) -> None:
                _ = event.message.body
                dlv = event.delivery
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                self.receiver.flow(1)
                self.count += 1
                if self.count == n:
                    self.ended = time.perf_counter()
                    event.connection.close()
                    event.container.stop()

            def on_timer_task(self, event: Any) -> None:
                self.failure = f"timed out with {self.count}/{n}"
                event.container.stop()

        h = Receiver()
        Container(h).run()
        if h.failure or not h.ended:
            raise RuntimeError(f"raw drain: {h.failure or 'stopped early'}")
        return n / (h.ended - h.began)

    # -- tidings ---------------------------------------------------------------------------
    def _transport(self) -> Any:
        import tidings

        return tidings.get_notification_transport(f"{self.url}?prefetch={self.prefetch}",
                                                  default_exchange=self.exchange)

    def tidings_publish(self, n: int) -> float:
        import tidings

        t = self._transport()
        try:
            target = tidings.Target(topic=f"{self._topic()}.info")
            body = self.body
            t.send_raw(target, body, message_id="warm-up")  # connect and declare
            per = n // self.threads
            errors: list[BaseException] = []

            def work(w: int) -> None:
                try:
                    for i in range(per):
                        t.send_raw(target, body, message_id=f"{w}-{i}")
                except BaseException as exc:
                    errors.append(exc)

            return self._run_threads(work, per, errors)
        finally:
            t.cleanup()

    def tidings_notifier_publish(self, n: int) -> float:
        import tidings

        t = self._transport()
        try:
            topic = self._topic()
            notifier = tidings.Notifier(t, "bench.host", topics=[topic], raise_on_failure=True)
            notifier.info(CTXT, "compute.instance.update", PAYLOAD)  # connect and declare
            per = n // self.threads
            errors: list[BaseException] = []

            def work(w: int) -> None:
                try:
                    for _ in range(per):
                        notifier.info(CTXT, "compute.instance.update", PAYLOAD)
                except BaseException as exc:
                    errors.append(exc)

            return self._run_threads(work, per, errors)
        finally:
            t.cleanup()

    def _run_threads(self, work: Callable[[int], None], per: int,
                     errors: list[BaseException]) -> float:
        workers = [threading.Thread(target=work, args=(w,)) for w in range(self.threads)]
        began = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT)
        elapsed = time.perf_counter() - began
        if errors or any(w.is_alive() for w in workers):
            raise RuntimeError(f"tidings publish failed: {errors[:1] or 'timed out'}")
        return per * self.threads / elapsed

    def tidings_drain(self, n: int) -> float:
        import tidings

        topic = self._topic()
        self._prefill(f"{topic}.info", f"{topic}.info", n)
        t = self._transport()
        try:
            counter = Counter(n)
            listener = tidings.get_notification_listener(t, [tidings.Target(topic=topic)],
                                                         [counter])
            began = time.perf_counter()
            listener.start()
            if not counter.done.wait(TIMEOUT):
                raise RuntimeError(f"tidings drain: {counter.count}/{n} arrived")
            elapsed = time.perf_counter() - began
            listener.stop()
            listener.wait(30)
            return n / elapsed
        finally:
            t.cleanup()


    def tidings_driver_drain(self, n: int) -> float:
        from tidings.transports.base import ACK, Binding

        topic = self._topic()
        self._prefill(f"{topic}.info", f"{topic}.info", n)
        t = self._transport()
        try:
            began = time.perf_counter()
            prefetch = t.options["prefetch"]
            receiver = t.listen([Binding(self.exchange, f"{topic}.info")], None, prefetch)
            count = 0
            deadline = began + TIMEOUT
            while count < n:  # the driver alone, settled as the core does: a batch per call
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"tidings driver drain: {count}/{n} arrived")
                got = receiver.receive(prefetch, 0.2)
                if got:
                    receiver.settle([(msg, ACK) for msg in got])
                    count += len(got)
            elapsed = time.perf_counter() - began
            receiver.close()
            return n / elapsed
        finally:
            t.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000,
                        help="messages per publish run (default 4000)")
    parser.add_argument("--drain-messages", type=int, default=10000,
                        help="messages per drain run (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=16,
                        help="publishing threads = raw publish window (default 16)")
    parser.add_argument("--prefetch", type=int, default=64, help="consumer prefetch (default 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with rabbit_vhost("tidings-bench-amqp1") as vhost:  # fresh vhost, deleted afterwards
        bench = Bench(vhost, args.threads, args.prefetch)
        workloads: dict[str, tuple[Callable[[int], float], int]] = {
            "raw publish": (bench.raw_publish, args.messages),
            "tidings publish": (bench.tidings_publish, args.messages),
            "tidings notifier publish": (bench.tidings_notifier_publish, args.messages),
            "raw publish (window 1000)": (bench.raw_publish_wide, args.messages),
            "raw drain": (bench.raw_drain, args.drain_messages),
            "tidings drain": (bench.tidings_drain, args.drain_messages),
            "tidings driver drain": (bench.tidings_driver_drain, args.drain_messages),
        }
        rates: dict[str, list[float]] = {name: [] for name in workloads}
        began = time.perf_counter()
        for r in range(args.rounds):
            for name, (fn, n) in workloads.items():
                rates[name].append(fn(n))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{name} {vals[-1]:,.0f}/s" for name, vals in rates.items()), flush=True)

    print(f"\n{args.threads} publishing threads (raw window {args.threads}), prefetch "
          f"{args.prefetch}, {args.rounds} rounds in {time.perf_counter() - began:.0f}s")
    print(f"{'workload':<28}{'median/s':>10}{'min/s':>10}{'max/s':>10}")
    for name, vals in rates.items():
        print(f"{name:<28}{statistics.median(vals):>10,.0f}{min(vals):>10,.0f}"
              f"{max(vals):>10,.0f}")
    ok = True
    print()
    for what, ours, ref, target in [
            ("confirmed publish", "tidings publish", "raw publish", True),
            ("listener drain", "tidings drain", "raw drain", True),
            ("(info) via Notifier", "tidings notifier publish", "raw publish", False),
            ("(info) driver drain", "tidings driver drain", "raw drain", False),
            ("(info) publish", "tidings publish", "raw publish (window 1000)", False)]:
        # Ratio per round (same load), then the median of those.
        per_round = [a / b for a, b in zip(rates[ours], rates[ref], strict=True)]
        ratio = statistics.median(per_round)
        if target:
            ok &= ratio >= 0.70
        print(f"{what:<22}{ours} / {ref} = {ratio:.2f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in per_round)})"
              + ("; target >= 0.70" if target else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
