"""The benchmark harness behind ``tidings bench`` and the scripts in benchmarks/.

Three figures per run, each with latency percentiles where they mean something:

* publish: confirmed notifications per second from one Notifier (into queues that exist);
* drain: a backlog of N per group consumed by the listeners (rate from start to last ack);
* end to end: listeners running, N sent, rate from first send to last receipt, and per-message
  latency (send to endpoint call) p50/p99/max.

A *reference* (oslo.messaging, or a raw client loop registered by a benchmark script) runs the
same workload in the same run, so results are ratios, never absolute promises.

A run leaves nothing of its own on a shared broker: its topic, pools and queues are named for the
run, and where the driver takes ``queue_expiry`` they are declared with one (see
:func:`bench_queue_expiry`), so the broker deletes them once the run is over, Ctrl-C or not. The
exchange is one fixed name, ``tidings-bench`` (``tidings-bench-durable`` for durable queues),
shared by every run and left empty: tidings' API has no call that deletes an exchange.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["BENCH_EXCHANGE", "BenchResult", "Workload", "bench_queue_expiry", "format_table",
           "require_plotting", "run_oslo", "run_phases", "run_raw", "run_tidings",
           "shared_exchange", "with_queue_expiry"]

BENCH_EXCHANGE = "tidings-bench"
LOG = logging.getLogger(__name__)


def with_queue_expiry(url: str, seconds: float) -> str:
    """``url`` with ``queue_expiry=seconds`` added where its driver takes that option and the
    URL does not set it already (``queue_expiry=0`` in the URL keeps queues forever).

    Run-specific queues declared through such a URL are deleted by the broker ``seconds`` after
    their last consumer left, however the run ended. Any other URL comes back unchanged.
    """
    from tidings.transports.errors import DriverLoadFailure
    from tidings.transports.loader import load_driver_class
    from tidings.transports.url import TransportURL

    parsed = TransportURL.parse(url)
    try:
        accepted = load_driver_class(parsed.driver).options
    except DriverLoadFailure:
        return url  # get_notification_transport explains it
    if "queue_expiry" not in accepted or "queue_expiry" in parsed.query:
        return url
    extra = (("queue_expiry", f"{seconds:g}"),)
    return str(dataclasses.replace(parsed, query_items=parsed.query_items + extra))


def shared_exchange(base: str, transport: Any) -> str:
    """The one exchange every run of a command uses: ``base``, or ``base-durable`` when the
    transport declares durable queues (and so durable exchanges, which a broker will not
    declare over a non-durable one of the same name)."""
    return f"{base}-durable" if transport.capabilities.durable else base


def bench_queue_expiry(messages: int) -> int:
    """Seconds a bench run's queues live unused: 60, plus a second per 100 notifications.

    A pool's queue has no consumer while the publish phase fills it, and a broker counts that
    time against the expiry; this covers a publish rate down to 100 notifications a second."""
    return 60 + math.ceil(messages / 100)


def require_plotting() -> None:
    """Raise RuntimeError saying what to install unless ``--plot`` can draw (checked before a
    run, not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install "
                           "'tidings[plot]' (or leave out --plot)") from exc


@dataclass
class Workload:
    url: str
    messages: int = 5000
    size: int = 200
    pools: int = 0
    members: int = 1
    prefetch: int | None = None
    progress: bool = False

    @property
    def groups(self) -> list[str | None]:
        return [None] if self.pools == 0 else [f"bench-pool-{i}" for i in range(self.pools)]


@dataclass
class BenchResult:
    name: str
    publish_rate: float | None = None
    drain_rate: float | None = None
    e2e_rate: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1] * 1000,
            "mean": statistics.fmean(ordered) * 1000}


