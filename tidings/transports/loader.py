"""Find a driver class by URL scheme through stevedore (entry-point namespace tidings.drivers).

The core imports no driver: ours and third parties' are found the same way, so a plug-in needs
only an entry point in its own distribution, and a missing broker library costs nothing until
its driver is asked for.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, TypeVar

from stevedore.driver import DriverManager

from tidings.transports.base import Driver
from tidings.transports.errors import DriverLoadFailure

__all__ = ["DRIVER_NAMESPACE", "available_drivers", "entry_point_names", "load_driver_class",
           "load_plugin"]

DRIVER_NAMESPACE = "tidings.drivers"

T = TypeVar("T")


def entry_point_names(namespace: str) -> list[str]:
    """Names with an installed entry point in ``namespace``, read from the installed
    distributions' metadata without importing any of them.

    (stevedore's ExtensionManager would import every plug-in to list them: asking for
    ``memory://`` then cost the imports of kombu, proton, pyzmq and redis.)
    """
    return sorted({ep.name for ep in entry_points(group=namespace)})


def load_plugin(namespace: str, name: str, base: Any, *, unknown: str,
                unimportable: str) -> type[T]:
    """The class registered as ``name`` in ``namespace``, a subclass of ``base``, or
    DriverLoadFailure. ``unknown`` and ``unimportable`` are the messages (``str.format`` with
    ``name`` and ``installed``, or ``name`` and ``exc``) that say what to do."""
    installed = entry_point_names(namespace)
    if name not in installed:
        raise DriverLoadFailure(unknown.format(name=name, installed=", ".join(installed)
                                               or "none"))
    try:
        # imports this one only
        mgr: DriverManager[Any] = DriverManager(namespace, name, invoke_on_load=False)
    except ImportError as exc:
        raise DriverLoadFailure(unimportable.format(name=name, exc=exc)) from exc
    except Exception as exc:  # stevedore wraps many failures; say which plug-in failed
        raise DriverLoadFailure(f"{namespace} entry point {name!r} failed to load: {exc}") \
            from exc
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DriverLoadFailure(
            f"entry point {name!r} in {namespace} gives {cls!r}, which is not a subclass of "
            f"{base.__module__}.{base.__qualname__}")
    return cls


def available_drivers() -> list[str]:
    """The schemes with an installed driver entry point (whether or not they import)."""
    return entry_point_names(DRIVER_NAMESPACE)


def load_driver_class(scheme: str) -> type[Driver]:
    """Return the driver class registered for ``scheme`` or raise DriverLoadFailure saying why."""
    return load_plugin(
        DRIVER_NAMESPACE, scheme, Driver,
        unknown="no tidings driver for scheme {name!r}; installed drivers: {installed}. Install "
                "the driver's extra (e.g. pip install 'tidings[rabbit]') or the plug-in that "
                "provides it.",
        unimportable="driver {name!r} is installed but cannot be imported ({exc}); install its "
                     "library (for the built-in drivers: pip install 'tidings[rabbit]', "
                     "'tidings[amqp1]' or 'tidings[zmq]')")
