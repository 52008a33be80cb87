"""What every benchmark script shares: the counting endpoint, the memory:// workload, and
tidings' wire work alone (for the bare-loop references). (A fresh RabbitMQ vhost comes from
tidings.testing.brokers.rabbit_vhost; the tidings-side harness is tidings.bench.)"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tidings.notify.stamps import new_message_id, utc_timestamp
from tidings.transports import envelope

__all__ = ["CONTEXT", "PAYLOAD", "Counter", "compare_main", "end_to_end", "endpoint_args",
           "read_wire_body", "wire_body"]

PAYLOAD = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}
CONTEXT = {"request_id": "req-1"}


def wire_body() -> bytes:
    """One notification of the memory:// workload as tidings puts it on the wire (its message
    id, timestamp and v2 envelope encoder), with nothing else of tidings around it."""
    message = {"message_id": new_message_id(), "publisher_id": "bench.host",
               "event_type": "compute.instance.update", "priority": "INFO",
               "payload": PAYLOAD, "timestamp": utc_timestamp()}
    return envelope.encode(envelope.pack_context(message, CONTEXT))


def endpoint_args(message: dict[str, Any], ctxt: dict[str, Any]) -> tuple[Any, ...]:
    """What an endpoint method gets for a decoded wire message: (ctxt, publisher_id,
    event_type, payload, metadata)."""
    return (ctxt, message["publisher_id"], message["event_type"], message["payload"],
            {"message_id": message["message_id"], "timestamp": message["timestamp"]})


def read_wire_body(body: bytes) -> tuple[Any, ...]:
    """The endpoint arguments of a body, decoded with tidings' envelope decoder and nothing
    else."""
    message = envelope.decode(body)
    return endpoint_args(message, envelope.context_of(message))


class Counter:
    """An endpoint (for tidings and oslo.messaging alike) that counts and signals the N-th
    notification. Thread-safe: both libraries call endpoints from a pool of threads.
    ``wait``: seconds each call waits first, as an endpoint that writes to a database does."""

    def __init__(self, expected: int, wait: float = 0.0) -> None:
        self.expected = expected
        self.wait = wait
        self.count = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        if self.wait:
            time.sleep(self.wait)
        with self._lock:
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


def compare_main(argv: list[str] | None, doc: str | None, ours: tuple[str, Callable[[int], float]],
                 reference: tuple[str, Callable[[int], float]],
                 others: Sequence[tuple[str, Callable[[int], float]]] = ()) -> int:
    """The command line of a benchmark that compares one tidings workload with a bare loop by
    hand: ``--messages``, ``--rounds`` (interleaved), ``--json``; prints the median rates and
    the ratio. ``others`` are more rows in the same rounds (tidings on another transport, say),
    each with its own ratio."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows: dict[str, list[float]] = {name: [] for name, _ in (ours, reference, *others)}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits them alike
        for name, run in (ours, reference, *others):
            rows[name].append(run(args.messages))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med[ours[0]] / med[reference[0]]
    print(f"end to end, {args.messages} notifications x {args.rounds} rounds (median msg/s)")
    for name, values in rows.items():
        spread = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<24} {med[name]:>10,.0f}   ({spread})")
    print(f"  ratio tidings/by hand: {ratio:.2f}x")
    for name, _ in others:
        print(f"  ratio {ours[0]} / {name}: {med[ours[0]] / med[name]:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rates": rows, "median": med, "ratio": ratio}, fh, indent=2)
    return 0


def end_to_end(url: str, n: int) -> float:
    """Notifications per second through tidings on ``url``: a Notifier sends ``n`` from this
    thread, a listener's endpoint counts them; the clock stops at the last endpoint call."""
    import tidings

    transport = tidings.get_notification_transport(url)
    endpoint = Counter(n)
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="bench")],
                                                 [endpoint])
    listener.start()
    notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
    try:
        began = time.perf_counter()
        for _ in range(n):
            notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)
        if not endpoint.done.wait(300):
            raise RuntimeError(f"tidings delivered {endpoint.count}/{n}")
        return n / (time.perf_counter() - began)
    finally:
        listener.stop()
        listener.wait(30)
        transport.cleanup()
