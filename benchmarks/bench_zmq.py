"""Acknowledged notifications per second over zmq://, against raw pyzmq loops and RabbitMQ.

Five workloads, each in this one process (over loopback TCP where there is a network), measured
in the same run and interleaved round by round so that the load of a shared machine hits them
alike:

* ``raw push/pull``: a PUSH socket sends N JSON notifications, a PULL socket in another thread
  decodes them. No acknowledgement: the ceiling of pyzmq with JSON in Python.
* ``raw acked``: DEALER -> ROUTER, the receiver decodes each JSON message and sends an ack frame
  per message; the sender keeps at most 1,000 unacknowledged. The reference for acked delivery.
* ``tidings zmq://``: a Notifier sends N notifications, a NotificationListener's endpoint gets
  them, each is acknowledged back to the sender; the clock stops when the last endpoint call has
  happened and the sender's window is empty (every acknowledgement is back).
* ``tidings memory://``: the same through the in-process memory driver, no sockets at all: the
  ceiling the core itself (notifier, envelope, dispatch) allows, for reading the ratios.
* ``tidings rabbit://``: the same through the RabbitMQ driver, in a fresh vhost, when it imports
  and RabbitMQ answers on 127.0.0.1:5672; otherwise reported as not measured, with the reason.
  It runs in a child process per round (outside the clock), with a time limit.

Printed: each rate's median and spread, and the ratios tidings zmq / raw acked (target >= 0.5)
and tidings zmq / tidings rabbit (target >= 3). About a minute with the defaults on a quiet
machine (the RabbitMQ vhost setup runs outside the clock but inside that minute).

    python benchmarks/bench_zmq.py [--messages 20000] [--rabbit-messages 2000] [--rounds 4]
                                   [--no-rabbit]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
from _common import Counter as _Endpoint

PAYLOAD = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}
WINDOW = 1000


def _notification(i: int) -> dict[str, Any]:
    """What a raw loop sends: the same fields a tidings notification carries."""
    return {"message_id": str(uuid.uuid4()), "publisher_id": "bench.host",
            "event_type": "compute.instance.update", "priority": "INFO", "payload": PAYLOAD,
            "timestamp": "2026-11-22 10:00:00.000000", "_context_request_id": "req-1", "i": i}


def run_raw_push_pull(n: int) -> float:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    done = threading.Event()

    def receive() -> None:
        for _ in range(n):
            json.loads(pull.recv())
        done.set()

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    began = time.perf_counter()
    for i in range(n):
        push.send(json.dumps(_notification(i)).encode())
    if not done.wait(300):
        raise RuntimeError("raw push/pull did not finish")
    took = time.perf_counter() - began
    thread.join()
    push.close(0)
    pull.close(0)
    ctx.term()
    return n / took


def run_raw_acked(n: int) -> float:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    # A ROUTER drops what it cannot queue: with the default high-water marks a burst of acks
    # on a busy machine can be dropped and the loop would wait for them for ever. The window
    # bounds the queues instead (as in the tidings driver).
    router.setsockopt(zmq.SNDHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def receive() -> None:
        for _ in range(n):
            sender, body = router.recv_multipart()
            message = json.loads(body)
            router.send_multipart([sender, str(message["i"]).encode()])

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    began = time.perf_counter()
    unacked: set[int] = set()
    sent = acked = 0
    while acked < n:
        while sent < n and len(unacked) < WINDOW:
            dealer.send(json.dumps(_notification(sent)).encode())
            unacked.add(sent)
            sent += 1
        if not dealer.poll(30_000):
            raise RuntimeError("raw acked loop stalled")
        while True:
            try:
                ack = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            unacked.discard(int(ack))
            acked += 1
    took = time.perf_counter() - began
    thread.join()
    dealer.close(0)
    router.close(0)
    ctx.term()
    return n / took


def run_tidings(url: str, n: int, drained: Callable[[Any], bool] | None = None,
                retry: int | None = None) -> float:
    """Notifier -> listener endpoint -> acknowledgement, on one transport from ``url``."""
    import tidings

    transport = tidings.get_notification_transport(url)
    endpoint = _Endpoint(n)
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="bench")],
                                                 [endpoint])
    listener.start()
    notifier = tidings.Notifier(transport, "bench.host", topics=["bench"], retry=retry,
                                raise_on_failure=True)
    try:
        began = time.perf_counter()
        for _ in range(n):
            notifier.info({"request_id": "req-1"}, "compute.instance.update", PAYLOAD)
        if not endpoint.done.wait(300):
            raise RuntimeError(f"{url}: delivered {endpoint.count}/{n}")
        deadline = time.monotonic() + 60
        while drained is not None and not drained(transport):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: acknowledgements did not come back")
            time.sleep(0.001)
        took = time.perf_counter() - began
    finally:
        listener.stop()
        listener.wait(30)
        transport.cleanup()
    return n / took


def _zmq_drained(transport: Any) -> bool:
    return transport._driver._sender.unacknowledged == 0


def run_zmq(n: int) -> float:
    return run_tidings(f"zmq+memory:///bench-{uuid.uuid4().hex[:12]}", n, _zmq_drained)


def rabbit_runner(timeout: float) -> tuple[Callable[[int], float] | None, str]:
    """A runner for the RabbitMQ driver, or None and why it cannot be measured.

    Each rabbit measurement runs in a child process with a time limit, so a driver that hangs
    (it is written concurrently with this benchmark) costs a bounded time and a clear message.
    """
    try:
        from tidings.testing.brokers import service_up
        from tidings.transports.loader import load_driver_class

        load_driver_class("rabbit")
    except Exception as exc:
        return None, f"the rabbit driver does not load ({exc})"
    if not service_up("127.0.0.1", 5672):
        return None, "RabbitMQ is not answering on 127.0.0.1:5672"

    def run(n: int) -> float:
        proc = subprocess.run([sys.executable, __file__, "--rabbit-child", str(n)],
                              capture_output=True, text=True, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {proc.returncode}: {tail}")
        return float(lines[-1])

    return run, ""


def rabbit_child(n: int) -> int:
    """In the child: one measurement on a fresh vhost, the rate printed on the last line."""
    from tidings.testing.brokers import rabbit_vhost

    with rabbit_vhost("tidings-bench") as vhost:
        # The clock stops at the last endpoint call: a broker's acks are not observable from
        # the notifier's side, and the listener acknowledges right after the endpoint.
        rate = run_tidings(f"rabbit://guest:guest@127.0.0.1:5672/{vhost}", n, retry=3)
    print(rate)
    return 0


def _summary(rates: list[float]) -> str:
    if not rates:
        return "not measured"
    med = statistics.median(rates)
    return (f"{med:10,.0f} msg/s  (min {min(rates):,.0f}, max {max(rates):,.0f}, "
            f"spread {100 * (max(rates) - min(rates)) / med:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rabbit-messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rabbit-timeout", type=float, default=120.0,
                        help="seconds one rabbit measurement may take before it is abandoned")
    parser.add_argument("--no-rabbit", action="store_true")
    parser.add_argument("--rabbit-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.rabbit_child:
        return rabbit_child(args.rabbit_child)

    rabbit, why_not = ((None, "skipped (--no-rabbit)") if args.no_rabbit
                       else rabbit_runner(args.rabbit_timeout))
    rates: dict[str, list[float]] = {"raw push/pull": [], "raw acked (window 1000)": [],
                                     "tidings zmq://": [], "tidings memory://": [],
                                     "tidings rabbit://": []}
    for round_no in range(1, args.rounds + 1):
        rates["raw push/pull"].append(run_raw_push_pull(args.messages))
        rates["raw acked (window 1000)"].append(run_raw_acked(args.messages))
        rates["tidings zmq://"].append(run_zmq(args.messages))
        rates["tidings memory://"].append(
            run_tidings(f"memory:///bench-{uuid.uuid4().hex[:12]}", args.messages))
        if rabbit is not None:
            try:
                rates["tidings rabbit://"].append(rabbit(args.rabbit_messages))
            except Exception as exc:
                rabbit, why_not = None, f"the rabbit run failed ({exc})"
        print(f"round {round_no}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()
                                                if len(v) == round_no), flush=True)

    print(f"\n{args.messages} messages x {args.rounds} rounds, one process, loopback TCP")
    for name, values in rates.items():
        print(f"  {name:26} {_summary(values)}")
    zmq_rate = statistics.median(rates["tidings zmq://"])
    acked = statistics.median(rates["raw acked (window 1000)"])
    print(f"\ntidings zmq:// / raw acked loop      = {zmq_rate / acked:.2f}  (target >= 0.50)")
    per_round = [z / a for z, a in zip(rates["tidings zmq://"],
                                       rates["raw acked (window 1000)"], strict=True)]
    print(f"  per round: {', '.join(f'{r:.2f}' for r in per_round)}")
    memory_rate = statistics.median(rates["tidings memory://"])
    print(f"tidings memory:// / raw acked loop   = {memory_rate / acked:.2f}  (the core's "
          f"ceiling: no sockets at all)")
    if rates["tidings rabbit://"]:
        rabbit_rate = statistics.median(rates["tidings rabbit://"])
        print(f"tidings zmq:// / tidings rabbit://   = {zmq_rate / rabbit_rate:.2f}  "
              f"(target >= 3.00; rabbit on {args.rabbit_messages} messages per round)")
    else:
        print(f"tidings zmq:// / tidings rabbit://   = not measured: {why_not}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
