"""rabbit:// on a private three-node cluster with quorum queues against one private node with
classic queues, same workload, same run.

Replication is what a quorum queue costs: every message is written to a majority of three
nodes before the broker confirms it, and every acknowledgement too. This measures that price
for tidings' pool model end to end. Both brokers are private (tidings.testing.rabbitcluster and
tidings.testing.rabbitnode: the installed RabbitMQ on free ports, data on /dev/shm when there is
one, so neither waits for a disk), started together for the run and killed with their data
afterwards; the shared broker on 5672 is not used.

The workload, the same on both: the no-pool group and two pools each consume the topic with one
listener (every notification is processed three times, once per consumer), and a
BackgroundNotifier (pipeline 64) takes N notifications from one thread. ``publish`` stops the
clock when ``flush()`` returns (the broker has confirmed every one); ``e2e`` when every
consumer's endpoint has been called N times. On the cluster each client lists all three nodes
in its URL and starts on its own one: the notifier and the group on the first, pool a on the
second, pool b on the third, so each queue's leader (the node that declared it) is a different
node.

    python benchmarks/bench_cluster.py [--messages 10000] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable

from _common import CONTEXT, PAYLOAD, Counter

import tidings
from tidings.testing.rabbitcluster import RabbitCluster, scratch_dir
from tidings.testing.rabbitnode import RabbitNode, rabbitmq_installed

CONSUMERS = (("group", None, 0), ("pool a", "a", 1), ("pool b", "b", 2))
"""(name, pool, node index on the cluster): who consumes, and where it connects first."""
NOTIFIER_NODE = 0


def run(url_for: Callable[[int], str], n: int, prefetch: int) -> tuple[float, float]:
    """One round on one broker: (confirmed publish rate, end-to-end rate), per second."""
    tag = uuid.uuid4().hex[:8]
    topic = f"bench-{tag}"
    transports = []
    listeners = []
    counters = []
    try:
        for _, pool, node in CONSUMERS:
            transport = tidings.get_notification_transport(url_for(node))
            transports.append(transport)
            counter = Counter(n + 1)  # the warm-up notification, then n
            counters.append(counter)
            listener = tidings.get_notification_listener(
                transport, [tidings.Target(topic=topic)], [counter],
                pool=f"{pool}-{tag}" if pool else None)
            listener.start()
            listeners.append(listener)
        sender = tidings.get_notification_transport(url_for(NOTIFIER_NODE))
        transports.append(sender)
        notifier = tidings.BackgroundNotifier(sender, "bench.host", topics=[topic],
                                              queue_size=n + 1, retry=None)
        notifier.info(CONTEXT, "warm.up", PAYLOAD)
        if not notifier.flush(60):
            raise RuntimeError("the warm-up notification was not confirmed")
        began = time.perf_counter()
        for _ in range(n):
            notifier.info(CONTEXT, "compute.instance.update", PAYLOAD)
        if not notifier.flush(300):
            raise RuntimeError(f"{notifier.pending()} notifications not confirmed")
        publish = n / (time.perf_counter() - began)
        for (name, _, _), counter in zip(CONSUMERS, counters, strict=True):
            if not counter.done.wait(300):
                raise RuntimeError(f"{name} got {counter.count - 1}/{n}")
        e2e = n / (time.perf_counter() - began)
        stats = notifier.stats.snapshot()
        notifier.close(30)
        if stats["failed"]:
            raise RuntimeError(f"{stats['failed']} notifications failed")
        return publish, e2e
    finally:
        for listener in listeners:
            listener.stop()
        for listener in listeners:
            listener.wait(30)
        for transport in transports:
            transport.cleanup()


def stop_single(node: RabbitNode) -> None:
    """Kill the single node and delete its directory (made here, so not the node's own)."""
    node.kill()
    shutil.rmtree(node.base_dir, ignore_errors=True)


def start_brokers() -> tuple[RabbitCluster, RabbitNode]:
    """The cluster and the single node, started at the same time (each start takes 5-20 s)."""
    cluster = RabbitCluster(3, tmpfs=True)
    single = RabbitNode(scratch_dir("tidings-bench-node-", tmpfs=True))
    errors: list[BaseException] = []

    def boot_single() -> None:
        try:
            single.start()
        except BaseException as exc:  # re-raised below, from the main thread
            errors.append(exc)

    thread = threading.Thread(target=boot_single, daemon=True)
    thread.start()
    try:
        cluster.start()
    except BaseException:
        thread.join(120)
        stop_single(single)
        cluster.teardown()
        raise
    thread.join(120)
    if errors or not single.running:
        stop_single(single)
        cluster.teardown()
        raise errors[0] if errors else RuntimeError("the single node did not start")
    return cluster, single


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000,
                        help="notifications per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--prefetch", type=int, default=64, help="listener prefetch")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not rabbitmq_installed():
        print("RabbitMQ is not installed here (apt-get install rabbitmq-server)",
              file=sys.stderr)
        return 1

    began = time.perf_counter()
    cluster, single = start_brokers()
    started_s = time.perf_counter() - began
    print(f"brokers up in {started_s:.1f}s", file=sys.stderr, flush=True)
    workloads: list[tuple[str, Callable[[int], str]]] = [
        ("3 nodes, quorum", lambda i: cluster.url(
            order=[i], query=f"quorum=true&prefetch={args.prefetch}")),
        ("1 node, classic", lambda i: single.url(query=f"prefetch={args.prefetch}")),
    ]
    rates: dict[str, dict[str, list[float]]] = {}
    try:
        for r in range(args.rounds):  # interleaved, so drift on a shared machine hits both
            for name, url_for in workloads:
                publish, e2e = run(url_for, args.messages, args.prefetch)
                row = rates.setdefault(name, {"publish": [], "e2e": []})
                row["publish"].append(publish)
                row["e2e"].append(e2e)
                print(f"round {r + 1}: {name:<16} publish {publish:>8,.0f}/s   "
                      f"e2e {e2e:>8,.0f}/s", file=sys.stderr, flush=True)
    finally:
        stop_single(single)
        cluster.teardown()

    med = {name: {k: statistics.median(v) for k, v in row.items()}
           for name, row in rates.items()}
    print(f"\nrabbit:// cluster benchmark: {args.messages} notifications x {args.rounds} "
          f"rounds, group + 2 pools (3 copies each), BackgroundNotifier, "
          f"prefetch {args.prefetch} (median notifications/s)")
    print(f"{'broker':<18}{'publish':>10}{'e2e':>10}   e2e per round")
    for name, row in rates.items():
        spread = ", ".join(f"{v:,.0f}" for v in row["e2e"])
        print(f"{name:<18}{med[name]['publish']:>10,.0f}{med[name]['e2e']:>10,.0f}   "
              f"({spread})")
    cluster_name, single_name = (name for name, _ in workloads)
    ratios = {k: med[cluster_name][k] / med[single_name][k] for k in ("publish", "e2e")}
    print(f"ratio 3-node quorum / 1-node classic: publish {ratios['publish']:.2f}x, "
          f"e2e {ratios['e2e']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rates": rates, "median": med, "ratio": ratios,
                       "messages": args.messages, "rounds": args.rounds}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
