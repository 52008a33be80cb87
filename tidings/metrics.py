"""Listener and notifier statistics in Prometheus' text format (``pip install 'tidings[metrics]'``).

Every listener and notifier keeps counters (``listener.stats.snapshot()``,
``notifier.stats.snapshot()``); a :class:`StatsCollector` turns the ones it watches into
Prometheus metrics each time it is scraped, so the hot path pays nothing extra::

    from prometheus_client import REGISTRY
    from tidings.metrics import StatsCollector

    collector = StatsCollector()
    collector.watch_listener(listener, "billing")      # label listener="billing"
    collector.watch_notifier(notifier)                 # label notifier=<its publisher_id>
    REGISTRY.register(collector)                       # next to your other metrics, or:
    server = serve(collector, 9100)                    # its own /metrics endpoint

docs/metrics.md lists the metrics, their types and labels. prometheus_client is imported only
when metrics are built, so importing this module costs nothing without it; :func:`require`
says what to install.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["LISTENER_METRICS", "NOTIFIER_METRICS", "MetricsServer", "StatsCollector", "render",
           "require", "serve"]

INSTALL = "pip install 'tidings[metrics]'"

# (name after the namespace, type, snapshot key, help). Counters get Prometheus' "_total".
LISTENER_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("listener_received", "counter", "received", "Messages the listener received."),
    ("listener_acknowledged", "counter", "acknowledged",
     "Messages acknowledged (handled, done)."),
    ("listener_requeued", "counter", "requeued", "Messages handed back for another delivery."),
    ("listener_rejected", "counter", "rejected",
     "Messages rejected: dropped, or dead-lettered where the driver can."),
    ("listener_rejected_after_max_deliveries", "counter", "rejected_after_max_deliveries",
     "Messages rejected because they reached the max_deliveries URL option (poison)."),
    ("listener_returned_on_close", "counter", "returned_on_close",
     "Unsettled messages handed back to the broker when the listener stopped."),
    ("listener_lost_with_connection", "counter", "lost_with_connection",
     "Messages held when a connection was lost (the broker delivers them again)."),
    ("listener_in_flight", "gauge", "in_flight", "Messages received and not settled yet."),
    ("listener_handler_seconds", "summary", "handler_latency",
     "Time spent in the endpoint's handler, per notification."),
    ("listener_handler_seconds_max", "gauge", "handler_latency",
     "Longest single handler call since the listener was created."),
)
NOTIFIER_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("notifier_sent", "counter", "sent",
     "Notifications sent (confirmed where the broker confirms), once per notification driver "
     "of the notifier."),
    ("notifier_failed", "counter", "failed",
     "Notifications whose send failed for good (retries exhausted)."),
    ("notifier_dropped", "counter", "dropped",
     "Notifications a BackgroundNotifier dropped because its queue was full."),
    ("notifier_send_seconds", "summary", "send_latency",
     "Time one send took, retries included."),
    ("notifier_send_seconds_max", "gauge", "send_latency",
     "Longest single send since the notifier was created."),
)


def require() -> Any:
    """The ``prometheus_client`` module, or ImportError saying what to install."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(f"tidings metrics need prometheus_client, which is not installed: "
                          f"{INSTALL}") from exc
    return prometheus_client


def _stats_of(obj: Any) -> Any:
    """``obj.stats`` (a listener, notifier or pool handle) or ``obj`` itself (its stats)."""
    stats = getattr(obj, "stats", obj)
    if not callable(getattr(stats, "snapshot", None)):
        raise TypeError(f"{obj!r} has no stats.snapshot(): watch a listener, a notifier, a "
                        f"consumer pool handle or their .stats")
    return stats


def _merge(total: dict[str, Any], snap: Mapping[str, Any]) -> None:
    """Add one snapshot into ``total``: numbers add up, latencies add count and sum and keep
    the longest."""
    for key, value in snap.items():
        if isinstance(value, Mapping):
            lat = total.setdefault(key, {"count": 0, "sum": 0.0, "max": 0.0})
            count = value.get("count", 0) or 0
            lat["count"] += count
            lat["sum"] += (value.get("mean_s", 0.0) or 0.0) * count
            lat["max"] = max(lat["max"], value.get("max_s", 0.0) or 0.0)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


