"""Raw client loops for ``tidings bench --compare raw``: the same workload without tidings.

* ``rabbit://``: py-amqp (the client under kombu) with publisher confirms, ``basic.qos`` prefetch
  and acks sent ``multiple`` every 32 messages, one connection per consumer;
* ``zmq://``: pyzmq PUSH/PULL with JSON, one PUSH per group fanning out to its members: no
  acknowledgement at all, so it is an upper bound rather than a like-for-like loop
  (benchmarks/bench_zmq.py also has an acknowledged DEALER/ROUTER loop).

Each is an adapter for :func:`tidings.bench.run_phases`; the broker library is imported only here.
:func:`delete_amqp_queues` removes the queues the oslo.messaging reference declares on RabbitMQ
(oslo gives them no expiry), so a run leaves none behind.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

from tidings.bench import Workload, _Sink
from tidings.transports.url import TransportURL

__all__ = ["RawAmqpAdapter", "RawZmqAdapter", "delete_amqp_queues"]

RAW_QUEUE_EXPIRY_MS = 600_000
"""x-expires of the raw loop's queues: they are deleted at the end of the run, and by the
broker 10 minutes later if the run was killed before it could."""


def _amqp_params(url: TransportURL) -> dict[str, str]:
    """py-amqp connection arguments for the URL's first host (guest by default)."""
    host = url.hosts[0] if url.hosts else None
    return {
        "host": f"{(host and host.hostname) or 'localhost'}:{(host and host.port) or 5672}",
        "userid": (host and host.username) or "guest",
        "password": (host and host.password) or "guest",
        "virtual_host": url.virtual_host or "/",
    }


def delete_amqp_queues(url: str, queues: list[str]) -> None:
    """Delete ``queues`` (those that exist) on the RabbitMQ of ``url``; best effort."""
    import amqp

    conn = amqp.Connection(**_amqp_params(TransportURL.parse(url)))
    try:
        conn.connect()
        for name in queues:
            chan = conn.channel()
            try:
                chan.queue_delete(name)
            except amqp.exceptions.AMQPError:
                pass  # not there (the broker closed that channel): nothing to delete
            else:
                chan.close()
    finally:
        conn.close()


class RawAmqpAdapter:
    """py-amqp against the URL's first host, in a fresh exchange and queues, removed after."""

    stores_backlog = True

    def __init__(self, work: Workload) -> None:
        import amqp

        self._amqp = amqp
        self.work = work
        self.name = "raw py-amqp"
        self._params = _amqp_params(TransportURL.parse(work.url))
        run = uuid.uuid4().hex[:8]
        self.exchange = f"raw-bench-{run}"
        self.queues = [f"raw-bench-{run}-{g or 'group'}" for g in work.groups]
        self._conn = self._connect()
        self._chan = self._conn.channel()
        self._chan.exchange_declare(self.exchange, "topic", durable=False, auto_delete=False)
        for q in self.queues:
            self._chan.queue_declare(q, durable=False, auto_delete=False,
                                     arguments={"x-expires": RAW_QUEUE_EXPIRY_MS})
            self._chan.queue_bind(q, self.exchange, "bench.info")

    def _connect(self) -> Any:
        conn = self._amqp.Connection(**self._params)
        conn.connect()
        return conn

    def start(self, sink: _Sink) -> Callable[[], None]:
        stop = threading.Event()
        threads = [threading.Thread(target=self._consume, args=(q, sink, stop), daemon=True)
                   for q in self.queues for _ in range(self.work.members)]
        self._ready = threading.Barrier(len(threads) + 1)  # consumers registered
        for t in threads:
            t.start()
        self._ready.wait(30)

        def halt() -> None:
            stop.set()
            for t in threads:
                t.join(30)
        return halt

    def _consume(self, queue: str, sink: _Sink, stop: threading.Event) -> None:
        conn = self._connect()
        chan = conn.channel()
        chan.basic_qos(0, self.work.prefetch or 64, False)
        unacked = [0]
        last_tag = [0]

        def on_message(msg: Any) -> None:
            sink.info(None, None, None, json.loads(msg.body), None)
            last_tag[0] = msg.delivery_tag
            unacked[0] += 1
            if unacked[0] >= 32:
                chan.basic_ack(last_tag[0], multiple=True)
                unacked[0] = 0

        chan.basic_consume(queue, callback=on_message)
        self._ready.wait(30)
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.1)
            except TimeoutError:
                if unacked[0]:
                    chan.basic_ack(last_tag[0], multiple=True)
                    unacked[0] = 0
        if unacked[0]:
            chan.basic_ack(last_tag[0], multiple=True)
        conn.close()

    def send(self, payload: dict[str, Any]) -> None:
        self._chan.basic_publish_confirm(  # waits for the broker's confirm, like tidings
            self._amqp.Message(json.dumps(payload), content_type="application/json",
                               delivery_mode=2), exchange=self.exchange, routing_key="bench.info")

    def close(self) -> None:
        try:
            for q in self.queues:
                self._chan.queue_delete(q)
            self._chan.exchange_delete(self.exchange)
        finally:
            self._conn.close()


class RawZmqAdapter:
    """pyzmq PUSH/PULL on loopback: members bind PULL sockets, one PUSH per group connects."""

    stores_backlog = False

    def __init__(self, work: Workload) -> None:
        import zmq

        self._zmq = zmq
        self.work = work
        self.name = "raw pyzmq push/pull"
        self._ctx = zmq.Context()
        self._pushes: list[Any] = []

    def start(self, sink: _Sink) -> Callable[[], None]:
        zmq = self._zmq
        stop = threading.Event()
        pulls, threads = [], []
        self._pushes = []
        for _group in self.work.groups:
            push = self._ctx.socket(zmq.PUSH)
            for _ in range(self.work.members):
                pull = self._ctx.socket(zmq.PULL)
                port = pull.bind_to_random_port("tcp://127.0.0.1")
                push.connect(f"tcp://127.0.0.1:{port}")
                pulls.append(pull)
            self._pushes.append(push)

        def consume(pull: Any) -> None:
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            while not stop.is_set():
                if poller.poll(100):
                    sink.info(None, None, None, json.loads(pull.recv()), None)

        for pull in pulls:
            t = threading.Thread(target=consume, args=(pull,), daemon=True)
            t.start()
            threads.append(t)

        def halt() -> None:
            stop.set()
            for t in threads:
                t.join(10)
            for sock in pulls + self._pushes:
                sock.close(0)
        return halt

    def send(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        for push in self._pushes:
            push.send(body)

    def close(self) -> None:
        self._ctx.term()
