"""Find a driver class by URL scheme through stevedore (entry-point namespace tidings.drivers).

The core imports no driver: ours and third parties' are found the same way, so a plug-in needs
only an entry point in its own distribution, and a missing broker library costs nothing until
its driver is asked for.
"""

from __future__ import annotations

from stevedore import ExtensionManager
from stevedore.driver import DriverManager

from tidings.transports.base import Driver
from tidings.transports.errors import DriverLoadFailure

__all__ = ["DRIVER_NAMESPACE", "available_drivers", "load_driver_class"]

DRIVER_NAMESPACE = "tidings.drivers"


def available_drivers() -> list[str]:
    """The schemes with an installed driver entry point (whether or not they import)."""
    mgr = ExtensionManager(DRIVER_NAMESPACE, invoke_on_load=False,
                           on_load_failure_callback=lambda *_: None)
    names = {ep.name for ep in mgr.list_entry_points()}
    return sorted(names)


def load_driver_class(scheme: str) -> type[Driver]:
    """Return the driver class registered for ``scheme`` or raise DriverLoadFailure saying why."""
    installed = available_drivers()
    if scheme not in installed:
        raise DriverLoadFailure(
            f"no tidings driver for scheme {scheme!r}; installed drivers: "
            f"{', '.join(installed) or 'none'}. Install the driver's extra "
            f"(e.g. pip install 'tidings[rabbit]') or the plug-in that provides it.")
    try:
        mgr = DriverManager(DRIVER_NAMESPACE, scheme, invoke_on_load=False)
    except ImportError as exc:
        raise DriverLoadFailure(
            f"driver {scheme!r} is installed but cannot be imported ({exc}); install its "
            f"library (for the built-in drivers: pip install 'tidings[rabbit]', "
            f"'tidings[amqp1]' or 'tidings[zmq]')") from exc
    except Exception as exc:  # stevedore wraps many failures; say which driver failed
        raise DriverLoadFailure(f"driver {scheme!r} failed to load: {exc}") from exc
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverLoadFailure(
            f"entry point {scheme!r} in {DRIVER_NAMESPACE} gives {cls!r}, which is not a "
            f"subclass of tidings.transports.base.Driver")
    return cls
