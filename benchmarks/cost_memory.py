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

    python benchmarks/cost_memory.py [--messages 12800] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

import tidings

BATCH = 64
PAYLOAD = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}


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
                    notifier.info({"request_id": "req-1"}, "compute.instance.update", PAYLOAD)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=12800,
                        help=f"notifications measured, a multiple of {BATCH}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--once", action="store_true",
                        help="one run, no output: for callgrind")
    args = parser.parse_args(argv)
    if args.messages % BATCH:
        parser.error(f"--messages must be a multiple of {BATCH}")
    if args.once:
        run(args.messages)
        return 0
    results = [run(args.messages) * 1e6 for _ in range(args.runs)]
    print(f"memory://, one thread, {args.messages} notifications x {args.runs} runs: "
          f"best {min(results):.2f} us per notification "
          f"({', '.join(f'{r:.2f}' for r in results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
