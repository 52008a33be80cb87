"""End-to-end notifications per second on memory:// against oslo.messaging's fake: driver.

Both run the same workload in the same process and run: a Notifier sends N notifications, a
threading listener's endpoint receives them, each is acknowledged; the clock runs from the first
send to the last endpoint call. The figure reported is tidings / oslo.messaging (target >= 5x).
Process CPU time per message is shown beside each rate: both libraries run in one process, so it
says how much work each message costs, which a machine shared with other jobs disturbs less
than the wall-clock rate.

    python benchmarks/bench_memory.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid

from _common import Counter as _Endpoint


def run_tidings(n: int) -> float:
    import tidings

    transport = tidings.get_notification_transport(f"memory:///bench-{uuid.uuid4().hex}")
    endpoint = _Endpoint(n)
    listener = tidings.get_notification_listener(
        transport, [tidings.Target("bench")], [endpoint])
    listener.start()
    notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
    payload = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}
    began = time.perf_counter()
    for _ in range(n):
        notifier.info({"request_id": "req-1"}, "compute.instance.update", payload)
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
    payload = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}
    began = time.perf_counter()
    for _ in range(n):
        notifier.info({"request_id": "req-1"}, "compute.instance.update", payload)
    if not endpoint.done.wait(300):
        raise RuntimeError(f"oslo.messaging delivered {endpoint.count}/{n}")
    took = time.perf_counter() - began
    listener.stop()
    listener.wait()
    transport.cleanup()
    return n / took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    runners = {"tidings memory://": run_tidings, "oslo.messaging fake:": run_oslo}
    rows: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
        for name, run in runners.items():
            began = time.process_time()
            rows[name].append(run(args.messages))
            cpu[name].append((time.process_time() - began) / args.messages * 1e6)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["tidings memory://"] / med["oslo.messaging fake:"]
    print(f"end to end, {args.messages} notifications x {args.rounds} rounds (median msg/s; "
          f"process CPU us/msg)")
    for name, values in rows.items():
        spread = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<22} {med[name]:>10,.0f}   {statistics.median(cpu[name]):6.1f} us   "
              f"({spread})")
    verdict = "meets" if ratio >= 5 else "MISSES"
    print(f"  ratio tidings/oslo.messaging: {ratio:.1f}x ({verdict} the 5x target)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rates": rows, "median": med, "ratio": ratio, "cpu_us_per_msg": cpu},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
