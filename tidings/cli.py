"""The ``tidings`` command: demo, drivers, listen, notify and bench.

Errors are one readable line saying what to do (``--verbose`` shows the traceback), never a
bare traceback, and never a password. Log lines are short: the per-attempt warnings of a send
that the final error sums up are left out unless ``--verbose``.

Nothing of a run is left on a shared broker: the demo's and the benchmark's topics, pools and
queues are named for the run and declared with ``queue_expiry`` where the driver takes it, and
so is the queue of ``listen --pool`` (unless the URL sets ``queue_expiry`` itself), so the broker
deletes them after the run however it ended. Their exchanges are one fixed name per command
(``tidings-demo``, ``tidings-bench``), shared by every run: tidings' API cannot delete an
exchange.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from tidings._version import __version__
from tidings.bench import shared_exchange, with_queue_expiry
from tidings.notify.dispatcher import PRIORITIES, NotificationResult
from tidings.notify.filter import NotificationFilter
from tidings.notify.listener import get_notification_listener
from tidings.notify.notifier import Notifier
from tidings.transports.errors import (
    DriverLoadFailure,
    MessageDeliveryFailure,
    TidingsError,
    TransportUnreachable,
)
from tidings.transports.loader import available_drivers, load_driver_class
from tidings.transports.transport import Target, Transport, get_notification_transport
from tidings.transports.url import mask_password

__all__ = ["main"]

EXAMPLES = {
    "demo": "tidings demo\n  tidings demo --processes\n"
            "  tidings demo rabbit://guest:guest@127.0.0.1:5672/ --count 300",
    "drivers": "tidings drivers",
    "listen": "tidings listen rabbit://guest:guest@127.0.0.1:5672/ --topic notifications "
              "--exchange nova --pool debug-tail --filter event_type='^compute\\.'",
    "notify": "tidings notify memory:// --topic notifications --priority info "
              "--event-type compute.instance.create --payload '{\"id\": 1}' --count 10",
    "bench": "tidings bench rabbit://guest:guest@127.0.0.1:5672/ --messages 20000 "
             "--pools 2 --members 2 --compare oslo --json out.json",
}


WIDTH = 100  # columns the command's own output fits in

PRIORITY_ALIASES = {"warning": "warn"}
"""Other names of priorities: oslo.messaging's Notifier has warning() as well as warn()."""


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _priority(text: str) -> str:
    """``--priority`` as typed (any case, ``warning`` for ``warn``) -> a priority name."""
    name = text.strip().lower()
    return PRIORITY_ALIASES.get(name, name)


# -- demo ---------------------------------------------------------------------------------

class _Member:
    def __init__(self, group: str, name: str) -> None:
        self.group = group
        self.name = name
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        with self.lock:
            self.ids.append(payload["n"])


def _wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.02)
    return True


class _ThreadMembers:
    """Demo members as listeners in this process."""

    def __init__(self, transport: Transport, target: Target) -> None:
        self.transport, self.target = transport, target
        self.listeners: list[Any] = []

    def start(self, member: _Member, pool: str | None) -> None:
        listener = get_notification_listener(self.transport, [self.target], [member], pool=pool)
        listener.start()
        self.listeners.append(listener)

    def ready(self, timeout: float) -> bool:
        return True  # start() returned: the listener is consuming

    def stop(self) -> None:
        for listener in self.listeners:
            listener.stop()
        for listener in self.listeners:
            listener.wait(10)


