"""``rabbit://``: RabbitMQ over AMQP 0-9-1 (kombu / py-amqp), wire-compatible with oslo.messaging.

``rabbit://user:pass@host:port[,user2:pass2@host2:port2]/virtual_host?options``: several hosts
mean failover. See docs/rabbit.md.
"""

from tidings.drivers.rabbit.driver import RabbitDriver

__all__ = ["RabbitDriver"]
