"""Fault tests with figures: broker restarts, cut connections, killed pool members, backlogs,
memory alarms, a matchmaker restart, and secrets kept out of every log and message.

Every scenario prints a ``FIGURES {...}`` line and the run ends with a table of them (see
conftest.py); docs/reliability.md explains each scenario and lists measured figures.
"""