class _ProcessMembers:
    """Demo members as separate processes (``tidings _member``), each a listener that reports
    what it receives on stdout and stops when its stdin closes."""

    def __init__(self, url: str, target: Target) -> None:
        self.url, self.target = url, target
        self.procs: list[tuple[subprocess.Popen[str], threading.Event]] = []

    def start(self, member: _Member, pool: str | None) -> None:
        # A small prefetch shows the split even for a short run: on ZeroMQ the member whose
        # connection is up first can otherwise take up to its whole prefetch before the
        # others finish their handshakes (docs/zmq.md).
        cmd = [sys.executable, "-m", "tidings.cli", "_member", self.url,
               "--exchange", str(self.target.exchange), "--topic", str(self.target.topic),
               "--prefetch", "2"]
        if pool is not None:
            cmd += ["--pool", pool]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = threading.Event()
        member.name += f" pid {proc.pid}"

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.strip()
                if line == "ready":
                    ready.set()
                elif line.isdigit():
                    with member.lock:
                        member.ids.append(line)

        threading.Thread(target=read, daemon=True).start()
        self.procs.append((proc, ready))

    def ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(ev.wait(max(0.0, deadline - time.monotonic())) for _, ev in self.procs)

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc, _ in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_member(args: argparse.Namespace) -> int:
    """``tidings _member``: one demo listener process (see _ProcessMembers)."""
    transport = get_notification_transport(args.url)
    lock = threading.Lock()

    class Echo:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            with lock:
                print(payload["n"], flush=True)

    listener = get_notification_listener(
        transport, [Target(topic=args.topic, exchange=args.exchange)], [Echo()],
        pool=args.pool, prefetch=args.prefetch)
    listener.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    listener.stop()
    listener.wait(10)
    transport.cleanup()
    return 0


DEMO_QUEUE_EXPIRY = 30  # seconds
DEMO_EXCHANGE = "tidings-demo"
LISTEN_POOL_EXPIRY = 60  # seconds


def _demo_url(url: str) -> str:
    """``url`` with ``queue_expiry`` added where the driver accepts it and the URL does not set
    it, so the queues a demo run declares on a real broker (its group queue and its two pools,
    named for the run) are deleted by the broker once the run has ended, instead of piling up
    one set per run."""
    return with_queue_expiry(url, DEMO_QUEUE_EXPIRY)


def run_demo(url: str, count: int, members: int, timeout: float, out: Any,
             processes: bool = False) -> int:
    """Start the no-pool group and two pools, send ``count`` notifications, check the split.

    With ``processes``, every member is a separate process, so the split is across processes
    (on ZeroMQ with the sqlite matchmaker this needs pyzmq and no broker).
    """
    url = _demo_url(url)
    transport = get_notification_transport(url)
    try:
        if processes and transport.url.driver in ("memory", "fake"):
            raise CLIError("memory:// lives inside one process; for --processes use "
                           "zmq+sqlite:////tmp/tidings-demo.db or a broker URL")
        pools: list[str | None] = [None]
        if transport.capabilities.pools:
            pools += ["audit", "billing"]
        else:
            print(f"note: the {transport.driver_name} driver declares no pools; "
                  f"showing the no-pool group only", file=out)
        # The topic and the pools are this run's own: concurrent runs do not meet, a URL with
        # other queue options (durable=true) never meets an earlier declaration, and the queues
        # expire after the run (see _demo_url). The exchange is shared by every run and stays,
        # empty (brokers do not expire exchanges and tidings' API cannot delete one); a durable
        # one has its own name, since a broker refuses to redeclare an exchange durable.
        run = uuid.uuid4().hex[:8]
        target = Target(topic=f"demo-{run}", exchange=shared_exchange(DEMO_EXCHANGE, transport))
        runner: _ThreadMembers | _ProcessMembers = (
            _ProcessMembers(url, target) if processes else _ThreadMembers(transport, target))
        groups: dict[str | None, list[_Member]] = {}
        try:
            for pool in pools:
                label = pool or "(no pool)"
                groups[pool] = [_Member(label, f"{(pool or 'group')[0]}{i + 1}")
                                for i in range(members)]
                for member in groups[pool]:
                    runner.start(member, None if pool is None else f"tidings-demo-{run}-{pool}")
            if not runner.ready(timeout):
                raise CLIError(f"the demo's listener processes were not ready within "
                               f"{timeout:.0f}s")
            notifier = Notifier(transport, "tidings.demo", topics=[f"demo-{run}"],
                                exchange=target.exchange, retry=3, raise_on_failure=True)
            began = time.perf_counter()
            sent = [str(i) for i in range(count)]
            for n in sent:
                notifier.info({"demo_run": run}, "demo.tick", {"n": n})

            def all_in() -> bool:
                return all(sum(len(m.ids) for m in ms) >= count for ms in groups.values())

            arrived = _wait_until(all_in, timeout)
            elapsed = time.perf_counter() - began
        finally:
            runner.stop()
        where = "separate processes" if processes else "threads of this process"
        print(f"tidings demo on {transport.url.masked()} ({transport.driver_name} driver, "
              f"listeners in {where}): {count} notifications to "
              f"{target.exchange}/{target.topic}.info in {elapsed:.2f}s\n", file=out)
        return _report(groups, sent, members, arrived, timeout, out)
    finally:
        transport.cleanup()


