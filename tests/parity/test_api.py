"""The Python API, side by side: oslo.messaging 18 on ``fake:`` and tidings on ``memory://`` (or
no transport at all), same calls, same inputs. Each test states what oslo.messaging does and
pins that tidings does the same, or the deliberate difference the README lists."""

from __future__ import annotations

import inspect
import json
import logging
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

import tidings
import tidings.notify._impl_test as tidings_test_driver
from tidings.transports import conf as options

from .conftest import Inbox, endpoint, new_conf, oslo_messaging, override

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from oslo_messaging.notify import _impl_test as oslo_test_driver

LIBS = ("oslo", "tidings")


def drop_ids(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k not in ("message_id", "timestamp")}


def records(lib: str) -> list[Any]:
    """The test driver's records, ids and timestamps dropped."""
    module = oslo_test_driver if lib == "oslo" else tidings_test_driver
    return [(ctxt, drop_ids(msg), prio, retry) for ctxt, msg, prio, retry in
            module.NOTIFICATIONS]


@pytest.fixture(autouse=True)
def _clean_test_drivers() -> None:
    oslo_test_driver.reset()
    tidings_test_driver.reset()


# -- get_notification_transport(conf) -----------------------------------------------------
def test_transport_url_and_exchange_come_from_config() -> None:
    conf = new_conf()
    override(conf, transport_url="fake:///from-default", control_exchange="nova")
    t = tidings.get_notification_transport(conf)
    assert t.conf is conf and t.default_exchange == "nova"
    assert t.url.virtual_host == "from-default"
    override(conf, oslo_messaging_notifications__transport_url="fake:///from-notifications")
    t2 = tidings.get_notification_transport(conf)
    assert t2.url.virtual_host == "from-notifications"
    t3 = tidings.get_notification_transport(conf, "memory:///given")  # the url argument wins
    assert t3.url.virtual_host == "given" and t3.default_exchange == "nova"
    for each in (t, t2, t3):
        each.cleanup()
    # oslo.messaging reads the same places (its fake driver keeps the URL on the transport).
    o = oslo_messaging.get_notification_transport(conf)
    assert o._driver._url.virtual_host == "from-notifications"
    assert o._driver._default_exchange == "nova"
    o.cleanup()


def test_a_url_string_still_works_without_config() -> None:
    t = tidings.get_notification_transport("memory:///plain")
    assert t.conf is None and t.default_exchange == "openstack"
    t.cleanup()
    t = tidings.get_notification_transport(url="memory:///kw", allowed_remote_exmods=["x"])
    assert t.url.virtual_host == "kw"
    t.cleanup()


