"""The brokerless ZeroMQ driver (``zmq://``): ``driver`` (the driver and its options), ``sender``
(the window and the I/O thread), ``listener`` (the ROUTER side), ``protocol`` (the frames),
``curve`` (CURVE keys); NoListener is what a send that finds no listener fails with."""

from tidings.drivers.zmq.driver import NoListener, ZmqDriver

__all__ = ["NoListener", "ZmqDriver"]
