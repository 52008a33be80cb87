"""The ZeroMQ driver's registry of listeners; used by that driver only."""
