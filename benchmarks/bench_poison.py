"""What messages that always fail cost a rabbit:// listener, against oslo.messaging 18 in the
same run, on the RabbitMQ on 127.0.0.1:5672 (a fresh virtual host, deleted afterwards).

Each run starts one listener in a child process of its own (so the notifier's CPU is not
counted), prefetch 64, ``threading`` executor, ``allow_requeue=True``, with an endpoint that
returns ``NotificationResult.REQUEUE`` for poison messages (``--raise``: raises instead; both
libraries requeue either way) and counts every call:

1. once the listener is up, its process's CPU time is measured while it has nothing to do
   (``--idle`` seconds): the baseline;
2. then this process sends 64 poison notifications followed by 100 good ones, and the child
   measures its own CPU time (``time.process_time()``, every thread of the process) over the
   next ``--window`` seconds, sampled every 0.25 s; it records when the 100th good notification
   reached the endpoint and how many times each poison message was delivered;
3. the listener is stopped, the child exits (killed if it does not within 30 s: oslo.messaging
   requeues for ever) and its queue is deleted.

tidings requeues a failed message after 0.1 s, doubling up to 1 s, holding its prefetch slot
meanwhile, and rejects it at its 5th delivery (``requeue_delay``, ``requeue_max_delay``,
``max_deliveries``); oslo.messaging hands it back to the broker at once, for ever. oslo.messaging
runs with ``rabbit_qos_prefetch_count=64`` too (``--oslo-prefetch 0``: its default, unlimited).

Rounds are interleaved (tidings, then oslo.messaging, each round). The table shows medians:
CPU as % of one core over the window, the busiest second of it, idle, the window less idle;
deliveries per poison message; seconds until the 100th good notification arrived (``-`` if it
did not within the window). Target: tidings under 10% of a core over the window.

    python benchmarks/bench_poison.py [--rounds 3] [--window 10] [--idle 5] [--raise]
                                      [--oslo-prefetch 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from tidings.testing.brokers import rabbit_vhost

HOST, PORT = "127.0.0.1", 5672
POISON, GOOD, PREFETCH = 64, 100, 64
SAMPLE = 0.25  # seconds between CPU samples in the child
TARGET = 10.0  # % of one core


# -- the listener, in a child process ---------------------------------------------------------
class Endpoint:
    """Fails every poison notification, counts every call (both libraries call it from a pool
    of threads)."""

    def __init__(self, requeue: Any, fail_by_raising: bool) -> None:
        self.requeue = requeue
        self.fail_by_raising = fail_by_raising
        self.deliveries: Counter[int] = Counter()
        self.good = 0
        self.good_at: float | None = None
        self.lock = threading.Lock()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> Any:
        with self.lock:
            if payload["poison"]:
                self.deliveries[payload["i"]] += 1
            else:
                self.good += 1
                if self.good == GOOD:
                    self.good_at = time.monotonic()
                return None
        if self.fail_by_raising:
            raise RuntimeError("always fails")
        return self.requeue


def _start_tidings(url: str, topic: str, endpoint_of: Any) -> tuple[Any, Any, Any]:
    import tidings

    transport = tidings.get_notification_transport(f"{url}?prefetch={PREFETCH}")
    endpoint = endpoint_of(tidings.NotificationResult.REQUEUE)
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic=topic)],
                                                 [endpoint], executor="threading",
                                                 allow_requeue=True)
    listener.start()

    def stop() -> dict[str, Any]:
        listener.stop()
        listener.wait(20)
        transport.cleanup()
        return {}

    return endpoint, listener, stop


def _start_oslo(url: str, topic: str, endpoint_of: Any, prefetch: int) -> tuple[Any, Any, Any]:
    import oslo_messaging
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf([], project="tidings-bench")
    transport = oslo_messaging.get_notification_transport(conf, url=url)
    # The driver registered its options above; its listener connection reads this one.
    conf.set_override("rabbit_qos_prefetch_count", prefetch, group="oslo_messaging_rabbit")
    endpoint = endpoint_of(oslo_messaging.NotificationResult.REQUEUE)
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(topic=topic)], [endpoint], executor="threading",
        allow_requeue=True)
    listener.start()

    def stop() -> dict[str, Any]:
        listener.stop()
        listener.wait()
        transport.cleanup()
        return {}

    return endpoint, listener, stop


def _cpu_over(seconds: float) -> list[tuple[float, float]]:
    """(monotonic, process CPU) every SAMPLE seconds for ``seconds``, first sample now."""
    samples = [(time.monotonic(), time.process_time())]
    end = samples[0][0] + seconds
    while samples[-1][0] < end:
        time.sleep(max(0.0, min(SAMPLE, end - time.monotonic())))
        samples.append((time.monotonic(), time.process_time()))
    return samples


def _percent(samples: list[tuple[float, float]]) -> float:
    return 100 * (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


def _busiest_second(samples: list[tuple[float, float]]) -> float:
    step = max(1, round(1 / SAMPLE))
    return max((_percent(samples[i:i + step + 1]) for i in range(len(samples) - step)),
               default=_percent(samples))


def child(library: str, url: str, topic: str, window: float, idle: float,
          fail_by_raising: bool, oslo_prefetch: int) -> int:
    """Run one listener; print one JSON line when it may be sent to, one with the results."""
    warnings.simplefilter("ignore")  # oslo's eventlet deprecation noise
    # The libraries log each failure and rejection as they would in production; where the
    # lines go is not the point.
    logging.basicConfig(level=logging.WARNING,
                        stream=open(os.devnull, "w", encoding="utf-8"))

    def endpoint_of(requeue: Any) -> Endpoint:
        return Endpoint(requeue, fail_by_raising)

    if library == "tidings":
        endpoint, listener, stop = _start_tidings(url, topic, endpoint_of)
    else:
        endpoint, listener, stop = _start_oslo(url, topic, endpoint_of, oslo_prefetch)
    time.sleep(1.0)  # let the connection settle before the baseline
    idle_samples = _cpu_over(idle)
    began = time.monotonic()
    print(json.dumps({"send": True}), flush=True)
    samples = _cpu_over(window)
    with endpoint.lock:
        deliveries = dict(endpoint.deliveries)
        good, good_at = endpoint.good, endpoint.good_at
    result: dict[str, Any] = {
        "cpu": _percent(samples), "busiest": _busiest_second(samples),
        "idle": _percent(idle_samples),
        "good": good, "good_s": None if good_at is None else good_at - began,
        "poison_seen": len(deliveries), "deliveries": sum(deliveries.values()),
        "deliveries_max": max(deliveries.values(), default=0),
    }
    if library == "tidings":
        result["gave_up"] = listener.stats.snapshot()["rejected_after_max_deliveries"]
    print(json.dumps(result), flush=True)
    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    stopper.join(20)
    sys.stdout.flush()
    os._exit(0)


# -- this process: one run per library --------------------------------------------------------
def _send(url: str, topic: str) -> None:
    import tidings

    transport = tidings.get_notification_transport(url)
    try:
        notifier = tidings.Notifier(transport, "bench.host", topics=[topic],
                                    raise_on_failure=True)
        for i in range(POISON):
            notifier.info({}, "compute.instance.update", {"i": i, "poison": True})
        for i in range(GOOD):
            notifier.info({}, "compute.instance.update", {"i": i, "poison": False})
    finally:
        transport.cleanup()


def _delete_queue(vhost: str, queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT, vhost))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


def run(library: str, vhost: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"rabbit://guest:guest@{HOST}:{PORT}/{vhost}"
    topic = f"poison-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", library, "--url", url,
               "--topic", topic, "--window", str(args.window), "--idle", str(args.idle),
               "--oslo-prefetch", str(args.oslo_prefetch)]
    if args.fail_by_raising:
        command.append("--raise")
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{library} listener failed to start")
            _send(url, topic)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{library} listener died during the window")
            result: dict[str, Any] = json.loads(line)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                result["killed"] = True
            return result
        except Exception:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            errors.seek(0)
            sys.stderr.write(errors.read()[-4000:])
            raise
        finally:
            _delete_queue(vhost, f"{topic}.info")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds measured after sending (default 10)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of the idle baseline (default 5)")
    parser.add_argument("--raise", dest="fail_by_raising", action="store_true",
                        help="poison endpoints raise instead of returning REQUEUE")
    parser.add_argument("--oslo-prefetch", type=int, default=PREFETCH,
                        help=f"oslo.messaging's rabbit_qos_prefetch_count (default {PREFETCH}; "
                             f"0: unlimited, its own default)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--child", choices=["tidings", "oslo"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.url, args.topic, args.window, args.idle,
                     args.fail_by_raising, args.oslo_prefetch)
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, list[dict[str, Any]]] = {"tidings": [], "oslo": []}
    with rabbit_vhost("tidings-bench") as vhost:  # fresh vhost, deleted afterwards
        for r in range(args.rounds):
            for library in results:
                res = run(library, vhost, args)
                results[library].append(res)
                print(f"round {r + 1}: {library:<8} cpu {res['cpu']:5.1f}% "
                      f"(busiest 1 s {res['busiest']:5.1f}%, idle {res['idle']:4.1f}%)  "
                      f"good {res['good']}/{GOOD} in {_fmt(res['good_s'], '.2f')} s  "
                      f"deliveries {res['deliveries']} (max {res['deliveries_max']} each)"
                      + ("  [killed after stop]" if res.get("killed") else ""),
                      file=sys.stderr, flush=True)

    def med(library: str, key: str) -> float | None:
        values = [r[key] for r in results[library]]
        if any(v is None for v in values):
            return None
        return statistics.median(values)

    fail = "raise" if args.fail_by_raising else "return REQUEUE"
    print(f"\nrabbit:// poison: {POISON} always-failing ({fail}) then {GOOD} good, prefetch "
          f"{PREFETCH} (oslo {args.oslo_prefetch or 'unlimited'}), {args.window:g} s window, "
          f"{args.rounds} round(s), medians")
    print(f"{'listener':<10}{'cpu %':>8}{'busiest':>9}{'idle %':>8}{'- idle':>8}"
          f"{'deliv/poison':>14}{'good':>7}{'good s':>8}")
    summary: dict[str, dict[str, float | None]] = {}
    for library in results:
        cpu, idle = med(library, "cpu"), med(library, "idle")
        assert cpu is not None and idle is not None
        per_poison = statistics.median(r["deliveries"] / POISON for r in results[library])
        good = med(library, "good")
        summary[library] = {"cpu": cpu, "busiest": med(library, "busiest"), "idle": idle,
                            "cpu_less_idle": cpu - idle, "deliveries_per_poison": per_poison,
                            "good": good, "good_s": med(library, "good_s")}
        print(f"{library:<10}{cpu:>8.1f}{_fmt(summary[library]['busiest'], '.1f'):>9}"
              f"{idle:>8.1f}{cpu - idle:>8.1f}{per_poison:>14.1f}{_fmt(good, '.0f'):>7}"
              f"{_fmt(summary[library]['good_s'], '.2f'):>8}")
    ours, theirs = summary["tidings"]["cpu"], summary["oslo"]["cpu"]
    assert ours is not None and theirs is not None
    ratio = ours / theirs if theirs else float("inf")
    print(f"\ncpu tidings/oslo: {ratio:.3f}   tidings over the window: {ours:.1f}% of a core "
          f"(target < {TARGET:g}%: {'met' if ours < TARGET else 'MISSED'})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"runs": results, "median": summary, "ratio": ratio}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
