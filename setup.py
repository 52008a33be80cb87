"""Packaging for tidings: metadata, extras per driver library, and the entry points through
which drivers, matchmakers and the CLI are found."""

from setuptools import find_packages, setup

EXTRAS = {
    "rabbit": ["kombu>=5.3"],
    "amqp1": ["python-qpid-proton>=0.39", "kombu>=5.3"],
    "zmq": ["pyzmq>=25"],
    "redis": ["redis>=4.5"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})  # every driver
EXTRAS["otel"] = ["opentelemetry-api>=1.20"]  # publish/handle spans, optional
EXTRAS["test"] = ["pytest>=7", "hypothesis>=6", "oslo.messaging>=14", "ruff",
                  "opentelemetry-sdk>=1.20"]

setup(
    name="tidings",
    version="0.1.0",
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
