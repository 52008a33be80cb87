"""Find a driver class by URL scheme through stevedore (entry-point namespace tidings.drivers).

The core imports no driver: ours and third parties' are found the same way, so a plug-in needs
only an entry point in its own distribution, and a missing broker library costs nothing until
its driver is asked for.
"""

from __future__ import annotations

import difflib
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from stevedore.driver import DriverManager

from tidings.transports.base import Driver
from tidings.transports.errors import DriverLoadFailure

__all__ = ["BUILTIN_EXTRAS", "DRIVER_NAMESPACE", "available_drivers", "did_you_mean",
           "entry_point_names", "install_hint", "load_driver_class", "load_plugin"]

DRIVER_NAMESPACE = "tidings.drivers"

BUILTIN_EXTRAS: dict[str, dict[str, str]] = {
    DRIVER_NAMESPACE: {"rabbit": "rabbit", "amqp": "amqp1", "zmq": "zmq"},
    "tidings.matchmakers": {"redis": "redis"},
}
"""namespace -> plug-in name -> the extra of tidings that installs its library, for the
plug-ins tidings itself ships (``pip install 'tidings[EXTRA]'``)."""

T = TypeVar("T")


def entry_point_names(namespace: str) -> list[str]:
    """Names with an installed entry point in ``namespace``, read from the installed
    distributions' metadata without importing any of them.

    (stevedore's ExtensionManager would import every plug-in to list them: asking for
    ``memory://`` then cost the imports of kombu, proton, pyzmq and redis.)
    """
    return sorted({ep.name for ep in entry_points(group=namespace)})


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name`` (a typo such as ``rabit``), or None."""
    close = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def install_hint(namespace: str, name: str, ep: EntryPoint | None = None) -> str:
    """What to run so that plug-in ``name`` of ``namespace`` can be imported."""
    dist = getattr(ep, "dist", None) if ep is not None else None
    dist_name = getattr(dist, "name", None) or "tidings"
    extra = BUILTIN_EXTRAS.get(namespace, {}).get(name)
    if dist_name == "tidings" and extra:
        return f"pip install 'tidings[{extra}]'"
    if dist_name == "tidings":
        return "pip install --upgrade --force-reinstall tidings"
    return f"pip install --upgrade '{dist_name}' (the distribution that provides it)"


def _missing_module(exc: BaseException) -> str | None:
    """The top-level module an import failed to find (``'amqp'``), if that is why it failed."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def load_plugin(namespace: str, name: str, base: Any, *, unknown: str,
                unimportable: str) -> type[T]:
    """The class registered as ``name`` in ``namespace``, a subclass of ``base``, or
    DriverLoadFailure. ``unknown`` and ``unimportable`` are the messages that say what to do,
    formatted with ``str.format``: ``unknown`` with ``name``, ``installed`` and ``suggestion``
    (`` did you mean 'x'?`` or empty), ``unimportable`` with ``name``, ``exc``, ``module`` (the
    missing Python module, or the error's text) and ``install`` (the pip command that cures
    it). An ``unknown`` without ``{suggestion}`` gets the suggestion at its end."""
    eps = {ep.name: ep for ep in entry_points(group=namespace)}
    installed = sorted(eps)
    if name not in eps:
        close = did_you_mean(name, installed)
        suggestion = f" did you mean {close!r}?" if close else ""
        message = unknown.format(name=name, installed=", ".join(installed) or "none",
                                 suggestion=suggestion)
        if suggestion and "{suggestion}" not in unknown:
            message += suggestion.capitalize()
        raise DriverLoadFailure(message)
    try:
        # imports this one only
        mgr: DriverManager[Any] = DriverManager(namespace, name, invoke_on_load=False)
    except ImportError as exc:
        missing = _missing_module(exc)
        module = f"the Python module {missing!r} is not installed" if missing else str(exc)
        raise DriverLoadFailure(unimportable.format(
            name=name, exc=exc, module=module,
            install=install_hint(namespace, name, eps[name]))) from exc
    except Exception as exc:  # stevedore wraps many failures; say which plug-in failed
        missing = _missing_module(exc)
        if missing:
            raise DriverLoadFailure(unimportable.format(
                name=name, exc=exc, module=f"the Python module {missing!r} is not installed",
                install=install_hint(namespace, name, eps[name]))) from exc
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
    """Return the driver class registered for ``scheme`` or raise DriverLoadFailure saying why
    and what to do: for a typo the closest installed scheme, for a driver whose library is
    missing the one extra to install for that scheme."""
    return load_plugin(
        DRIVER_NAMESPACE, scheme, Driver,
        unknown="no tidings driver for scheme {name!r}:{suggestion} installed drivers: "
                "{installed}. For another broker install the plug-in that provides it.",
        unimportable="the {name}:// driver cannot be loaded because {module}; install it "
                     "with: {install}")
