"""``rabbit://``: RabbitMQ over AMQP 0-9-1 (kombu / py-amqp), wire-compatible with oslo.messaging.

``rabbit://user:pass@host:port[,user2:pass2@host2:port2]/virtual_host?options``; no host means
``guest:guest@localhost:5672`` and several hosts mean failover, tried in turn. The driver keeps
oslo.messaging's exchange, queue and message layout by default (see ``topology``), so a tidings
listener can consume what an OpenStack service sends and the other way round, and pools of both
libraries can share one stream.

The package is split by concern: ``options`` (URL options, settings and capabilities),
``topology`` (names, flags and arguments of exchanges and queues), ``link`` (one AMQP connection:
connect with failover, buffered reads, error classes), ``publisher`` (confirmed sends),
``listener`` (consumption and settlement) and ``heartbeat`` (the one thread that keeps idle
connections alive). See docs/rabbit.md for the operator's view.
"""

from tidings.drivers.rabbit.driver import RabbitDriver

__all__ = ["RabbitDriver"]
