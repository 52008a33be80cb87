"""End-to-end notifications per second on nats:// against the same work done with nats-py by
hand (JetStream), measured in the same run.

The reference is what a JetStream application writes without tidings, on one asyncio thread:
publish each encoded body and await its publish ack (tidings' notifier confirms each send too),
while a durable pull consumer fetches up to 64 at a time, decodes each with tidings' envelope
code and acks it; the same number of messages, of the same size. tidings does the same plus
what it adds (the envelope, dispatch on a worker thread, settlement bookkeeping, a listener's
threads beside the sender's), so the figure reported is tidings / by hand. The same workload
through tidings on rabbit:// runs in the same rounds, for a second ratio.

    python benchmarks/bench_nats.py [--messages 5000] [--rounds 3]

Needs NATS with JetStream on 127.0.0.1:4222 and RabbitMQ on 127.0.0.1:5672.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import nats
from _common import compare_main, end_to_end, read_wire_body, wire_body

from tidings.testing.brokers import rabbit_vhost

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
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        return end_to_end(f"{URL}/{namespace}", n)
    finally:
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


def run_rabbit(n: int) -> float:
    """The same workload through tidings on rabbit:// (a fresh vhost on 127.0.0.1:5672)."""
    with rabbit_vhost("tidings-bench") as vhost:
        return end_to_end(f"rabbit://guest:guest@127.0.0.1:5672/{vhost}", n)


def main(argv: list[str] | None = None) -> int:
    return compare_main(argv, __doc__, ("tidings nats://", run_tidings),
                        ("nats-py by hand", run_by_hand), [("tidings rabbit://", run_rabbit)])


if __name__ == "__main__":
    sys.exit(main())