def _report(groups: dict[str | None, list[_Member]], sent: list[str], members: int,
            arrived: bool, timeout: float, out: Any) -> int:
    """Print who received what and check the pool guarantees; the exit status."""
    width = max(8, *(len(m.name) + 2 for ms in groups.values() for m in ms))
    print(f"{'group or pool':<16}{'member':<{width}}{'received':>9}", file=out)
    for ms in groups.values():
        for m in ms:
            print(f"{m.group:<16}{m.name:<{width}}{len(m.ids):>9}", file=out)
    print(file=out)
    failures = 0
    for ms in groups.values():
        got = [i for m in ms for i in m.ids]
        label = ms[0].group
        checks = [
            (sorted(got, key=int) == sent,
             f"each notification reached exactly one member of {label}",
             f"{label}: {len(set(sent) - set(got))} lost, "
             f"{len(got) - len(set(got))} duplicated"),
            (len(sent) < members or all(m.ids for m in ms),
             f"every member of {label} received some",
             f"{label}: a member received nothing"),
        ]
        for ok, good, bad in checks:
            print(f"  {'ok  ' if ok else 'FAIL'} {good if ok else bad}", file=out)
            failures += not ok
    if not arrived:
        print(f"  FAIL not every notification arrived within {timeout:.0f}s", file=out)
        failures += 1
    print(f"\n{'all pool guarantees hold' if not failures else f'{failures} check(s) failed'}",
          file=out)
    return 0 if not failures else 1


# -- drivers ------------------------------------------------------------------------------

def _fill(text: str, indent: str = "") -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=False)


def run_drivers(out: Any) -> int:
    """One column per scheme, one row per capability, in blocks of columns that fit WIDTH."""
    from tidings.transports.base import Capabilities

    names = Capabilities.names()
    rows: dict[str, dict[str, bool]] = {}
    problems = []
    for scheme in available_drivers():
        try:
            cls = load_driver_class(scheme)
        except DriverLoadFailure as exc:
            problems.append(f"{scheme}: {exc}")
            continue
        rows[scheme] = cls.capabilities.as_dict()
    first = max(len("capability"), *(len(n) for n in names)) + 2

    def cell(text: str, scheme: str) -> str:
        return f"{text:<{max(3, len(scheme)) + 2}}"

    blocks: list[list[str]] = []
    used = WIDTH
    for scheme in rows:
        if used + len(cell("", scheme)) > WIDTH + 2:  # the last column needs no gap after it
            blocks.append([])
            used = first
        blocks[-1].append(scheme)
        used += len(cell("", scheme))
    for i, block in enumerate(blocks):
        if i:
            print(file=out)
        print((f"{'capability':<{first}}" + "".join(cell(s, s) for s in block)).rstrip(),
              file=out)
        for name in names:
            cells = "".join(cell("yes" if rows[s][name] else "-", s) for s in block)
            print(f"{name:<{first}}{cells}".rstrip(), file=out)
    print(file=out)
    print(_fill("(as declared with default URL options: a driver may declare more once an "
                "option turns a feature on, e.g. rabbit:// and amqp:// with "
                "isolate_exchanges=true, durable=true or dead_letter_exchange=...)"), file=out)
    for line in problems:
        print(_fill(f"not loadable: {line}", "  "), file=out)
    return 0


# -- listen and notify ---------------------------------------------------------------------

def _parse_filters(items: Sequence[str]) -> NotificationFilter | None:
    if not items:
        return None
    kw: dict[str, Any] = {}
    for item in items:
        key, eq, regex = item.partition("=")
        if not eq:
            raise CLIError(f"--filter {item!r}: write FIELD=REGEX, e.g. event_type='^compute'")
        if key in ("publisher_id", "event_type"):
            kw[key] = regex
        elif "." in key and key.split(".", 1)[0] in ("payload", "context", "metadata"):
            field, sub = key.split(".", 1)
            kw.setdefault(field, {})[sub] = regex
        else:
            raise CLIError(f"--filter {item!r}: FIELD is publisher_id, event_type, or "
                           f"payload.KEY / context.KEY / metadata.KEY")
    try:
        return NotificationFilter(**kw)
    except ValueError as exc:
        raise CLIError(f"--filter: {exc}") from None


