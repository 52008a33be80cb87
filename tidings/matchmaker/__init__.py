"""The ZeroMQ driver's registry of live listeners: (exchange, routing key, group) -> addresses.

Used by ``tidings.drivers.zmq`` and by nothing in the core (see ARCHITECTURE.md). Backends are
found through the ``tidings.matchmakers`` entry points; the contract is in ``base.py``, what
a transport does with a matchmaker (keep entries registered, cache lookups) in ``client.py``.
"""
