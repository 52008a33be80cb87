"""The Jepsen-style delivery checker: every bucket, and the waiting recorder."""

from __future__ import annotations

import threading

import pytest

from tidings.testing.checker import DeliveryCheckError, DeliveryLog, check


def test_clean_history_is_valid() -> None:
    history = [(i, "sent") for i in range(3)] + [(i, e) for i in range(3)
                                                  for e in ("delivered", "ack")]
    report = check(history)
    assert report.counts == {"attempted": 3, "sent_ok": 3, "acknowledged": 3, "lost": 0,
                             "recovered": 0, "duplicated": 0, "unexpected": 0,
                             "redelivered": 0}
    assert report.valid()
    report.assert_valid()


def test_lost_is_sent_but_never_acknowledged() -> None:
    report = check([("a", "sent"), ("b", "sent"), ("a", "ack"), ("b", "delivered")])
    assert report.lost == {"b"}
    assert not report.valid()
    assert report.valid(at_least_once=False)
    with pytest.raises(DeliveryCheckError, match=r"1 lost .*'b'"):
        report.assert_valid()


def test_recovered_is_a_failed_send_that_arrived() -> None:
    report = check([("a", "send_failed"), ("b", "send_unknown"), ("a", "ack")])
    assert report.recovered == {"a"}
    assert report.lost == frozenset()  # a failed send that never arrives is not lost
    assert report.counts["attempted"] == 2 and report.counts["sent_ok"] == 0
    assert report.valid()


def test_retried_send_counts_as_sent() -> None:
    report = check([("a", "send_failed"), ("a", "sent")])
    assert report.lost == {"a"} and report.recovered == frozenset()


def test_duplicated_is_acknowledged_twice_redelivered_is_delivered_twice() -> None:
    history = [("a", "sent"), ("b", "sent"),
               ("a", "delivered"), ("a", "requeue"), ("a", "delivered"), ("a", "ack"),
               ("b", "delivered"), ("b", "ack"), ("b", "delivered"), ("b", "ack")]
    report = check(history)
    assert report.redelivered == {"a": 2, "b": 2}
    assert report.duplicated == {"b": 2}
    assert not report.valid()
    assert report.valid(allow_duplicates=True)
    with pytest.raises(DeliveryCheckError, match="acknowledged more than once"):
        report.assert_valid()


def test_unexpected_is_never_sent() -> None:
    report = check([("a", "sent"), ("a", "ack"), ("ghost", "delivered"), ("ghost2", "ack")])
    assert report.unexpected == {"ghost", "ghost2"}
    assert not report.valid(at_least_once=False, allow_duplicates=True)


def test_sent_argument_and_unknown_events() -> None:
    report = check([("x", "ack")], sent=["x", "y"])
    assert report.lost == {"y"} and report.acknowledged == 1
    with pytest.raises(ValueError, match="unknown delivery event"):
        check([("x", "acked")])


def test_problems_list_examples_and_counts() -> None:
    history = [(i, "sent") for i in range(10)]
    with pytest.raises(DeliveryCheckError) as info:
        check(history).assert_valid()
    text = str(info.value)
    assert "10 lost" in text and ", ..." in text and "'lost': 10" in text


def test_log_waits_for_acks_from_other_threads() -> None:
    log = DeliveryLog()
    ids = list(range(50))
    for i in ids:
        log.sent(i)

    def consume() -> None:
        for i in ids:
            log.delivered(i)
            log.acked(i)

    worker = threading.Thread(target=consume)
    worker.start()
    assert log.wait_acked(ids, timeout=10)
    worker.join(10)
    assert log.count("ack") == 50 and log.acked_ids() == set(ids)
    log.report().assert_valid()


def test_log_wait_times_out_and_rejects_unknown_events() -> None:
    log = DeliveryLog()
    log.sent("a")
    assert log.wait_acked(["a"], timeout=0.05) is False
    with pytest.raises(ValueError):
        log.record("a", "nope")
    assert log.report().lost == {"a"}
