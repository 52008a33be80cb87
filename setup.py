"""Packaging for tidings: metadata, extras per driver library, and the entry points through
which drivers, matchmakers and the CLI are found."""

import os
import re

from setuptools import find_packages, setup


def _version() -> str:
    """The version written in tidings/_version.py (read, not imported: importing tidings would
    need its dependencies before they are installed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "tidings", "_version.py"), encoding="utf-8") as fh:
        match = re.search(r'^__version__ = "([^"]+)"$', fh.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("tidings/_version.py has no __version__ = \"...\" line")
    return match.group(1)


EXTRAS = {
    "rabbit": ["kombu>=5.3"],
    "amqp1": ["python-qpid-proton>=0.39", "kombu>=5.3"],
    "zmq": ["pyzmq>=25"],
    "redis": ["redis>=4.5"],
    "nats": ["nats-py>=2.6"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})  # every driver
EXTRAS["otel"] = ["opentelemetry-api>=1.20"]  # publish/handle spans, optional
# get_notification_transport(conf): oslo.config options; the routing notifier driver's YAML.
EXTRAS["oslo"] = ["oslo.config>=9", "PyYAML>=5"]
EXTRAS["metrics"] = ["prometheus_client>=0.17"]  # tidings.metrics, tidings listen --metrics-port
EXTRAS["plot"] = ["matplotlib>=3.5"]  # tidings bench --plot
EXTRAS["test"] = ["pytest>=7", "hypothesis>=6", "oslo.messaging>=14", "ruff",
                  "opentelemetry-sdk>=1.20", *EXTRAS["metrics"]]

setup(
    name="tidings",
    version=_version(),
    description="Notifications and listener pools over pluggable transports "
                "(oslo.messaging-compatible notification API)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tidings", "tidings.*"]),
    install_requires=["stevedore>=5"],
    extras_require=EXTRAS,
    entry_points={
        "tidings.drivers": [
            "memory = tidings.drivers.memory:MemoryDriver",
            "fake = tidings.drivers.memory:MemoryDriver",
            "rabbit = tidings.drivers.rabbit:RabbitDriver",
            "amqp = tidings.drivers.amqp1:AMQP1Driver",
            "zmq = tidings.drivers.zmq:ZmqDriver",
            "nats = tidings.drivers.nats:NatsDriver",
        ],
        "tidings.matchmakers": [
            "memory = tidings.matchmaker.memory:MemoryMatchMaker",
            "redis = tidings.matchmaker.redis:RedisMatchMaker",
            "sqlite = tidings.matchmaker.sqlite:SqliteMatchMaker",
        ],
        "console_scripts": ["tidings = tidings.cli:main"],
        "pytest11": ["tidings = tidings.testing.plugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
    license="Apache-2.0",
)
