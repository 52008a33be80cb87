"""End-to-end notifications per second on memory:// against oslo.messaging's fake: driver.

Both run the same workload in the same process and run: a Notifier sends N notifications, a
threading listener's endpoint receives them, each is acknowledged; the clock runs from the first
send to the last endpoint call. The figure reported is tidings / oslo.messaging (target >= 5x).
Process CPU time per message is shown beside each rate: both libraries run in one process, so it
says how much work each message costs, which a machine shared with other jobs disturbs less
than the wall-clock rate.

Two more rows carry the same bytes with no library at all, in a bare loop: this thread builds
the oslo.messaging message (id, timestamp, context) and encodes it in the v2 envelope, a deque
hands the bytes to a second thread, which decodes both JSON layers and calls the same endpoint
(nothing to acknowledge, no statistics, no checks). "stdlib json" writes that loop plainly
(uuid4, datetime, json.dumps/loads), as a user would by hand. "tidings wire" does it with
tidings' own ids, timestamps and envelope code: the wire work alone, so its ratio to
oslo.messaging is the ceiling for any library that carries v2 bytes this way, and tidings'
share of it says what its delivery machinery costs.

    python benchmarks/bench_memory.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import statistics
import sys
import threading
import time
import uuid
from typing import Any

from _common import CONTEXT, PAYLOAD, endpoint_args, read_wire_body, wire_body
from _common import Counter as _Endpoint


def run_tidings(n: int) -> float:
    import tidings

    transport = tidings.get_notification_transport(f"memory:///bench-{uuid.uuid4().hex}")
    endpoint = _Endpoint(n)
    listener = tidings.get_notification_listener(
        transport, [tidings.Target(topic="bench")], [endpoint])
    listener.start()
    notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
    began = time.perf_counter()
    for _ in range(n):
        notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)
    if not endpoint.done.wait(300):
        raise RuntimeError(f"tidings delivered {endpoint.count}/{n}")
    took = time.perf_counter() - began
    listener.stop()
    listener.wait(30)
    transport.cleanup()
    return n / took


def run_oslo(n: int) -> float:
    import oslo_messaging
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf([], project="bench")
    transport = oslo_messaging.get_notification_transport(conf, url="fake:")
    endpoint = _Endpoint(n)
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(topic="bench")], [endpoint], executor="threading")
    listener.start()
    notifier = oslo_messaging.Notifier(transport, "bench.host", driver="messagingv2",
                                       topics=["bench"])
    began = time.perf_counter()
    for _ in range(n):
        notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)
    if not endpoint.done.wait(300):
        raise RuntimeError(f"oslo.messaging delivered {endpoint.count}/{n}")
    took = time.perf_counter() - began
    listener.stop()
    listener.wait()
    transport.cleanup()
    return n / took


def _two_thread_loop(n: int, make_body: Any, read_body: Any) -> float:
    """Notifications per second of a bare loop: ``make_body()`` n times in this thread, the
    bytes handed through a deque to a second thread that calls ``read_body(body)`` (which
    returns the endpoint's five arguments) and the endpoint. No library in between."""
    endpoint = _Endpoint(n)
    waiting: collections.deque[bytes] = collections.deque()
    wakeup = threading.Condition()
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            with wakeup:
                if not waiting:
                    wakeup.wait(0.2)
                bodies = list(waiting)
                waiting.clear()
            for body in bodies:
                endpoint.info(*read_body(body))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    began = time.perf_counter()
    for _ in range(n):
        body = make_body()
        with wakeup:
            waiting.append(body)
            if len(waiting) == 1:
                wakeup.notify()
    if not endpoint.done.wait(300):
        raise RuntimeError(f"the bare loop delivered {endpoint.count}/{n}")
    took = time.perf_counter() - began
    stop.set()
    thread.join(30)
    return n / took


def run_stdlib(n: int) -> float:
    """The same wire work written plainly: uuid4, datetime and json, as a user would by hand."""
    utc = datetime.timezone.utc

    def make_body() -> bytes:
        message = {"message_id": str(uuid.uuid4()), "publisher_id": "bench.host",
                   "event_type": "compute.instance.update", "priority": "INFO",
                   "payload": PAYLOAD,
                   "timestamp": str(datetime.datetime.now(utc).replace(tzinfo=None))}
        for key, value in CONTEXT.items():
            message["_context_" + key] = value
        return json.dumps({"oslo.version": "2.0",
                           "oslo.message": json.dumps(message)}).encode("utf-8")

    def read_body(body: bytes) -> tuple[Any, ...]:
        message = json.loads(json.loads(body)["oslo.message"])
        ctxt = {k[9:]: v for k, v in message.items() if k.startswith("_context_")}
        return endpoint_args(message, ctxt)

    return _two_thread_loop(n, make_body, read_body)


def run_wire_only(n: int) -> float:
    """tidings' own wire work and nothing else: its message ids, timestamps, envelope encoder
    and decoder, in the bare loop. What tidings costs beyond this is its delivery machinery
    (notifier, transport, broker model, listener, dispatch, acknowledgement, statistics)."""
    return _two_thread_loop(n, wire_body, read_wire_body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    runners = {"tidings memory://": run_tidings, "oslo.messaging fake:": run_oslo,
               "bare loop, stdlib json": run_stdlib, "bare loop, tidings wire": run_wire_only}
    rows: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
        for name, run in runners.items():
            began = time.process_time()
            rows[name].append(run(args.messages))
            cpu[name].append((time.process_time() - began) / args.messages * 1e6)
    med = {k: statistics.median(v) for k, v in rows.items()}
    oslo = med["oslo.messaging fake:"]
    ratio = med["tidings memory://"] / oslo
    print(f"end to end, {args.messages} notifications x {args.rounds} rounds (median msg/s; "
          f"process CPU us/msg)")
    for name, values in rows.items():
        spread = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<22} {med[name]:>10,.0f}   {statistics.median(cpu[name]):6.1f} us   "
              f"({spread})")
    verdict = "meets" if ratio >= 5 else "MISSES"
    print(f"  ratio tidings/oslo.messaging: {ratio:.1f}x ({verdict} the 5x target)")
    ours, wire = med["tidings memory://"], med["bare loop, tidings wire"]
    print(f"  tidings / bare stdlib loop: {ours / med['bare loop, stdlib json']:.1f}x")
    print(f"  bare loop with tidings' wire work / oslo.messaging: {wire / oslo:.1f}x (the ceiling "
          f"for carrying v2 bytes); tidings reaches {ours / wire:.0%} of it")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rates": rows, "median": med, "ratio": ratio, "cpu_us_per_msg": cpu,
                       "wire_ceiling_ratio": wire / oslo}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
