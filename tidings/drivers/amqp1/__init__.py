"""The ``amqp://`` driver: AMQP 1.0 on python-qpid-proton (see :mod:`.driver`)."""

from tidings.drivers.amqp1.driver import AMQP1Driver

__all__ = ["AMQP1Driver"]
