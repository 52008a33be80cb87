"""Notifications, built only on tidings.transports."""