class _Progress:
    """A one-line progress bar on stderr for long runs; silent when disabled."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\r{self.label:<12} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{self.total}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class _Sink:
    """An endpoint counting arrivals and recording send-to-receive latency."""

    def __init__(self, expected: int, progress: _Progress) -> None:
        self.expected = expected
        self.count = 0
        self.latencies: list[float] = []
        self.last_at = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.progress = progress

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        now = time.time()
        with self.lock:
            self.count += 1
            sent = payload.get("t") if isinstance(payload, dict) else None
            if sent:
                self.latencies.append(now - sent)
            self.last_at = time.perf_counter()
            count = self.count
        self.progress.update(count)
        if count >= self.expected:
            self.done.set()


def _payload(size: int, stamp: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"blob": "x" * max(0, size - 40)}
    if stamp:
        body["t"] = time.time()
    return body


class Adapter(Protocol):
    """One library under test: how its listeners start and stop and how it sends."""

    name: str
    stores_backlog: bool
    """Messages sent while no listener runs wait for one (else: no publish/drain phase)."""

    def start(self, sink: _Sink) -> Callable[[], None]:
        """Start the listeners (every group, every member) feeding ``sink``; return a stop."""
        ...

    def send(self, payload: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def run_phases(adapter: Adapter, work: Workload, timeout: float = 600.0) -> BenchResult:
    """Publish, drain and end to end through ``adapter``: the same phases for every library,
    so their figures compare."""
    result = BenchResult(adapter.name)
    expected = work.messages * len(work.groups)
    try:
        if adapter.stores_backlog:
            # Queues exist once listeners have started; a backlog can then wait in them.
            adapter.start(_Sink(1, _Progress("", 1, False)))()
            send_times: list[float] = []
            progress = _Progress("publish", work.messages, work.progress)
            began = time.perf_counter()
            for i in range(work.messages):
                t0 = time.perf_counter()
                adapter.send(_payload(work.size, False))
                send_times.append(time.perf_counter() - t0)
                progress.update(i + 1)
            result.publish_rate = work.messages / (time.perf_counter() - began)
            result.latency_ms["publish_p50"] = percentiles(send_times)["p50"]
            sink = _Sink(expected, _Progress("drain", expected, work.progress))
            began = time.perf_counter()
            stop = adapter.start(sink)
            if not sink.done.wait(timeout):
                result.notes.append(f"drain incomplete: {sink.count}/{expected}")
            result.drain_rate = sink.count / max(1e-9, sink.last_at - began)
            stop()
        else:
            result.notes.append("no publish/drain phase: messages sent while no listener "
                                "runs are not kept")
        sink = _Sink(expected, _Progress("end to end", expected, work.progress))
        stop = adapter.start(sink)
        began = time.perf_counter()
        for _ in range(work.messages):
            adapter.send(_payload(work.size, True))
        if not sink.done.wait(timeout):
            result.notes.append(f"end to end incomplete: {sink.count}/{expected}")
        result.e2e_rate = sink.count / max(1e-9, sink.last_at - began)
        result.latency_ms.update(percentiles(sink.latencies))
        stop()
    finally:
        adapter.close()
    return result


class _TidingsAdapter:
    def __init__(self, work: Workload) -> None:
        import tidings

        self._tidings = tidings
        self.work = work
        self.transport = tidings.get_notification_transport(
            with_queue_expiry(work.url, bench_queue_expiry(work.messages)))
        self.name = f"tidings {self.transport.driver_name}"
        self.stores_backlog = self.transport.capabilities.stores_without_listener
        # The topic (so the group's queue) and the pools are this run's; the exchange is shared
        # (see the module docstring).
        self.run = uuid.uuid4().hex[:8]
        self.target = tidings.Target(topic=f"bench-{self.run}",
                                     exchange=shared_exchange(BENCH_EXCHANGE, self.transport))
        self.notifier = tidings.Notifier(self.transport, "bench", topics=[f"bench-{self.run}"],
                                         exchange=self.target.exchange, raise_on_failure=True)

    def start(self, sink: _Sink) -> Callable[[], None]:
        listeners = []
        for group in self.work.groups:
            pool = None if group is None else f"{group}-{self.run}"
            for _ in range(self.work.members):
                listener = self._tidings.get_notification_listener(
                    self.transport, [self.target], [sink], pool=pool,
                    prefetch=self.work.prefetch)
                listener.start()
                listeners.append(listener)
        return lambda: _stop_all(listeners)

    def send(self, payload: dict[str, Any]) -> None:
        self.notifier.info({}, "bench.tick", payload)

    def close(self) -> None:
        self.transport.cleanup()


class _OsloAdapter:
    def __init__(self, work: Workload) -> None:
        try:
            import oslo_messaging
            from oslo_config import cfg
        except ImportError as exc:
            raise RuntimeError("--compare oslo needs oslo.messaging: pip install "
                               "oslo.messaging") from exc
        from tidings.transports.url import TransportURL

        url = TransportURL.parse(work.url)
        if url.driver not in ("memory", "fake", "rabbit"):
            raise RuntimeError(f"--compare oslo supports rabbit:// and memory://, not "
                               f"{url.driver}:// (oslo.messaging has no such driver any more)")
        self._om = oslo_messaging
        self.work = work
        self.name = "oslo.messaging"
        # oslo's fake: driver drops what arrives before a listener; its rabbit driver keeps it.
        self.stores_backlog = url.driver == "rabbit"
        conf = cfg.ConfigOpts()
        conf([], project="tidings-bench")
        oslo_url = "fake:" if url.driver != "rabbit" else str(url.with_query(()))
        self.transport = oslo_messaging.get_notification_transport(conf, url=oslo_url)
        self.url = work.url if url.driver == "rabbit" else None
        self.run = uuid.uuid4().hex[:8]
        self.target = oslo_messaging.Target(topic=f"oslo-bench-{self.run}")
        self.notifier = oslo_messaging.Notifier(self.transport, "bench", driver="messagingv2",
                                                topics=[self.target.topic])

    def start(self, sink: _Sink) -> Callable[[], None]:
        listeners = []
        for group in self.work.groups:
            pool = None if group is None else f"oslo-{group}-{self.run}"
            for _ in range(self.work.members):
                listener = self._om.get_notification_listener(
                    self.transport, [self.target], [sink], executor="threading", pool=pool)
                listener.start()
                listeners.append(listener)
        return lambda: _stop_all(listeners)

    def send(self, payload: dict[str, Any]) -> None:
        self.notifier.info({}, "bench.tick", payload)

    def close(self) -> None:
        self.transport.cleanup()
        if self.url is not None:
            # oslo.messaging declares its notification queues without an expiry and cannot be
            # asked for one: delete this run's on the broker itself.
            from tidings.bench_raw import delete_amqp_queues

            queues = [f"{self.target.topic}.info"]
            queues += [f"oslo-{g}-{self.run}" for g in self.work.groups if g is not None]
            try:
                delete_amqp_queues(self.url, queues)
            except Exception as exc:  # the results stand; say what is left
                from tidings.transports.url import mask_password

                LOG.warning("could not delete oslo.messaging's queues of this run (%s): %s",
                            ", ".join(queues), mask_password(str(exc)))


def _stop_all(listeners: list[Any]) -> None:
    for listener in listeners:
        listener.stop()
    for listener in listeners:
        listener.wait()


def run_tidings(work: Workload, timeout: float = 600.0) -> BenchResult:
    """Measure publish, drain and end to end through tidings on ``work.url``."""
    return run_phases(_TidingsAdapter(work), work, timeout)


def run_oslo(work: Workload, timeout: float = 600.0) -> BenchResult:
    """The same workload through oslo.messaging (rabbit:// -> its rabbit driver, memory:// ->
    its fake: driver). Needs oslo.messaging installed (a benchmark-only dependency)."""
    return run_phases(_OsloAdapter(work), work, timeout)


RAW_REFERENCES: dict[str, str] = {
    "rabbit": "tidings.bench_raw:RawAmqpAdapter",
    "zmq": "tidings.bench_raw:RawZmqAdapter",
}
"""scheme -> "module:class" of a raw client adapter (see tidings.bench_raw)."""


def run_raw(work: Workload, timeout: float = 600.0) -> BenchResult:
    """The same workload through the raw client of the URL's broker, if one is registered."""
    from importlib import import_module

    from tidings.transports.url import TransportURL

    scheme = TransportURL.parse(work.url).driver
    spec = RAW_REFERENCES.get(scheme)
    if spec is None:
        raise RuntimeError(f"no raw reference loop for {scheme}:// in tidings bench (have: "
                           f"{', '.join(sorted(RAW_REFERENCES))}); benchmarks/ has more")
    module, _, cls = spec.partition(":")
    return run_phases(getattr(import_module(module), cls)(work), work, timeout)


