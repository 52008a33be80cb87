"""The brokerless ZeroMQ driver (``zmq://``): ``driver`` (the driver and its options), ``sender``
(the window and the I/O thread), ``listener`` (the ROUTER side), ``protocol`` (the frames)."""

from tidings.drivers.zmq.driver import ZmqDriver

__all__ = ["ZmqDriver"]