@pytest.mark.parametrize("first", ["tidings", "oslo"])
def test_both_libraries_register_on_one_configopts(first: str) -> None:
    """No DuplicateOptError in either order: tidings defines the options exactly as
    oslo.messaging does. Run in a fresh interpreter, where oslo.messaging is not imported
    before tidings registers its own definitions."""
    script = textwrap.dedent(f"""
        import warnings; warnings.simplefilter("ignore")
        from oslo_config import cfg
        conf = cfg.ConfigOpts(); conf([])
        def ours():
            import tidings
            t = tidings.get_notification_transport(conf, "memory:///x")
            tidings.Notifier(t); tidings.get_notification_listener(
                t, [tidings.Target(topic="t")], [type("E", (), {{"info": lambda *a: 0}})()])
        def theirs():
            import oslo_messaging
            t = oslo_messaging.get_notification_transport(conf, "fake:")
            oslo_messaging.Notifier(t)
            oslo_messaging.get_notification_listener(
                t, [oslo_messaging.Target(topic="t")], [object()], executor="threading")
        import sys
        assert "oslo_messaging" not in sys.modules
        for step in ({'(ours, theirs)' if first == 'tidings' else '(theirs, ours)'}):
            step()
        print(conf.oslo_messaging_notifications.topics, conf.control_exchange,
              conf.executor_thread_pool_size)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["['notifications']", "openstack", "64"]


def test_set_transport_defaults() -> None:
    """tidings' set_transport_defaults changes tidings' default exchange; with oslo.messaging
    imported, its option objects are the ones registered, so its set_transport_defaults holds
    for both libraries on one ConfigOpts."""
    script = textwrap.dedent("""
        import warnings; warnings.simplefilter("ignore")
        from oslo_config import cfg
        import tidings
        tidings.set_transport_defaults("heat")
        conf = cfg.ConfigOpts(); conf([])
        print(tidings.get_notification_transport(conf, "memory:///x").default_exchange)
        import oslo_messaging
        oslo_messaging.set_transport_defaults("cinder")
        conf = cfg.ConfigOpts(); conf([])
        t = tidings.get_notification_transport(conf, "memory:///x")
        o = oslo_messaging.get_notification_transport(conf, "fake:")
        print(t.default_exchange, o._driver._default_exchange)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["heat", "cinder", "cinder"]


# -- Notifier -----------------------------------------------------------------------------
def test_notifier_arguments_are_oslos_in_oslos_order() -> None:
    theirs = list(inspect.signature(oslo_messaging.Notifier).parameters)
    ours = list(inspect.signature(tidings.Notifier).parameters)
    assert ours[:len(theirs)] == theirs
    assert list(inspect.signature(tidings.get_notification_listener).parameters)[:7] == \
        list(inspect.signature(oslo_messaging.get_notification_listener).parameters)
    assert list(inspect.signature(tidings.get_batch_notification_listener).parameters)[:9] == \
        list(inspect.signature(oslo_messaging.get_batch_notification_listener).parameters)
    assert list(inspect.signature(tidings.get_notification_transport).parameters)[:3] == \
        list(inspect.signature(oslo_messaging.get_notification_transport).parameters)
    assert list(inspect.signature(tidings.Target).parameters) == \
        list(inspect.signature(oslo_messaging.Target).parameters)


def _notifiers(conf_values: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = {}
    for lib in LIBS:
        conf = new_conf()
        override(conf, **conf_values)
        module = oslo_messaging if lib == "oslo" else tidings
        url = "fake:" if lib == "oslo" else "memory:///notifiers"
        transport = module.get_notification_transport(conf, url=url)
        out[lib] = module.Notifier(transport, "compute.host1", **kw)
    return out


def test_driver_topics_and_retry_come_from_config() -> None:
    notifiers = _notifiers({"oslo_messaging_notifications__driver": ["test"],
                            "oslo_messaging_notifications__topics": ["a", "b"],
                            "oslo_messaging_notifications__retry": 5})
    for n in notifiers.values():
        n.info({}, "compute.instance.create", {"id": 1})
        n.prepare(publisher_id="other", retry=2).warn({}, "e2", {"id": 2})
        n._notify({}, "cli.sent", "payload", "info")  # oslo's send-notification CLI's call
        n._notify({}, "upper", {}, "INFO", publisher_id="pub", retry=0)
    assert records("tidings") == records("oslo")
    assert [r[3] for r in records("oslo")] == [5, 2, 5, 5]
    assert [r[2] for r in records("oslo")] == ["INFO", "WARN", "info", "INFO"]
    assert notifiers["tidings"].topics == ["a", "b"]


@pytest.mark.parametrize("configured, enabled", [([], True), (["noop"], False),
                                                  (["noop", "test"], True)])
def test_is_enabled_and_noop_as_oslo(configured: list[str], enabled: bool) -> None:
    notifiers = _notifiers({"oslo_messaging_notifications__driver": configured})
    for n in notifiers.values():
        assert n.is_enabled() is enabled
        n.info({}, "e", {})
    assert records("tidings") == records("oslo")


def test_noop_or_no_driver_sends_nothing(pair: dict[str, Any], running: list[Any]) -> None:
    inboxes = {}
    for lib, (module, transport) in pair.items():
        inbox = inboxes[lib] = Inbox()
        listener = module.get_notification_listener(
            transport, [module.Target(topic="quiet")], [endpoint(inbox)], executor="threading")
        listener.start()
        running.append(listener)
        for driver in (["noop"], []):
            override(transport.conf, oslo_messaging_notifications__driver=driver)
            module.Notifier(transport, "p", topics=["quiet"]).info({}, "e", {})
        module.Notifier(transport, "p", driver="messagingv2", topics=["quiet"]).info(
            {}, "sent", {})
    for inbox in inboxes.values():
        assert [i[3] for i in inbox.settle(1)] == ["sent"]


def test_topics_as_a_string_is_refused() -> None:
    """oslo.messaging sends to topics 'a', 'b' and 'c'; tidings refuses (README)."""
    with pytest.raises(ValueError, match="list of non-empty strings"):
        _notifiers({}, driver="test", topics="abc")
    n = _notifiers({}, driver="test")["oslo"]
    oslo_messaging.Notifier(n.transport, "p", driver="messagingv2", topics="abc")  # accepted


def test_unknown_driver_is_refused() -> None:
    """oslo.messaging loads none for an unknown name (a warning) and sends nothing; tidings
    raises, so a typo in the configuration does not lose every notification (README)."""
    with pytest.raises(ValueError, match="unknown notifier driver"):
        _notifiers({"oslo_messaging_notifications__driver": ["messagingv3"]})


def test_log_driver_as_oslo(caplog: pytest.LogCaptureFixture) -> None:
    """The logger name, the level, the JSON and the masked passwords are oslo.messaging's;
    AUDIT and SAMPLE have no logger method there, so they are not logged (a warning)."""
    notifiers = _notifiers({}, driver="log")
    payload = {"password": "hunter2", "nested": {"auth_token": "t0k"},
               "cmd": "mount --password s3cr3t", "when": __import__("datetime").date(2024, 1, 2),
               "ok": "é"}
    got: dict[str, Any] = {}
    for lib, n in notifiers.items():
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="oslo.messaging.notification"), \
                warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for method in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
                getattr(n, method)({"user": "u"}, "compute.start", payload)
        got[lib] = ([(r.name, r.levelname, drop_ids(json.loads(r.getMessage())))
                     for r in caplog.records if r.name.startswith("oslo.messaging.notif")],
                    sorted(str(w.message) for w in warned if "Unable to log" in str(w.message)))
    assert got["tidings"] == got["oslo"]
    logged, warned_about = got["oslo"]
    assert [lvl for _, lvl, _ in logged] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert logged[0][2]["payload"]["password"] == "***"
    assert len(warned_about) == 2


def test_routing_driver() -> None:
    """oslo.messaging 18's routing driver loads none of the drivers it routes to (it passes
    invoke_args=None to stevedore) and logs an error for every notification; tidings routes as
    its documentation says (README)."""
    pytest.importorskip("yaml")
    conf = new_conf()
    override(conf)
    path = Path(__file__).with_name("routing.yaml")
    options.register_routing_opt(conf)
    conf.set_override("routing_config", str(path), group="oslo_messaging_notifications")
    t = tidings.get_notification_transport(conf, "memory:///routing")
    n = tidings.Notifier(t, "p", driver="routing")
    n.info({}, "compute.instance.create", {"id": 1})  # -> test (events rule)
    n.error({}, "volume.error", {"id": 2})  # -> test and log (priority rule)
    n.info({}, "image.upload", {"id": 3})  # -> nothing
    assert [r[1]["payload"]["id"] for r in records("tidings")] == [1, 2]
    t.cleanup()


def test_exceptions_as_oslo() -> None:
    target = tidings.Target(topic="t")
    assert issubclass(tidings.MessagingTimeout, tidings.MessagingException)
    assert issubclass(tidings.MessageDeliveryFailure, tidings.MessagingException)
    assert issubclass(tidings.InvalidTarget, (tidings.MessagingException, ValueError))
    assert not issubclass(tidings.MessageUndeliverable, tidings.MessagingException)
    assert not issubclass(oslo_messaging.MessageUndeliverable, oslo_messaging.MessagingException)
    assert str(tidings.InvalidTarget("A topic is required", "T")) == \
        str(oslo_messaging.InvalidTarget("A topic is required", "T"))
    assert tidings.InvalidTarget("m", target).target is target
    theirs = oslo_messaging.MessageUndeliverable(KeyError("x"), "ex", "rk", {"m": 1})
    ours = tidings.MessageUndeliverable(KeyError("x"), "ex", "rk", {"m": 1})
    assert (vars(ours).keys(), ours.exchange, ours.routing_key, ours.message) == \
        (vars(theirs).keys(), theirs.exchange, theirs.routing_key, theirs.message)
    cause = RuntimeError("boom")
    assert str(tidings.DriverLoadFailure("nope", cause)) == \
        str(oslo_messaging.DriverLoadFailure("nope", cause))
    assert tidings.DriverLoadFailure("nope", cause).ex is cause
    assert str(tidings.InvalidTransportURL("x:", "bad")) == \
        str(oslo_messaging.InvalidTransportURL("x:", "bad"))
    assert tidings.InvalidTransportURL("x:", "bad").url == "x:"
    assert str(tidings.InvalidTransportURL("one message")) == "one message"


# -- Target -------------------------------------------------------------------------------
def test_target_positional_order_and_fields_as_oslo() -> None:
    args = ("nova", "notifications", "ns", "1.2", "srv", True, ["old"])
    ours, theirs = tidings.Target(*args), oslo_messaging.Target(*args)
    for name in ("exchange", "topic", "namespace", "version", "server", "fanout",
                 "accepted_namespaces"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert repr(ours) == repr(theirs)
    assert repr(ours(topic="x", fanout=None)) == repr(theirs(topic="x", fanout=None))
    assert tidings.Target("nova", "n") == tidings.Target(exchange="nova", topic="n")
    assert tidings.Target("nova", "n") != tidings.Target("n", "nova")


def test_target_without_topic_is_refused_when_used(pair: dict[str, Any]) -> None:
    """oslo.messaging raises InvalidTarget at start(); tidings when the listener is built."""
    _, transport = pair["tidings"]
    with pytest.raises(tidings.InvalidTarget, match="A target must have topic specified"):
        tidings.get_notification_listener(transport, [tidings.Target("nova")],
                                          [endpoint(Inbox())])
    _, transport = pair["oslo"]
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target("nova")], [endpoint(Inbox())], executor="threading")
    with pytest.raises(oslo_messaging.InvalidTarget, match="A target must have topic"):
        listener.start()