class _Printer:
    """Prints notifications; once told to stop, hands further ones back unprinted."""

    def __init__(self, as_json: bool, out: Any, limit: int | None, can_requeue: bool) -> None:
        self.as_json = as_json
        self.out = out
        self.limit = limit
        self.can_requeue = can_requeue
        self.done = threading.Event()
        self.count = 0
        self.lock = threading.Lock()

    def endpoint(self, priorities: Sequence[str],
                 filter_rule: NotificationFilter | None) -> Any:
        methods: dict[str, Any] = {p: functools.partialmethod(_show_as, self, p)
                                   for p in priorities}
        if filter_rule is not None:
            methods["filter_rule"] = filter_rule
        return type("TailEndpoint", (), methods)()

    def show(self, priority: str, ctxt: Any, publisher_id: Any, event_type: Any,
             payload: Any, metadata: Any) -> str | None:
        with self.lock:
            if self.done.is_set() and self.can_requeue:
                # Stopping (Ctrl-C or --count reached): do not acknowledge what is not
                # printed; the requeue hands it back to the other consumers.
                return NotificationResult.REQUEUE
            if self.as_json:
                line = json.dumps({"priority": priority, "publisher_id": publisher_id,
                                   "event_type": event_type, "payload": payload,
                                   "ctxt": ctxt, "metadata": metadata}, default=str)
            else:
                line = (f"{metadata.get('timestamp')} {priority.upper():<8} {publisher_id} "
                        f"{event_type} {json.dumps(payload, default=str)[:400]}")
            print(line, file=self.out, flush=True)
            self.count += 1
            if self.limit is not None and self.count >= self.limit:
                self.done.set()
        return None


def _show_as(_endpoint: Any, printer: _Printer, priority: str, *args: Any) -> str | None:
    return printer.show(priority, *args)


def _start_metrics(args: argparse.Namespace) -> Any:
    """The running /metrics server of ``listen --metrics-port``, or None without it; started
    before anything connects, so a missing library or a taken port fails at once."""
    if args.metrics_port is None:
        return None
    from tidings import metrics

    try:
        metrics.require()
    except ImportError as exc:
        raise CLIError(f"--metrics-port: {exc}") from None
    if not 0 <= args.metrics_port <= 65535:
        raise CLIError(f"--metrics-port {args.metrics_port}: use a port from 1 to 65535 "
                       f"(0: any free port)")
    try:
        return metrics.serve(metrics.StatsCollector(), args.metrics_port, args.metrics_addr)
    except OSError as exc:
        raise CLIError(f"--metrics-port {args.metrics_port}: cannot listen on "
                       f"{args.metrics_addr}:{args.metrics_port} ({exc.strerror or exc}); "
                       f"choose another port") from None


