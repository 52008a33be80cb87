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
    # PYTHONPATH at the checkout being measured; add --wire-only to both for the floor)

    python benchmarks/cost_memory.py [--messages 12800] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from _common import CONTEXT, PAYLOAD, read_wire_body, wire_body

import tidings

BATCH = 64


class _Endpoint:
    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        return None


def run(messages: int, warmup: int = 640) -> float:
    """Seconds per notification over ``messages`` (after ``warmup`` not counted)."""
    transport = tidings.get_notification_transport(f"memory:///cost-{uuid.uuid4().hex}")
    try:
        notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
        listener = tidings.get_notification_listener(transport, [tidings.Target("bench")],
                                                     [_Endpoint()])
        driver_listener = transport.listen(listener.bindings, None, BATCH)

        def rounds(n: int) -> None:
            for _ in range(n // BATCH):
                for _ in range(BATCH):
                    notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)
                got = list(driver_listener.poll(1.0))
                if len(got) != BATCH:
                    raise RuntimeError(f"polled {len(got)} of {BATCH} notifications")
                listener._handle(got)

        rounds(warmup)
        began = time.perf_counter()
        rounds(messages)
        took = time.perf_counter() - began
        driver_listener.close()
        return took / messages if messages else 0.0
    finally:
        transport.cleanup()


def run_wire_only(messages: int, warmup: int = 640) -> float:
    """The same rounds with tidings' wire work alone (ids, timestamp, v2 encode and decode,
    the endpoint call): what ``run`` costs beyond this is tidings' delivery machinery."""
    endpoint = _Endpoint()

    def rounds(n: int) -> None:
        for _ in range(n // BATCH):
            bodies = [wire_body() for _ in range(BATCH)]
            for body in bodies:
                endpoint.info(*read_wire_body(body))

    rounds(warmup)
    began = time.perf_counter()
    rounds(messages)
    took = time.perf_counter() - began
    return took / messages if messages else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=12800,
                        help=f"notifications measured, a multiple of {BATCH}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--once", action="store_true",
                        help="one run, no output: for callgrind")
    parser.add_argument("--wire-only", action="store_true",
                        help="tidings' wire work alone, without its delivery machinery")
    args = parser.parse_args(argv)
    if args.messages % BATCH:
        parser.error(f"--messages must be a multiple of {BATCH}")
    measure = run_wire_only if args.wire_only else run
    if args.once:
        measure(args.messages)
        return 0
    results = [measure(args.messages) * 1e6 for _ in range(args.runs)]
    what = "wire work alone" if args.wire_only else "memory://"
    print(f"{what}, one thread, {args.messages} notifications x {args.runs} runs: "
          f"best {min(results):.2f} us per notification "
          f"({', '.join(f'{r:.2f}' for r in results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