class StatsCollector:
    """A Prometheus collector of the listeners and notifiers it watches.

    Each is watched under a name, the value of its ``listener`` or ``notifier`` label; several
    watched under one name (the members of one pool in this process) are added up. A watched
    object stays counted until :meth:`forget`, even once stopped, so that its counters never go
    down. Thread-safe; ``collect()`` reads each ``stats.snapshot()`` once per scrape.
    """

    def __init__(self, namespace: str = "tidings") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._watched: dict[str, list[tuple[str, Any, Any]]] = {"listener": [],
                                                                "notifier": []}

    def watch_listener(self, listener: Any, name: str | None = None) -> None:
        """Export ``listener``'s statistics under label ``listener=name`` (default: its pool,
        or ``group`` for the no-pool group)."""
        label = name or getattr(listener, "pool", None) or "group"
        self._watch("listener", str(label), listener)

    def watch_notifier(self, notifier: Any, name: str | None = None) -> None:
        """Export ``notifier``'s statistics under label ``notifier=name`` (default: its
        publisher_id)."""
        label = name or getattr(notifier, "publisher_id", None) or "notifier"
        self._watch("notifier", str(label), notifier)

    def _watch(self, kind: str, label: str, obj: Any) -> None:
        stats = _stats_of(obj)
        with self._lock:
            if not any(s is stats for _, _, s in self._watched[kind]):
                self._watched[kind].append((label, obj, stats))

    def forget(self, obj: Any) -> None:
        """Stop exporting ``obj`` (its counts leave the sums: a counter may go down)."""
        with self._lock:
            for kind, entries in self._watched.items():
                self._watched[kind] = [e for e in entries if e[1] is not obj and e[2] is not obj]

    def snapshots(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{"listener": {name: merged snapshot}, "notifier": {...}}``, read now."""
        with self._lock:
            watched = {kind: list(entries) for kind, entries in self._watched.items()}
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for kind, entries in watched.items():
            merged: dict[str, dict[str, Any]] = {}
            for label, _, stats in entries:
                _merge(merged.setdefault(label, {}), stats.snapshot())
            out[kind] = merged
        return out

    def describe(self) -> list[Any]:
        """The metric families, without samples (lets a registry check for name clashes)."""
        return list(self._families({"listener": {}, "notifier": {}}))

    def collect(self) -> Iterator[Any]:
        """The metric families with one sample per watched name (prometheus_client calls it
        on every scrape)."""
        yield from self._families(self.snapshots())

    def _families(self, snaps: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Iterator[Any]:
        require()
        from prometheus_client import core

        for kind, table in (("listener", LISTENER_METRICS), ("notifier", NOTIFIER_METRICS)):
            per_name = snaps.get(kind, {})
            # A statistic newer than this table is still exported, with type unknown.
            known = {key for _, _, key, _ in table}
            extra = sorted({key for snap in per_name.values() for key, value in snap.items()
                            if key not in known and not isinstance(value, Mapping)})
            table = table + tuple((f"{kind}_{key}", "unknown", key,
                                   f"The {kind} statistic {key!r}.") for key in extra)
            for suffix, mtype, key, doc in table:
                name = f"{self.namespace}_{suffix}"
                if mtype == "summary":
                    summary = core.SummaryMetricFamily(name, doc, labels=[kind])
                    for label, snap in per_name.items():
                        lat = snap.get(key, {})
                        summary.add_metric([label], lat.get("count", 0), lat.get("sum", 0.0))
                    yield summary
                    continue
                cls = {"counter": core.CounterMetricFamily, "gauge": core.GaugeMetricFamily,
                       "unknown": core.UnknownMetricFamily}[mtype]
                family = cls(name, doc, labels=[kind])
                for label, snap in per_name.items():
                    value = snap.get(key, 0)
                    if isinstance(value, Mapping):
                        value = value.get("max", 0.0)
                    family.add_metric([label], value)
                yield family


def render(collector: StatsCollector) -> str:
    """The collector's metrics in Prometheus' text exposition format (what /metrics serves)."""
    client = require()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text: bytes = client.generate_latest(registry)
    return text.decode("utf-8")


class MetricsServer:
    """A running HTTP endpoint serving ``/metrics`` (any path, in fact) from a collector."""

    def __init__(self, server: Any, thread: threading.Thread,
                 collector: StatsCollector) -> None:
        self._server = server
        self._thread = thread
        self.collector = collector
        """What it serves: watch more listeners and notifiers through it."""
        self.host: str = server.server_address[0]
        self.port: int = server.server_port
        """The port it listens on (the one chosen by the system when asked for port 0)."""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def serve(collector: StatsCollector, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``collector`` over HTTP on ``addr:port`` from a daemon thread; returns the running
    server (``port=0`` picks a free one: see ``.port``). Raises OSError if the port is taken."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    client = require()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app = client.make_wsgi_app(registry)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # no line on stderr per scrape

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # a slow scraper never holds up close()

    server = make_server(addr, port, app, server_class=Server, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, name=f"tidings-metrics-{port}",
                              daemon=True)
    thread.start()
    return MetricsServer(server, thread, collector)