def _listen_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The URL ``listen`` uses and whether it added ``queue_expiry``: a ``--pool`` queue made
    for watching goes away once nobody listens, unless the URL says otherwise."""
    if args.pool is None:
        return args.url, False
    url = with_queue_expiry(args.url, LISTEN_POOL_EXPIRY)
    return url, url != args.url


def run_listen(args: argparse.Namespace, out: Any) -> int:
    server = _start_metrics(args)
    try:
        return _listen(args, out, server)
    finally:
        if server is not None:
            server.close()


def _listen(args: argparse.Namespace, out: Any, server: Any) -> int:
    url, expiring = _listen_url(args)
    transport = get_notification_transport(url)
    try:
        if transport.driver_name == "memory":
            # Its broker lives inside this process: no other process can ever reach it.
            raise CLIError(f"{transport.url.masked()} is a broker inside this process: nothing "
                           f"another process sends can reach this listener. Listen on zmq:// "
                           f"(across processes on this machine, no broker) or on a broker "
                           f"(rabbit://, amqp://, nats://)")
        can_requeue = transport.capabilities.requeue
        printer = _Printer(args.json, out, args.count, can_requeue)
        priorities = args.priority or list(PRIORITIES)
        endpoint = printer.endpoint(priorities, _parse_filters(args.filter))
        targets = [Target(topic=t, exchange=args.exchange) for t in args.topic]
        # prefetch=1: at most one message is held that has not been printed yet.
        listener = get_notification_listener(transport, targets, [endpoint], pool=args.pool,
                                             allow_requeue=can_requeue, prefetch=1)
        where = ", ".join(f"{transport.resolve(t)}/{t.topic}" for t in targets)
        group = (f"pool {args.pool!r} (gets its own copy of every notification)" if args.pool
                 else "the no-pool group (shares notifications with the other consumers of it; "
                      "use --pool NAME to get a copy of everything)")
        if expiring:
            group += (f"; its queue expires {LISTEN_POOL_EXPIRY}s after the last member leaves "
                      f"(queue_expiry=0 in the URL keeps it)")
        if server is not None:
            server.collector.watch_listener(listener, args.pool or "group")
        # The handler goes in before the banner: a Ctrl-C right after "listening on" must stop
        # cleanly, not raise KeyboardInterrupt.
        previous = signal.signal(signal.SIGINT, lambda *_: printer.done.set())
        try:
            try:
                listener.start()
            except TidingsError as exc:
                # A driver that refuses the pool's queue as declared says which options must
                # match (the URL it shows aside); the expiry is ours: say how to go without it.
                if not expiring or "queue_expiry" not in re.sub(r"\S+://\S*", "", str(exc)):
                    raise
                raise CLIError(f"{exc} (tidings listen declared pool {args.pool!r} with "
                               f"queue_expiry={LISTEN_POOL_EXPIRY}; to join a queue declared "
                               f"without one, add queue_expiry=0 to the URL)") from exc
            print(f"listening on {where} ({', '.join(priorities)}) via "
                  f"{transport.url.masked()} as a member of {group}; Ctrl-C stops",
                  file=sys.stderr, flush=True)
            if server is not None:
                print(f"metrics: {server.url}", file=sys.stderr, flush=True)
            while not printer.done.wait(0.2):
                pass
        finally:
            signal.signal(signal.SIGINT, previous)
            listener.stop()
            listener.wait(30)
        print(f"stopped after {printer.count} notification(s)", file=sys.stderr)
        return 0
    finally:
        transport.cleanup()


def _read_payload(spec: str) -> Any:
    """``--payload``: JSON, or ``@FILE`` holding JSON; errors name the file."""
    if not spec.startswith("@"):
        try:
            return json.loads(spec)
        except ValueError as exc:
            raise CLIError(f"--payload is not valid JSON ({exc}); quote it, e.g. "
                           f"--payload '{{\"id\": 1}}', or use @file.json") from None
    path = spec[1:]
    if not path:
        raise CLIError("--payload @: name the file after the @, e.g. --payload @event.json")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CLIError(f"--payload {spec}: cannot read the file {path!r} "
                       f"({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"--payload {spec}: the file {path!r} is not UTF-8 text ({exc.reason} "
                       f"at byte {exc.start})") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CLIError(f"--payload {spec}: the file {path!r} is not valid JSON ({exc}); fix "
                       f"it, or pass the JSON itself") from None


def run_notify(args: argparse.Namespace, out: Any) -> int:
    payload = _read_payload(args.payload)
    transport = get_notification_transport(args.url)
    try:
        notifier = Notifier(transport, args.publisher_id, topics=args.topic,
                            exchange=args.exchange, retry=args.retry, raise_on_failure=True)
        send = getattr(notifier, args.priority)
        began = time.perf_counter()
        for _ in range(args.count):
            try:
                send({}, args.event_type, payload)
            except MessageDeliveryFailure as exc:
                cause = exc.__cause__
                if not isinstance(cause, TransportUnreachable) or args.retry < 0:
                    raise
                tries = args.retry + 1
                raise CLIError(f"{str(cause).rstrip('.')}; gave up after {tries} attempt"
                               f"{'s' if tries > 1 else ''} (--retry {args.retry}; -1 retries "
                               f"until the broker answers)") from exc
        took = time.perf_counter() - began
        print(f"sent {args.count} {args.priority} notification(s) {args.event_type!r} to "
              f"{notifier.exchange}/{','.join(t + '.' + args.priority for t in notifier.topics)}"
              f" in {took:.3f}s", file=out)
        return 0
    finally:
        transport.cleanup()


def run_bench(args: argparse.Namespace, out: Any) -> int:
    from tidings import bench

    if args.plot:
        bench.require_plotting()  # before the run, not after it
    work = bench.Workload(args.url, messages=args.messages, size=args.size, pools=args.pools,
                          members=args.members, progress=sys.stderr.isatty() or args.progress)
    results = [bench.run_tidings(work)]
    if args.compare == "oslo":
        results.append(bench.run_oslo(work))
    elif args.compare == "raw":
        results.append(bench.run_raw(work))
    print(bench.format_table(results), file=out)
    bench.save(results, args.json, args.plot)
    return 0


# -- plumbing ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidings", description="Send, watch and demonstrate notifications.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show tracebacks and debug logs (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 epilog=f"example:\n  {EXAMPLES[name]}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: given before the command, it is not reset to False here.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and debug logs")
        return command

    demo = add("demo", "start the no-pool group and two pools, send notifications, "
                       "show who received what and check the pool guarantees")
    demo.add_argument("url", nargs="?", default=None,
                      help="transport URL (default: a fresh memory:// broker)")
    demo.add_argument("--count", type=int, default=60, help="notifications to send (60)")
    demo.add_argument("--members", type=int, default=2, help="members per group/pool (2)")
    demo.add_argument("--timeout", type=float, default=30.0,
                      help="seconds to wait for delivery (30)")
    demo.add_argument("--processes", action="store_true",
                      help="run every member as a separate process (default URL then: "
                           "ZeroMQ with an sqlite matchmaker in a temporary file, which needs "
                           "pyzmq: pip install 'tidings[zmq]')")
    # Internal (the demo's member processes): no help=, so argparse does not list it.
    member = sub.add_parser("_member")
    member.add_argument("url")
    member.add_argument("--exchange", required=True)
    member.add_argument("--topic", required=True)
    member.add_argument("--pool", default=None)
    member.add_argument("--prefetch", type=int, default=None)

    add("drivers", "list installed drivers (plug-ins included) and their capabilities")

    listen = add("listen", "print notifications as they arrive")
    listen.add_argument("url")
    listen.add_argument("--topic", action="append", required=True, help="topic (repeatable)")
    listen.add_argument("--exchange", default=None, help="exchange (default: openstack)")
    listen.add_argument("--pool", default=None,
                        help="join this pool (gets its own copy) instead of the no-pool group")
    listen.add_argument("--priority", action="append", choices=PRIORITIES, type=_priority,
                        metavar="PRIORITY",
                        help=f"only these priorities, of {', '.join(PRIORITIES)} ('warning' "
                             f"means warn; repeatable; default all)")
    listen.add_argument("--filter", action="append", default=[],
                        help="FIELD=REGEX on publisher_id, event_type, payload.KEY, "
                             "context.KEY or metadata.KEY (repeatable)")
    listen.add_argument("--json", action="store_true", help="JSON lines instead of text")
    listen.add_argument("--count", type=int, default=None, help="stop after N notifications")
    listen.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve the listener's statistics for Prometheus on "
                             "http://ADDR:PORT/metrics (pip install 'tidings[metrics]'; "
                             "docs/metrics.md)")
    listen.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR",
                        help="address the metrics endpoint listens on (default 0.0.0.0: all)")

    notify = add("notify", "send one or many notifications")
    notify.add_argument("url")
    notify.add_argument("--topic", action="append", default=None,
                        help="topic (repeatable; default notifications)")
    notify.add_argument("--exchange", default=None, help="exchange (default: openstack)")
    notify.add_argument("--priority", default="info", choices=PRIORITIES, type=_priority,
                        metavar="PRIORITY",
                        help=f"one of {', '.join(PRIORITIES)} ('warning' means warn; "
                             f"default info)")
    notify.add_argument("--event-type", required=True)
    notify.add_argument("--payload", default="{}", help="JSON, or @file to read it from a file")
    notify.add_argument("--publisher-id", default="tidings.cli")
    notify.add_argument("--count", type=int, default=1)
    notify.add_argument("--retry", type=int, default=3,
                        help="send retries before failing (-1: forever; default 3)")

    bench = add("bench", "throughput and latency of publish, drain and end to end, optionally "
                         "side by side with oslo.messaging or a raw client")
    bench.add_argument("url")
    bench.add_argument("--messages", type=int, default=5000, help="per phase (5000)")
    bench.add_argument("--size", type=int, default=200, help="payload bytes (200)")
    bench.add_argument("--pools", type=int, default=0, help="pools (0: the no-pool group)")
    bench.add_argument("--members", type=int, default=1, help="listeners per group/pool (1)")
    bench.add_argument("--compare", choices=("oslo", "raw"), default=None,
                       help="run the same workload through oslo.messaging or a raw client")
    bench.add_argument("--json", default=None, metavar="FILE", help="write results as JSON")
    bench.add_argument("--plot", default=None, metavar="PNG",
                       help="bar chart (needs matplotlib: pip install 'tidings[plot]')")
    bench.add_argument("--progress", action="store_true", help="progress bar even when piped")
    # The usage line names the public commands only.
    sub.metavar = "{" + ",".join(name for name in sub.choices if not name.startswith("_")) + "}"
    return parser


class _ShortLog(logging.Filter):
    """Without --verbose: log records as one short line each, and the per-attempt warnings of
    the send retry policy left out (the error that ends a failed send sums them up; with an
    endless or long --retry, one line says that it is waiting)."""

    RETRY_LOGGER = "tidings.transports.retry"

    def __init__(self, command: str, retry: int | None) -> None:
        super().__init__()
        self.command = command
        self.announce = retry is not None and (retry < 0 or retry > 5)
        self.retry = retry

    def filter(self, record: logging.LogRecord) -> bool:
        record.command = self.command
        record.level = record.levelname.lower()
        if record.name == self.RETRY_LOGGER and record.levelno < logging.ERROR:
            if not self.announce:
                return False
            self.announce = False
            how = "until it answers" if self.retry is not None and self.retry < 0 else \
                f"up to {self.retry} times"
            record.msg, record.args = (f"the broker did not take the notification; retrying "
                                       f"{how} (Ctrl-C stops, --verbose shows each attempt)"), ()
            return True
        lines = record.getMessage().strip().splitlines() or [""]
        text = lines[0] + (" ..." if len(lines) > 1 else "")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; " \
                    f"--verbose shows the traceback)"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = mask_password(text), ()
        return True


def _setup_logging(args: argparse.Namespace, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("tidings %(command)s: %(level)s: %(message)s"))
        handler.addFilter(_ShortLog(args.command, getattr(args, "retry", None)))
    handler.set_name("tidings-cli")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "tidings-cli"]:
        root.removeHandler(old)  # main() called again in one process
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _check_processes_demo() -> None:
    """``demo --processes`` without a URL runs on zmq://: say what to install before starting."""
    try:
        load_driver_class("zmq")
    except DriverLoadFailure as exc:
        raise CLIError(f"demo --processes runs its members over zmq:// unless given a broker "
                       f"URL, and {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _setup_logging(args, verbose)
    out = sys.stdout
    try:
        if args.command == "demo":
            if args.count < 1 or args.members < 1:
                raise CLIError("--count and --members must be at least 1")
            if args.url:
                url = args.url
            elif args.processes:
                _check_processes_demo()
                registry = os.path.join(tempfile.gettempdir(),
                                        f"tidings-demo-{uuid.uuid4().hex[:8]}.db")
                url = f"zmq+sqlite:///{registry}"  # an absolute path: four slashes in all
            else:
                url = f"memory:///demo-{uuid.uuid4().hex[:8]}"
            try:
                return run_demo(url, args.count, args.members, args.timeout, out,
                                processes=args.processes)
            finally:
                if not args.url and args.processes:
                    for suffix in ("", "-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(registry + suffix)
        if args.command == "_member":
            return run_member(args)
        if args.command == "drivers":
            return run_drivers(out)
        if args.command == "listen":
            return run_listen(args, out)
        if args.command == "notify":
            return run_notify(args, out)
        if args.command == "bench":
            if args.messages < 1 or args.members < 1 or args.pools < 0:
                raise CLIError("--messages and --members must be at least 1, --pools at least 0")
            return run_bench(args, out)
    except (CLIError, TidingsError, ValueError, NotImplementedError, RuntimeError) as exc:
        if verbose:
            logging.exception("tidings %s failed", args.command)
        print(f"tidings {args.command}: error: {mask_password(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `tidings drivers | head`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
