"""``nats://``: tidings on NATS JetStream (see docs/nats.md and :mod:`.driver`)."""

from tidings.drivers.nats.driver import NatsDriver

__all__ = ["NatsDriver"]
