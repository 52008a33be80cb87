"""A notification listener in its own process, for the tests that SIGKILL a pool member.

Run by tests/reliability/support.py:ListenerProcess as
``python listener_child.py URL --topic T [--exchange E] [--pool P] [--prefetch N]
[--hold-after K]``. It prints one line per event on stdout, flushed at once so that what the
parent read is what happened before a SIGKILL:

* ``ready`` once the listener has started;
* ``delivered K`` when the endpoint gets the notification whose payload key is K;
* ``holding K`` when, after K-hold-after handled messages, the endpoint blocks on K (it then sits
  on K and the prefetched messages behind it, unacknowledged, until it is killed or stopped);
* ``processed K`` just before the endpoint returns (the core acknowledges K right after).

Closing its stdin stops it cleanly.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import tidings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--exchange", default=None)
    parser.add_argument("--pool", default=None)
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--hold-after", type=int, default=-1)
    args = parser.parse_args()

    out = threading.Lock()
    release = threading.Event()

    def say(line: str) -> None:
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    class Endpoint:
        handled = 0

        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            key = payload["key"]
            say(f"delivered {key}")
            if 0 <= args.hold_after <= self.handled and not release.is_set():
                say(f"holding {key}")
                release.wait()  # until stdin closes; a SIGKILL ends it here
            self.handled += 1
            say(f"processed {key}")

    transport = tidings.get_notification_transport(args.url)
    listener = tidings.get_notification_listener(
        transport, [tidings.Target(topic=args.topic, exchange=args.exchange)], [Endpoint()],
        pool=args.pool,
        prefetch=args.prefetch)
    listener.start()
    say("ready")
    sys.stdin.read()
    release.set()
    listener.stop()
    listener.wait(30)
    transport.cleanup()
    say("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