# -- listeners ----------------------------------------------------------------------------
def test_executors_and_reset(pair: dict[str, Any]) -> None:
    for module, transport in pair.values():
        for executor in (None, "threading"):
            listener = module.get_notification_listener(
                transport, [module.Target(topic="ex")], [endpoint(Inbox())], executor=executor)
            assert listener.reset() is None
    with pytest.raises(ValueError, match="eventlet is not supported"):
        tidings.get_notification_listener(pair["tidings"][1], [tidings.Target(topic="ex")],
                                           [endpoint(Inbox())], executor="eventlet")


def test_pool_size_comes_from_config() -> None:
    conf = new_conf()
    options.register_pool_opts(conf)
    conf.set_override("executor_thread_pool_size", 3)
    t = tidings.get_notification_transport(conf, "memory:///pool-size")
    listener = tidings.get_notification_listener(t, [tidings.Target(topic="t")],
                                                 [endpoint(Inbox())])
    assert listener._loop._workers == 3
    t.cleanup()


# -- the log handlers ---------------------------------------------------------------------
def _log_through(handler: logging.Handler) -> None:
    logger = logging.getLogger("parity.handler")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("disk %s is full", "sda")
        try:
            raise KeyError("k")
        except KeyError:
            logger.error("failed", exc_info=True)
        logger.log(5, "no notifier method for this level")
    finally:
        logger.removeHandler(handler)


