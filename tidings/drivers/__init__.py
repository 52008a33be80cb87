"""Drivers shipped with tidings; each module imports only its own broker library."""