def format_table(results: list[BenchResult]) -> str:
    """A table of rates and latencies, with each later row's ratio to the first."""
    def rate(v: float | None) -> str:
        return f"{v:>10,.0f}" if v is not None else f"{'-':>10}"

    lines = [f"{'':<22}{'publish/s':>10}{'drain/s':>10}{'e2e/s':>10}"
             f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for r in results:
        lat = r.latency_ms
        lines.append(f"{r.name:<22}{rate(r.publish_rate)}{rate(r.drain_rate)}"
                     f"{rate(r.e2e_rate)}{lat.get('p50', 0):>9.2f}{lat.get('p99', 0):>9.2f}"
                     f"{lat.get('max', 0):>9.2f}")
    if len(results) > 1:
        base = results[0]
        for ref in results[1:]:
            parts = []
            for label, a, b in (("publish", base.publish_rate, ref.publish_rate),
                                ("drain", base.drain_rate, ref.drain_rate),
                                ("end to end", base.e2e_rate, ref.e2e_rate)):
                if a and b:
                    parts.append(f"{label} {a / b:.2f}x")
            lines.append(f"ratio {base.name} / {ref.name}: {', '.join(parts) or 'n/a'}")
    for r in results:
        lines.extend(f"note ({r.name}): {n}" for n in r.notes)
    return "\n".join(lines)


def save(results: list[BenchResult], json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump([r.as_dict() for r in results], fh, indent=2)
    if plot_path:
        require_plotting()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = ["publish", "drain", "end to end"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            values = [r.publish_rate or 0, r.drain_rate or 0, r.e2e_rate or 0]
            ax.bar([x + i * width for x in range(3)], values, width, label=r.name)
        ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(3)], labels)
        ax.set_ylabel("notifications / s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path)
