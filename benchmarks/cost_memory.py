"""The CPU cost of one notification on memory://, end to end, in one thread: a steady figure to
compare two versions of tidings by, where the two-thread benchmark (bench_memory.py) swings by a
third from run to run on a 2-core VM with the same code.

One thread sends 64 notifications, polls them and hands them to a listener's handler (decode,
dispatch, ack), and repeats, so nothing waits on the GIL or a lock and the backlog stays small.
It prints the wall time per notification (best of a few runs). For an instruction count that
does not depend on what else the machine is doing, run it under callgrind twice, with and
without the measured part, and divide the difference (hash seed fixed, since string hashes
change dict probing)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/cost_memory.py --messages 6400 --once
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/cost_memory.py --messages 0 --once
    # (first "Collected" - second) / 6400 = instructions per notification
    # (run the script once first, so that neither run compiles bytecode caches, and point
    # PYTHONPATH at the checkout being measured)

    python benchmarks/cost_memory.py [--messages 12800] [--runs 5] [--layer full]

``--layer`` says how much of tidings the rounds go through, each layer adding to the one
before, so the differences say what each costs: ``wire`` (ids, timestamp, v2 encode and decode,
the endpoint call: tidings' wire work alone), ``broker`` (+ the memory:// driver and the core's
consumer: send, hand-over, held set, batched settlement), ``transport`` (+ Transport: packing,
size checks, retry frame, decode checks), ``notifier`` (+ Notifier: building the message,
statistics) and ``full`` (+ the listener: Notification, dispatch, settlement policy,
statistics).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from _common import CONTEXT, PAYLOAD, endpoint_args, read_wire_body, wire_body

import tidings
from tidings.notify.stamps import new_message_id, utc_timestamp
from tidings.transports import envelope
from tidings.transports.base import Binding, OutgoingMessage

BATCH = 64
LAYERS = ("wire", "broker", "transport", "notifier", "full")


class _Endpoint:
    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        return None


def run(messages: int, layer: str = "full", warmup: int = 640) -> float:
    """Seconds per notification over ``messages`` (after ``warmup`` not counted), through
    tidings up to ``layer`` (see the module docstring)."""
    endpoint = _Endpoint()
    transport = tidings.get_notification_transport(f"memory:///cost-{uuid.uuid4().hex}")
    try:
        notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
        listener = tidings.get_notification_listener(transport, [tidings.Target(topic="bench")],
                                                     [endpoint])
        # The core's own consumer code, driven from this thread: hold what the driver
        # delivered, run the handler, hand the settlements to the driver as one batch.
        consumer = transport.consumer(listener.bindings, None, listener._handle, name="cost",
                                      prefetch=BATCH)
        receiver = transport.listen(listener.bindings, None, BATCH)
        driver = transport._driver
        target = [tidings.Target(topic="bench.info")]
        binding = Binding(transport.default_exchange, "bench.info")

        def send() -> None:
            if layer == "broker":
                driver.send_batch((OutgoingMessage(binding.exchange, binding.routing_key,
                                                   wire_body(), "id"),), None)
            elif layer == "transport":
                transport._send_notifications(target, CONTEXT, {
                    "message_id": new_message_id(), "publisher_id": "bench.host",
                    "event_type": "compute.instance.update", "priority": "INFO",
                    "payload": PAYLOAD, "timestamp": utc_timestamp()})
            else:
                notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)

        def receive(got: list[Any]) -> None:
            if layer == "full":
                listener._handle(got)
                return
            for msg in got:
                if layer == "broker":
                    endpoint.info(*read_wire_body(msg.body))
                else:
                    message = transport.decode(msg)
                    endpoint.info(*endpoint_args(message, envelope.context_of(message)))
                msg.ack()

        def through_tidings(n: int) -> None:
            for _ in range(n // BATCH):
                for _ in range(BATCH):
                    send()
                got = consumer._accept(receiver.receive(BATCH, 1.0), BATCH)
                if len(got) != BATCH:
                    raise RuntimeError(f"received {len(got)} of {BATCH} notifications")
                receive(got)
                consumer._flush(receiver)

        def wire_only(n: int) -> None:
            for _ in range(n // BATCH):
                bodies = [wire_body() for _ in range(BATCH)]
                for body in bodies:
                    endpoint.info(*read_wire_body(body))

        rounds: Callable[[int], None] = wire_only if layer == "wire" else through_tidings
        rounds(warmup)
        began = time.perf_counter()
        rounds(messages)
        took = time.perf_counter() - began
        receiver.close()
        return took / messages if messages else 0.0
    finally:
        transport.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=12800,
                        help=f"notifications measured, a multiple of {BATCH}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--once", action="store_true",
                        help="one run, no output: for callgrind")
    parser.add_argument("--layer", choices=LAYERS, default="full",
                        help="how much of tidings to go through (default: all of it)")
    args = parser.parse_args(argv)
    if args.messages % BATCH:
        parser.error(f"--messages must be a multiple of {BATCH}")
    if args.once:
        run(args.messages, args.layer)
        return 0
    results = [run(args.messages, args.layer) * 1e6 for _ in range(args.runs)]
    print(f"memory:// up to layer {args.layer!r}, one thread, {args.messages} notifications x "
          f"{args.runs} runs: best {min(results):.2f} us per notification "
          f"({', '.join(f'{r:.2f}' for r in results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