def test_logging_notification_handler_as_oslo() -> None:
    for module, url in ((oslo_messaging, "fake:"), (tidings, "memory:///handler")):
        class Handler(module.LoggingNotificationHandler):  # type: ignore[name-defined,misc]
            CONF = new_conf()

        _log_through(Handler(url, publisher_id="logs", driver="test", topic="logs"))

    def view(lib: str) -> list[Any]:
        out = []
        for ctxt, msg, prio, _ in records(lib):
            payload = dict(msg["payload"])
            payload.pop("thread"), payload.pop("process")
            out.append((ctxt, prio, msg["event_type"], msg["publisher_id"],
                        re.sub(" at 0x[0-9a-f]+", "", json.dumps(payload, default=str))))
        return out

    assert view("tidings") == view("oslo")
    assert [r[1] for r in view("oslo")] == ["WARN", "ERROR"]


def test_publish_errors_handler_as_oslo() -> None:
    assert tidings.PublishErrorsHandler is tidings.LoggingErrorNotificationHandler
    from oslo_config import cfg

    conf = cfg.CONF
    options.register_transport_opts(conf)
    options.register_notifier_opts(conf)
    try:
        conf.set_override("driver", ["test"], group="oslo_messaging_notifications")
        for module, url in ((oslo_messaging, "fake:"), (tidings, "memory:///errors")):
            conf.set_override("transport_url", url)
            _log_through(module.PublishErrorsHandler())
        assert records("tidings") == records("oslo") and len(records("oslo")) == 2
        conf.set_override("driver", ["test", "log"], group="oslo_messaging_notifications")
        _log_through(tidings.PublishErrorsHandler())  # 'log' configured: sends nothing
        assert len(records("tidings")) == 2
    finally:
        conf.clear_override("driver", group="oslo_messaging_notifications")
        conf.clear_override("transport_url")


def test_test_driver_reset_rebinds_like_oslo() -> None:
    kept = tidings_test_driver.NOTIFICATIONS
    tidings_test_driver.reset()
    assert tidings_test_driver.NOTIFICATIONS is not kept
    assert tidings.notify._impl_test is tidings_test_driver
