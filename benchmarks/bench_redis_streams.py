"""End-to-end notifications per second on the example plugin (redisstreams://) against the same
work done with redis-py by hand, measured in the same run.

The reference is the floor a Redis Streams consumer cannot go below: XADD each encoded body,
one consumer XREADGROUPs up to 64 at a time and XACKs each. tidings does the same plus what it
adds (envelope, dispatch, settlement bookkeeping, XAUTOCLAIM for requeued entries), so the
figure reported is tidings / hand-written; it says what the abstraction costs.

    python benchmarks/bench_redis_streams.py [--messages 5000] [--rounds 3]

Needs Redis on 127.0.0.1:6379 and ``pip install -e examples/tidings-redis-streams``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from typing import Any

import redis
from _common import compare_main, end_to_end

HOST, PORT = "127.0.0.1", 6379
PAYLOAD = {"instance_id": "0" * 36, "state": "active", "flavor": {"vcpus": 2}}


def _drop(namespace: str) -> None:
    client = redis.Redis(HOST, PORT)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def run_tidings(n: int) -> float:
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        return end_to_end(f"redisstreams://{HOST}:{PORT}/{namespace}", n)
    finally:
        _drop(namespace)


def run_by_hand(n: int) -> float:
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    key = f"{namespace}:stream"
    producer, consumer = redis.Redis(HOST, PORT), redis.Redis(HOST, PORT)
    producer.xgroup_create(key, "group", id="0", mkstream=True)
    body = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(
        {"message_id": "x", "publisher_id": "bench.host", "priority": "INFO",
         "event_type": "compute.instance.update", "payload": PAYLOAD,
         "timestamp": "2026-01-01 00:00:00", "_context_request_id": "req-1"})}).encode()
    received = 0
    done = threading.Event()

    def consume() -> None:
        nonlocal received
        while received < n:
            reply: Any = consumer.xreadgroup("group", "c1", {key: ">"}, count=64, block=200)
            for _, entries in reply or ():
                for entry, fields in entries:
                    json.loads(json.loads(fields[b"body"])["oslo.message"])
                    consumer.xack(key, "group", entry)
                    received += 1
        done.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    try:
        began = time.perf_counter()
        for i in range(n):
            producer.xadd(key, {b"body": body, b"id": str(i)})
        if not done.wait(300):
            raise RuntimeError(f"by hand delivered {received}/{n}")
        return n / (time.perf_counter() - began)
    finally:
        worker.join(5)
        producer.close()
        consumer.close()
        _drop(namespace)


def main(argv: list[str] | None = None) -> int:
    return compare_main(argv, __doc__, ("tidings redisstreams://", run_tidings),
                        ("redis-py by hand", run_by_hand))


if __name__ == "__main__":
    sys.exit(main())
