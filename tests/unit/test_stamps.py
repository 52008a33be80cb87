"""Message ids and timestamps: the same formats as str(uuid.uuid4()) and str(naive UTC now)."""

from __future__ import annotations

import datetime
import os
import re
import threading
import time
import uuid

import pytest

from tidings.notify import stamps

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_ids_are_version_4_uuids_in_canonical_form() -> None:
    for _ in range(2000):  # several refills of the random block
        text = stamps.new_message_id()
        assert UUID4.match(text), text
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_ids_do_not_repeat_across_threads() -> None:
    seen: list[list[str]] = [[] for _ in range(4)]

    def take(out: list[str]) -> None:
        out.extend(stamps.new_message_id() for _ in range(5000))

    threads = [threading.Thread(target=take, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    every = [i for out in seen for i in out]
    assert len(every) == 20000 and len(set(every)) == 20000


def test_variant_digit_uses_all_four_values() -> None:
    digits = {stamps.new_message_id()[19] for _ in range(400)}
    assert digits == set("89ab")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    stamps.new_message_id()  # the parent holds a partly used block
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: send the next ids the child would use, then leave at once
        try:
            os.write(write_end, ",".join(stamps.new_message_id() for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        child = fh.read().decode().split(",")
    os.waitpid(pid, 0)
    parent = [stamps.new_message_id() for _ in range(50)]
    assert len(child) == 50
    assert not set(child) & set(parent)


@pytest.mark.parametrize("now", [0.0, 1.5, 1_700_000_000.25, 1_795_000_000.000001,
                                 1_795_000_000.999999, 4_102_444_800.5])
def test_timestamp_matches_str_of_a_naive_utc_datetime(now: float) -> None:
    expected = str(datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                   .replace(tzinfo=None))
    got = stamps.utc_timestamp(now)
    # Float seconds carry ~0.2 us of error; datetime rounds half-even, we truncate.
    exp_dt = datetime.datetime.fromisoformat(expected)
    got_dt = datetime.datetime.fromisoformat(got)
    assert abs((got_dt - exp_dt).total_seconds()) <= 1e-6
    assert len(got) in (19, 26)


def test_whole_second_has_no_fraction_like_str_datetime() -> None:
    assert stamps.utc_timestamp(1_700_000_000.0) == "2023-11-14 22:13:20"
    assert str(datetime.datetime(2023, 11, 14, 22, 13, 20)) == "2023-11-14 22:13:20"


def test_timestamp_of_now_is_close_to_datetime_now() -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    got = datetime.datetime.fromisoformat(stamps.utc_timestamp())
    after = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert before - datetime.timedelta(microseconds=1) <= got <= after


def test_the_cached_second_moves_on() -> None:
    first = stamps.utc_timestamp(1_800_000_000.5)
    second = stamps.utc_timestamp(1_800_000_001.5)
    assert first == "2027-01-15 08:00:00.500000"
    assert second == "2027-01-15 08:00:01.500000"
    assert stamps.utc_timestamp(time.time()).startswith(str(datetime.datetime.now(
        datetime.timezone.utc).year))


def test_module_is_used_by_the_notifier() -> None:
    import tidings
    from tidings.transports import envelope

    transport = tidings.get_notification_transport(f"memory:///stamps-{uuid.uuid4().hex}")
    try:
        notifier = tidings.Notifier(transport, "p", topics=["t"])
        _, msg, _ = notifier._build({}, "e.v", {}, "info")
        assert UUID4.match(msg["message_id"])
        datetime.datetime.fromisoformat(msg["timestamp"])
        assert envelope.decode(envelope.encode(msg))["message_id"] == msg["message_id"]
        _, again, _ = notifier._build({}, "e.v", {}, "info")
        assert again["message_id"] != msg["message_id"]
    finally:
        transport.cleanup()
