"""The version of tidings: the one place it is written (setup.py reads this file, and
``tidings.__version__`` and ``tidings --version`` show it)."""

__version__ = "0.1.0"
