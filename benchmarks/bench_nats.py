"""End-to-end notifications per second on nats:// against the same work done with nats-py by
hand (JetStream), measured in the same run.

The reference is what a JetStream application writes without tidings: publish each encoded
body and await its publish ack (tidings' notifier confirms each send too), while a durable pull
consumer fetches up to 64 at a time, decodes and acks each. tidings does the same plus what it
adds (envelope, dispatch on a worker pool, settlement bookkeeping, the thread hop between the
caller and the asyncio loop), so the figure reported is tidings / by hand.

    python benchmarks/bench_nats.py [--messages 5000] [--rounds 3]

Needs NATS with JetStream on 127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid

import nats
from _common import Counter as _Endpoint
from _common import read_wire_body, wire_body

URL = "nats://127.0.0.1:4222"


async def _drop(prefix: str) -> None:
    nc = await nats.connect(URL)
    js = nc.jetstream()
    for info in await js.streams_info():
        name = info.config.name or ""
        if name.startswith(prefix):
            await js.delete_stream(name)
    await nc.close()


def run_tidings(n: int) -> float:
    import tidings

    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    transport = tidings.get_notification_transport(f"{URL}/{namespace}")
    endpoint = _Endpoint(n)
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="bench")],
                                                 [endpoint])
    listener.start()
    notifier = tidings.Notifier(transport, "bench.host", topics=["bench"])
    try:
        began = time.perf_counter()
        for _ in range(n):
            notifier.info({"request_id": "req-1"}, "compute.instance.update",
                          {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}})
        if not endpoint.done.wait(300):
            raise RuntimeError(f"tidings delivered {endpoint.count}/{n}")
        return n / (time.perf_counter() - began)
    finally:
        listener.stop()
        listener.wait(30)
        transport.cleanup()
        asyncio.run(_drop(f"tidings_{namespace}_"))


async def _by_hand(n: int) -> float:
    stream = f"bench_{uuid.uuid4().hex[:10]}"
    producer, consumer = await nats.connect(URL), await nats.connect(URL)
    pjs, cjs = producer.jetstream(), consumer.jetstream()
    await pjs.add_stream(name=stream, subjects=[f"{stream}.>"], retention="interest")
    sub = await cjs.pull_subscribe(f"{stream}.bench.info", durable="group", stream=stream)
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < n:
            try:
                msgs = await sub.fetch(64, timeout=0.2)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                read_wire_body(msg.data)
                await msg.ack()
                received += 1

    task = asyncio.create_task(consume())
    try:
        began = time.perf_counter()
        for _ in range(n):
            await pjs.publish(f"{stream}.bench.info", wire_body())
        await asyncio.wait_for(task, 300)
        return n / (time.perf_counter() - began)
    finally:
        await producer.close()
        await consumer.close()
        await _drop(stream)


def run_by_hand(n: int) -> float:
    return asyncio.run(_by_hand(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows: dict[str, list[float]] = {"tidings nats://": [], "nats-py by hand": []}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
        rows["tidings nats://"].append(run_tidings(args.messages))
        rows["nats-py by hand"].append(run_by_hand(args.messages))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["tidings nats://"] / med["nats-py by hand"]
    print(f"end to end, {args.messages} notifications x {args.rounds} rounds (median msg/s)")
    for name, values in rows.items():
        spread = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<24} {med[name]:>10,.0f}   ({spread})")
    print(f"  ratio tidings/by hand: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rates": rows, "median": med, "ratio": ratio}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
