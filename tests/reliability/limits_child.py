"""A listener in its own process for tests/reliability/test_limits.py, so that its peak RSS
(VmHWM) is the listener's alone: ``limits_child.py URL TOPIC [unguarded]``. It prints
``READY`` once consuming and, after the message whose payload key is ``end``, one line
``PEAK <baseline VmHWM kB> <final VmHWM kB> <keys>``. ``unguarded`` turns the drivers'
max_message_size screening off, to measure what a listener costs without it."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import tidings
from tidings import Target


def vmhwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    url, topic = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "unguarded":
        from tidings.drivers.amqp1 import receiving
        from tidings.drivers.rabbit.link import Link

        screen = Link.screen_deliveries
        Link.screen_deliveries = (  # type: ignore[method-assign]
            lambda self, limit: screen(self, 1 << 62))
        receiving._SECTIONS = 1 << 62
    keys: list[Any] = []
    done = threading.Event()

    class Endpoint:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            keys.append(payload["key"])
            if payload["key"] == "end":
                done.set()

    t = tidings.get_notification_transport(url)
    listener = tidings.get_notification_listener(t, [Target(topic=topic)], [Endpoint()])
    listener.start()
    time.sleep(1.0)
    baseline = vmhwm_kb()
    print("READY", flush=True)
    done.wait(600)
    print(f"PEAK {baseline} {vmhwm_kb()} {','.join(map(str, keys))}", flush=True)
    listener.stop()
    listener.wait(10)
    t.cleanup()


if __name__ == "__main__":
    main()
