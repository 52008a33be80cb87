"""The brokerless ZeroMQ driver (``zmq://``, ``zmq+redis://``, ``zmq+sqlite://``).

``driver`` holds the driver and its options, ``sender`` the window and the I/O thread,
``listener`` the ROUTER side, ``protocol`` the frames they exchange. See docs/zmq.md.
"""

from tidings.drivers.zmq.driver import ZmqDriver

__all__ = ["ZmqDriver"]
